"""sweep.html: the accuracy (and mean zero fraction) of every combination a sweep tried, as a plot and a
table, in one self-contained page (inline CSS, the plot as an SVG data URI, no script).

In: sweep.json's content (`run.sweep.sweep_document`). Out: the HTML text.
"""

from __future__ import annotations

import itertools
from html import escape
from typing import Any

from ternqc.runtime.report import plots
from ternqc.runtime.report.style import CSS


def _series(doc: dict[str, Any]) -> tuple[list[Any], dict[str, list[float]], dict[str, list[float | None]]]:
    """x = the first swept name's values; one series per combination of the other names' values."""
    names = list(doc["swept"])
    first, rest = names[0], names[1:]
    rows = doc["rows"]
    xs = list(dict.fromkeys(_key(r["values"][first]) for r in rows))
    acc: dict[str, list[float]] = {}
    zeros: dict[str, list[float | None]] = {}
    others = list(dict.fromkeys(tuple(_key(r["values"][n]) for n in rest) for r in rows))
    for combo in others:
        label = ", ".join(f"{n}={v}" for n, v in zip(rest, combo))
        by_x = {
            _key(r["values"][first]): r for r in rows if tuple(_key(r["values"][n]) for n in rest) == combo
        }
        acc[label] = [by_x[x]["ternary_accuracy"] if x in by_x else float("nan") for x in xs]
        zeros[label] = [by_x[x]["mean_zero_fraction"] if x in by_x else None for x in xs]
    return xs, acc, zeros


def _key(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _heatmap(doc: dict[str, Any], names: list[str]) -> str:
    """The zero fraction of every quantised tensor in every combination, as a heatmap panel."""
    rows = doc["rows"]
    tensors = list(dict.fromkeys(t for r in rows for t in r["zero_fractions"]))
    if not tensors or not rows:
        return ""
    columns = [", ".join(str(r["values"][n]) for n in names) for r in rows]
    values = [[r["zero_fractions"].get(t) for r in rows] for t in tensors]
    uri = plots.zero_heatmap(tensors, columns, values)
    label = ", ".join(names)
    return (
        f'<h2>Zeros per tensor</h2><div class="panel"><p class="rules">Columns: {escape(label)}; the share '
        f'of each quantised tensor that becomes 0.</p><img class="plot" alt="zero fraction per tensor and '
        f'combination" src="{uri}"></div>'
    )


def _assertions_cell(row: dict[str, Any]) -> str:
    failed = row.get("failed_assertions") or []
    if not failed:
        return '<td class="good">hold</td>'
    return f'<td class="bad" title="{escape(chr(10).join(failed))}">{len(failed)} failed</td>'


def render_sweep(doc: dict[str, Any]) -> str:
    """The whole page for `doc` (sweep.json's content)."""
    names = list(doc["swept"])
    rows = doc["rows"]
    best = max(range(len(rows)), key=lambda i: rows[i]["ternary_accuracy"]) if rows else None
    xs, acc, zeros = _series(doc)
    uri = plots.sweep_lines(xs, acc, zeros, xlabel=names[0], float_accuracy=doc.get("float_accuracy"))
    f = doc.get("float_accuracy")
    cards = [
        f'<div class="card"><div class="label">float accuracy</div>'
        f'<div class="value" data-field="float_accuracy">{f:.4f}</div></div>'
    ]
    if best is not None:
        b = rows[best]
        chosen = ", ".join(f"{n} = {b['values'][n]}" for n in names)
        cards.append(
            f'<div class="card"><div class="label">best ternary accuracy</div>'
            f'<div class="value">{b["ternary_accuracy"]:.4f}</div><div class="detail">{escape(chosen)}</div></div>'
        )
    cards.append(
        f'<div class="card"><div class="label">combinations</div><div class="value">{len(rows)}</div>'
        f'<div class="detail">{doc.get("calibrations", 1)} calibration(s)</div></div>'
    )
    head = "".join(f"<th>{escape(n)}</th>" for n in names) + (
        "<th></th>" if any(r.get("report") for r in rows) else ""
    )
    body = []
    for i, r in enumerate(rows):
        z = r["mean_zero_fraction"]
        cls = ' class="best"' if i == best else ""
        values = "".join(f"<td><code>{escape(str(r['values'][n]))}</code></td>" for n in names)
        if r.get("report"):  # the combination's own report, next to sweep.html
            values += f'<td><a href="{escape(r["report"])}">report</a></td>'
        elif any(row.get("report") for row in rows):
            values += "<td></td>"
        body.append(
            f"<tr{cls}>{values}"
            f'<td class="num" data-field="ternary_accuracy" data-row="{i}">{r["ternary_accuracy"]:.4f}</td>'
            f'<td class="num">{r["ternary_accuracy"] - f:+.4f}</td>'
            f'<td class="num" data-field="mean_zero_fraction" data-row="{i}">{"–" if z is None else f"{100 * z:.1f}%"}</td>'
            + (_assertions_cell(r) if doc.get("assertions") else "")
            + "</tr>"
        )
    checked = "<th>assertions</th>" if doc.get("assertions") else ""
    table = (
        f'<table><thead><tr>{head}<th class="num">ternary accuracy</th><th class="num">vs float</th>'
        f'<th class="num">mean zeros</th>{checked}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )
    run = " · ".join(
        f"{label} <code>{escape(str(doc[k]))}</code>"
        for label, k in (
            ("model", "model"),
            ("rules", "rules"),
            ("dataset", "dataset"),
            ("checkpoint", "ckpt"),
        )
        if doc.get(k)
    )
    notes = "".join(f"<li>{escape(n)}</li>" for n in doc.get("notes", []))
    swept = "; ".join(f"{escape(n)} ∈ {{{escape(', '.join(map(str, v)))}}}" for n, v in doc["swept"].items())
    parts = [
        f'<header><h1>ternqc sweep</h1><p class="sub">{run}</p><p class="sub">{swept}: '
        f"{len(list(itertools.product(*doc['swept'].values())))} combinations</p></header>",
        '<section class="cards">' + "".join(cards) + "</section>",
        f'<h2>Accuracy against {escape(names[0])}</h2><div class="panel"><img class="plot" '
        f'alt="accuracy and mean zero fraction against {escape(names[0])}" src="{uri}"></div>',
        f'<h2>Every combination</h2><div class="panel">{table}</div>',
        _heatmap(doc, names),
        f'<h2>Notes</h2><div class="panel"><ul class="notes">{notes}</ul></div>' if notes else "",
        "<footer>Written by <code>ternqc sweep</code>; the numbers are in sweep.json and sweep.csv. The mean zero "
        "fraction is the unweighted mean over the quantised tensors.</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><title>ternqc sweep</title>'
        f"<style>{CSS}tr.best td {{ background: #eef6ee; }}</style></head>\n<body><main>\n"
        + "\n".join(p for p in parts if p)
        + "\n</main></body></html>\n"
    )
