"""report.html: one self-contained page (inline CSS, figures as SVG data URIs, no script, no network) that
shows what a run of `ternqc apply` did.

In: report.json's content (see `details.py`). Out: the HTML text. Layout: a summary (accuracies, how much
was quantised, warnings), notes and warnings, per-layer charts and a table, then one panel per layer in model
order (its tensors' Δ, α, zeros, error, the rule behind each parameter, and the histograms), then the run
(model, checkpoint, data, calibration, constants, the rules text). Numbers carry `data-*` attributes naming
what they are, so tests and scripts can read them back.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from ternqc.runtime.report import plots
from ternqc.runtime.report.style import CSS

TENSOR_ORDER = ("data_in", "weight", "bias")


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def _summary_value(v: Any) -> str:
    """Δ or α as shown in a table: a scalar with 4 significant digits, a per-channel summary as its mean."""
    if isinstance(v, dict):
        return (
            f"{_num(v['mean'])}<span class='rules' style='display:block'>mean of {v['values']}, "
            f"{_num(v['min'], 3)}…{_num(v['max'], 3)}</span>"
        )
    return _num(v)


def _cell(
    v: Any,
    field: str,
    node: str | None = None,
    tensor: str | None = None,
    *,
    percent: bool = False,
    summary: bool = False,
) -> str:
    attrs = f' data-field="{escape(field)}"'
    if node is not None:
        attrs += f' data-node="{escape(node)}"'
    if tensor is not None:
        attrs += f' data-tensor="{escape(tensor)}"'
    if summary:
        text = _summary_value(v)
    elif percent:
        text = "–" if v is None else f"{100 * v:.1f}%"
    else:
        text = _num(v)
    return f'<td class="num"{attrs}>{text}</td>'


def _metric_name(report: dict[str, Any]) -> str:
    """The headline metric's name as the page shows it (`accuracy`, `next token accuracy`, ...)."""
    return str(report.get("metric") or "accuracy").replace("_", " ")


def _accuracy_cards(report: dict[str, Any]) -> list[str]:
    cards = []
    f, q = report.get("float_accuracy"), report.get("ternary_accuracy")
    name = escape(_metric_name(report))
    cards.append(
        f'<div class="card"><div class="label">float {name}</div>'
        f'<div class="value" data-field="float_accuracy">{_num4(f)}</div>'
        f'<div class="detail">validation split</div></div>'
    )
    drop = "" if f is None or q is None else f"{q - f:+.4f} vs float"
    tone = "" if f is None or q is None else ("good" if q >= f - 0.01 else "bad")
    cards.append(
        f'<div class="card"><div class="label">ternary {name}</div>'
        f'<div class="value" data-field="ternary_accuracy">{_num4(q)}</div>'
        f'<div class="detail {tone}">{escape(drop)}</div></div>'
    )
    for key, value in report.items():  # e.g. post_training_accuracy from fine-tuning
        if (
            key.endswith("_accuracy")
            and key not in ("float_accuracy", "ternary_accuracy")
            and isinstance(value, (int, float))
        ):
            label = key[: -len("_accuracy")].replace("_", " ") + " accuracy"
            cards.append(
                f'<div class="card"><div class="label">{escape(label)}</div>'
                f'<div class="value" data-field="{escape(key)}">{_num4(value)}</div></div>'
            )
    return cards


def _num4(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}"


def _quantised(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (node, name, t)
        for node, entry in report.get("nodes", {}).items()
        for name, t in entry.get("tensors", {}).items()
        if t.get("quantized")
    ]


def _warnings(report: dict[str, Any]) -> list[str]:
    """Every note and warning of the run, as HTML list items."""
    items = [escape(n) for n in report.get("notes", [])]
    left = report.get("left_in_float") or {}
    for layer in report.get("float_layers", []):
        if layer["path"] in left:
            continue  # said below, with the reason
        items.append(
            f"<code>{escape(layer['path'])}</code> ({escape(layer['op'])}) stays in float: "
            f"{escape(layer['reason'])}"
        )
    for path, why in left.items():
        items.append(f"<code>{escape(path)}</code> stays in float: {escape(str(why))}")
    asserts = report.get("assertions")
    if isinstance(asserts, dict):
        for f in asserts.get("failures", []):
            where = f.get("module") or "the model"
            values = _assert_values(f)
            items.append(
                f"<span class='bad'>assertion at <code>{escape(str(f.get('assert')))}</code> fails on "
                f"{escape(str(where))}</span>{': ' + escape(values) if values else ''}"
                f"{' — ' + escape(str(f['message'])) if f.get('message') else ''}"
            )
    return items


def _assert_values(failure: dict[str, Any]) -> str:
    """`name = value, ...` of what a failed assertion read, numbers with 4 significant digits."""

    def show(v: Any) -> str:
        if isinstance(v, float):
            return _num(v)
        if isinstance(v, list):
            return "[" + ", ".join(show(x) for x in v[:6]) + (", …]" if len(v) > 6 else "]")
        return str(v)

    return ", ".join(f"{k} = {show(v)}" for k, v in (failure.get("values") or {}).items())


def _summary(report: dict[str, Any]) -> str:
    cards = _accuracy_cards(report)
    quantised = _quantised(report)
    nodes = {n for n, _, _ in quantised}
    cards.append(
        f'<div class="card"><div class="label">quantised</div><div class="value">{len(quantised)}</div>'
        f'<div class="detail">tensors in {len(nodes)} of {len(report.get("nodes", {}))} nodes</div></div>'
    )
    weights = [
        t["zero_fraction"]
        for _, name, t in quantised
        if name == "weight" and t.get("zero_fraction") is not None
    ]
    if weights:
        cards.append(
            f'<div class="card"><div class="label">weight zeros</div>'
            f'<div class="value">{100 * sum(weights) / len(weights):.1f}%</div>'
            f'<div class="detail">mean over {len(weights)} layers</div></div>'
        )
    asserts = report.get("assertions")
    if isinstance(asserts, dict) and asserts.get("checked"):
        failures = asserts.get("failures", [])
        failed = len({f.get("assert") for f in failures})  # one assertion may fail on several modules
        tone = "bad" if failed else "good"
        detail = f"hold; {len(failures)} failure{'s' if len(failures) != 1 else ''}" if failures else "hold"
        cards.append(
            f'<div class="card"><div class="label">assertions</div>'
            f'<div class="value {tone}">{max(asserts["checked"] - failed, 0)}/{asserts["checked"]}</div>'
            f'<div class="detail">{detail}</div></div>'
        )
    n_warn = len(_warnings(report))
    cards.append(
        f'<div class="card"><div class="label">notes</div><div class="value {"warn" if n_warn else ""}">'
        f'{n_warn}</div><div class="detail">{"see below" if n_warn else "nothing to report"}</div></div>'
    )
    return '<section class="cards">' + "".join(cards) + "</section>"


def _notes_section(report: dict[str, Any]) -> str:
    items = _warnings(report)
    asserts = report.get("assertions")
    if isinstance(asserts, dict) and asserts.get("checked") and not asserts.get("failures"):
        items.append(f"<span class='good'>all {asserts['checked']} assertions hold</span>")
    if not items:
        return ""
    return (
        '<h2 id="notes">Notes and warnings</h2><div class="panel"><ul class="notes">'
        + "".join(f"<li>{i}</li>" for i in items)
        + "</ul></div>"
    )


def _overview(report: dict[str, Any]) -> str:
    nodes = report.get("nodes", {})
    zeros = plots.layer_bars(nodes, "zero_fraction", "zero fraction (%)", percent=True)
    errors = plots.layer_bars(nodes, "rel_l2_error", "relative L2 error", percent=False)
    alone = {n: e["accuracy_alone"] for n, e in nodes.items() if e.get("accuracy_alone") is not None}
    lost = None
    if alone and report.get("float_accuracy") is not None:
        lost = plots.sensitivity_bars(
            list(alone), list(alone.values()), report["float_accuracy"], report.get("ternary_accuracy")
        )
    figs = []
    for title, uri, alt in (
        ("Accuracy lost with only this layer quantised", lost, "accuracy lost per layer alone"),
        ("Zero fraction per layer", zeros, "zero fraction per layer and tensor"),
        ("Quantisation error per layer", errors, "relative L2 error per layer and tensor"),
    ):
        if uri:
            figs.append(
                f'<div class="panel"><h3>{title}</h3><img class="plot" alt="{alt}" src="{uri}"></div>'
            )
    rows = []
    for node, entry in nodes.items():
        for name in _tensor_names(entry):
            t = entry["tensors"][name]
            if not t.get("quantized"):
                rows.append(
                    f'<tr><td><a href="#node-{escape(node)}">{escape(node)}</a></td><td>{escape(entry.get("op", ""))}</td>'
                    f'<td>{escape(name)}</td><td class="num" colspan="4">{_float_text(t)}</td></tr>'
                )
                continue
            rows.append(
                f'<tr><td><a href="#node-{escape(node)}">{escape(node)}</a></td><td>{escape(entry.get("op", ""))}</td>'
                f"<td>{escape(name)}</td>"
                + _cell(t.get("delta"), "delta", node, name, summary=True)
                + _cell(t.get("alpha") if t.get("scaling") else None, "alpha", node, name, summary=True)
                + _cell(t.get("zero_fraction"), "zero_fraction", node, name, percent=True)
                + _cell(t.get("rel_l2_error"), "rel_l2_error", node, name)
                + "</tr>"
            )
    table = (
        '<div class="panel"><table><thead><tr><th>node</th><th>op</th><th>tensor</th><th class="num">Δ</th>'
        '<th class="num">α</th><th class="num">zeros</th><th class="num">rel. L2 error</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )
    return '<h2 id="layers">Per layer</h2>' + "".join(figs) + table


def _tensor_names(entry: dict[str, Any]) -> list[str]:
    names = list(entry.get("tensors", {}))
    return sorted(names, key=lambda n: TENSOR_ORDER.index(n) if n in TENSOR_ORDER else len(TENSOR_ORDER))


def _float_text(t: dict[str, Any]) -> str:
    """A tensor left in float, with the reason when a rule wanted it quantised (`not_applied`)."""
    why = t.get("not_applied")
    return (
        "float" if not why else f"float <span class='rules' style='display:block'>{escape(str(why))}</span>"
    )


def _rules_cell(entry: dict[str, Any], tensor: str) -> str:
    """The rules that set `tensor`'s parameters (and the node's `name`), `param file:line` each."""
    rules = {p: w for p, w in (entry.get("rules") or {}).items() if p == "name" or p.startswith(tensor + "_")}
    if not rules:
        return '<td class="rules">no rule</td>'
    parts = [
        f"{escape(p)}&nbsp;<code title='{escape(where)}'>{escape(_short_where(where))}</code>"
        for p, where in rules.items()
    ]
    return '<td class="rules">' + " · ".join(parts) + "</td>"


def _short_where(where: str) -> str:
    """`/long/path/configs/x.tq:12` → `x.tq:12` (the full path is the title)."""
    path, _, line = where.rpartition(":")
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}" if path else where


def _layer(
    node: str,
    entry: dict[str, Any],
    report_float: float | None = None,
    failures: list[dict[str, Any]] | None = None,
) -> str:
    path = entry.get("path", node)
    where = "" if path == node else f' <span class="where">module <code>{escape(path)}</code></span>'
    calls = entry.get("calls_per_forward")
    if calls is not None and calls != 1:
        where += f' <span class="where">· called {calls}× per forward</span>'
    head = (
        f'<article class="panel layer" id="node-{escape(node)}"><h3>{escape(node)}'
        f'<span class="tag">{escape(entry.get("op", ""))}</span></h3>{where}'
    )
    if entry.get("accuracy_alone") is not None:
        a, f = entry["accuracy_alone"], report_float
        vs = "" if f is None else f" ({a - f:+.4f} vs float)"
        head += (
            f'<p class="where">accuracy with only this layer quantised: <span data-field="accuracy_alone" '
            f'data-node="{escape(node)}">{a:.4f}</span>{vs}</p>'
        )
    for f in failures or ():
        values = _assert_values(f)
        head += (
            f"<p class='bad'>assertion at <code>{escape(str(f.get('assert')))}</code> fails here"
            f"{': ' + escape(values) if values else ''}{' — ' + escape(str(f['message'])) if f.get('message') else ''}</p>"
        )
    if entry.get("left_in_float"):
        head += f'<p class="warn">stays in float: {escape(str(entry["left_in_float"]))}</p>'
    rows = []
    for name in _tensor_names(entry):
        t = entry["tensors"][name]
        if not t.get("quantized"):
            rows.append(
                f"<tr><td>{escape(name)}</td><td class='num' colspan='4'>{_float_text(t)}</td>"
                f"{_rules_cell(entry, name)}</tr>"
            )
            continue
        rows.append(
            f"<tr><td>{escape(name)}</td>"
            + _cell(t.get("delta"), "delta", node, name, summary=True)
            + _cell(t.get("alpha") if t.get("scaling") else None, "alpha", node, name, summary=True)
            + _cell(t.get("zero_fraction"), "zero_fraction", node, name, percent=True)
            + _cell(t.get("rel_l2_error"), "rel_l2_error", node, name)
            + _rules_cell(entry, name)
            + "</tr>"
        )
    table = (
        '<table><thead><tr><th>tensor</th><th class="num">Δ</th><th class="num">α</th><th class="num">zeros</th>'
        '<th class="num">rel. L2 error</th><th>set by</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )
    uri = plots.node_histograms({n: entry["tensors"][n] for n in _tensor_names(entry)})
    figure = (
        f'<img class="plot" alt="histograms of {escape(node)}: calibrated values with ±Δ and ±α" src="{uri}">'
        if uri
        else ""
    )
    return head + table + figure + "</article>"


def _failures_on(report: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The assertion failures report.json names for the module at `path`."""
    asserts = report.get("assertions")
    failures = asserts.get("failures", []) if isinstance(asserts, dict) else []
    return [f for f in failures if f.get("module") == path]


def _metrics_row(report: dict[str, Any]) -> str:
    """Every metric the evaluation measured, float → ternary."""
    f, q = report.get("float_metrics") or {}, report.get("ternary_metrics") or {}
    if not f and not q:
        return ""
    shown = ", ".join(f"{escape(k.replace('_', ' '))} {_num(f.get(k))} → {_num(q.get(k))}" for k in (f or q))
    return f"<tr><th>metrics</th><td>{shown} (float → ternary)</td></tr>"


def _run_section(report: dict[str, Any]) -> str:
    run = report.get("run") or {}
    rows = [r for r in (_metrics_row(report),) if r]
    for label, key in (
        ("model", "model"),
        ("checkpoint", "ckpt"),
        ("dataset", "dataset"),
        ("rules", "rules"),
    ):
        if key in run:
            value = run[key]
            rows.append(
                f"<tr><th>{label}</th><td><code>{escape(str(value) if value else '(none)')}</code></td></tr>"
            )
    cal = run.get("calibration")
    if cal:
        rows.append(
            f"<tr><th>calibration</th><td>{cal.get('samples')} samples in batches of {cal.get('batch_size')} "
            f"from the {escape(str(cal.get('split')))} split, seed {cal.get('seed')}"
            + (f"; scans: {escape(str(cal['scans']))}" if cal.get("scans") else "")
            + "</td></tr>"
        )
    constants = report.get("constants") or {}
    if constants:
        items = ", ".join(
            f"<code>{escape(k)} = {escape(str(c.get('value') if isinstance(c, dict) else c))}</code>"
            + (" (--set)" if isinstance(c, dict) and c.get("how") == "set" else "")
            for k, c in constants.items()
        )
        rows.append(f"<tr><th>constants</th><td>{items}</td></tr>")
    texts = "".join(
        f"<details><summary>{escape(path)}</summary><pre>{escape(text)}</pre></details>"
        for path, text in (run.get("rules_text") or {}).items()
    )
    tune = report.get("finetune")
    if isinstance(tune, dict):
        shown = ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in tune.items() if k != "history")
        rows.append(f"<tr><th>fine-tuning</th><td>{shown}</td></tr>")
    if not rows and not texts:
        return ""
    return (
        '<h2 id="run">Run</h2><div class="panel"><table class="run">'
        + "".join(rows)
        + "</table>"
        + texts
        + "</div>"
    )


def render_report(report: dict[str, Any]) -> str:
    """The whole page for `report` (report.json's content); layers in model order (their `index`)."""
    nodes = report.get("nodes", {})
    order = sorted(
        nodes, key=lambda n: nodes[n].get("index", len(nodes))
    )  # stable: no index keeps file order
    report = {**report, "nodes": {n: nodes[n] for n in order}}
    run = report.get("run") or {}
    subtitle = " · ".join(
        f"{label} <code>{escape(str(run[key]))}</code>"
        for label, key in (("model", "model"), ("rules", "rules"), ("dataset", "dataset"))
        if run.get(key)
    )
    constants = report.get("constants") or {}
    if constants:
        subtitle += " · " + ", ".join(
            f"<code>{escape(k)} = {escape(str(c.get('value') if isinstance(c, dict) else c))}</code>"
            for k, c in constants.items()
        )
    nodes = report.get("nodes", {})
    toc = (
        (
            '<nav class="toc">layers: '
            + " ".join(f'<a href="#node-{escape(n)}">{escape(n)}</a>' for n in nodes)
            + "</nav>"
        )
        if nodes
        else ""
    )
    body = [
        f'<header><h1>ternqc report</h1><p class="sub">{subtitle}</p>{toc}</header>',
        _summary(report),
        _notes_section(report),
        _overview(report),
        '<h2 id="histograms">Layers, in model order</h2>'
        '<p class="rules">Histograms of the float values each quantiser sees (weights and biases whole, inputs over '
        "the calibration batches): values inside the grey band become 0, the rest ±α. "
        "<span style='color:#c44e52'>Dashed red: ±Δ</span>, <span style='color:#8172b3'>dotted violet: ±α</span>; "
        "a weight with one Δ per channel is shown divided by its channel's Δ (the threshold at ±1). Counts on a log "
        "scale where one bin towers over the rest.</p>",
        *(
            _layer(n, e, report.get("float_accuracy"), _failures_on(report, e.get("path", n)))
            for n, e in nodes.items()
        ),
        _run_section(report),
        "<footer>Written by <code>ternqc report</code> from report.json.</footer>",
    ]
    title = f"ternqc report — {run.get('model', '')}".rstrip(" —")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(part for part in body if part)
        + "\n</main></body></html>\n"
    )
