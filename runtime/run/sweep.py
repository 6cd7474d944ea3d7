"""`ternqc sweep`: one calibration, then map → convert → evaluate for every combination of swept values.

In: the float model, one plan per combination (compiled elsewhere from the rules with that combination's
`--set` values: the runtime never parses rules) and the run settings. Out: a `SweepResult` (per combination its
values, accuracy, zero fractions) and `write_sweep` puts `sweep.csv`, `sweep.json` and `sweep.html` in a folder.

Statistics depend on the profile points and the calibration settings, not on the constants the bindings
use, so combinations whose plans profile the same statistics on the same batches share one calibration (a
swept value the profile itself reads gets a calibration per distinct value). Each combination then runs
exactly what `ternqc apply` runs after calibrating (`pipeline.apply(..., profiled=...)`) on a fresh copy of
the float model, so its accuracy is the accuracy `apply` gives with that value written into the rules.
Under `--workers N` / torchrun every process runs this; calibration and the activation-scale pass are sharded.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import attrs
from attrs import frozen
from torch import nn

from ternqc.plan import Plan
from ternqc.runtime.io.atomic import atomic_write_text
from ternqc.runtime.run import pipeline


@frozen
class SweepRow:
    """One combination: the swept values (`{name: value}`), its accuracy and the zero fraction of every
    quantised tensor (`{"node.tensor": fraction}`) with their unweighted mean."""

    values: dict[str, Any]
    ternary_accuracy: float
    mean_zero_fraction: float | None
    zero_fractions: dict[str, float]
    failed_assertions: tuple[str, ...] = ()  # the rules' assertions that do not hold, as messages
    report: dict[str, Any] | None = None  # the combination's report.json content (`--reports`)

    def to_dict(self) -> dict[str, Any]:
        """sweep.json's row (without the report, which goes to its own folder)."""
        return attrs.asdict(self, filter=lambda a, _v: a.name != "report")


@frozen
class SweepResult:
    float_accuracy: float
    rows: tuple[SweepRow, ...]
    calibrations: int  # how many calibrations the sweep ran (1 unless a swept value changes the profile)
    notes: tuple[str, ...]
    assertions: int = 0  # how many assertions the rules hold (checked in every combination)
    sources: tuple[str, ...] = ()  # the plans' rules files, the root first (one file, other --set values)


def zero_fractions(report: dict[str, Any]) -> dict[str, float]:
    """`{"node.tensor": zero fraction}` of every quantised tensor of a report.json that has one."""
    out = {}
    for node, entry in report["nodes"].items():
        for tensor, t in entry["tensors"].items():
            if t.get("quantized") and t.get("zero_fraction") is not None:
                out[f"{node}.{tensor}"] = t["zero_fraction"]
    return out


def _profile_key(plan: Plan) -> str:
    d = plan.to_dict()
    return json.dumps([d["calibration"], d["profile"]], sort_keys=True)


def run_sweep(
    model: nn.Module,
    plans: Sequence[tuple[dict[str, Any], Plan]],
    settings: pipeline.RunSettings,
    *,
    reports: bool = False,
) -> SweepResult:
    """Calibrate `model` once per distinct profile, then apply each `(values, plan)` to a copy of it.

    `model` itself stays in float. With `reports`, every row keeps its full report (with input histograms, one
    more pass per combination). Raises what `pipeline.apply` raises (a `UserError` names the problem).
    """
    settings = attrs.evolve(settings, report_histograms=reports)
    profiled: dict[str, tuple[pipeline.RunData, pipeline.ProfileResult]] = {}
    rows, notes, float_acc, asserts = [], [], None, 0
    sharing: dict[str, list[Plan]] = {}
    for _, plan in plans:
        sharing.setdefault(_profile_key(plan), []).append(plan)
    for values, plan in plans:
        key = _profile_key(plan)
        if key not in profiled:
            data = pipeline.dataset_data(plan, settings, evaluation=True)
            profiled[key] = data, pipeline.profile(model, plan, settings, data, derived=True, sharing=sharing[key])
            notes.extend(n for n in profiled[key][1].notes if n not in notes)
        data, stats = profiled[key]
        result = pipeline.apply(copy.deepcopy(model), plan, settings, data=data, profiled=stats)
        float_acc = result.float_accuracy
        zeros = zero_fractions(result.report)
        mean = sum(zeros.values()) / len(zeros) if zeros else None
        failed = tuple(f.render() for f in result.assert_failures)
        notes.extend(w for w in result.warnings if w not in notes)
        asserts = max(asserts, len(plan.asserts))
        rows.append(
            SweepRow(
                dict(values), result.ternary_accuracy, mean, zeros, failed, result.report if reports else None
            )
        )
    sources = plans[0][1].sources if plans else ()
    return SweepResult(float_acc, tuple(rows), len(profiled), tuple(notes), asserts, sources)


def sweep_worker(
    plans: list[tuple[dict[str, Any], dict]],
    settings: pipeline.RunSettings,
    reports: bool = False,
) -> SweepResult:
    """`run_sweep` in every process of a `--workers N` or torchrun job; plans as `(values, Plan.to_dict())`."""
    from ternqc.runtime.run.collectives import broadcast_model_

    model = broadcast_model_(pipeline.load_model(settings))
    return run_sweep(
        model, [(v, Plan.from_dict(p)) for v, p in plans], settings, reports=reports
    )


def folder_name(values: dict[str, Any]) -> str:
    """The folder of a combination's report: `k=0.5,n=32`, characters a file name should not hold as `_`."""
    text = ",".join(f"{k}={v}" for k, v in values.items())
    return "".join(c if c.isalnum() or c in "._=,-+" else "_" for c in text)


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def sweep_document(
    result: SweepResult, swept: dict[str, list[Any]], settings: pipeline.RunSettings
) -> dict[str, Any]:
    """sweep.json's content: the run (`rules`: the root rules file of the plans), the swept names and values,
    the float accuracy and one row per combination."""
    return {
        "rules": result.sources[0] if result.sources else None,
        "model": settings.model,
        "ckpt": settings.ckpt,
        "dataset": settings.dataset,
        "seed": settings.seed,
        "swept": swept,
        "float_accuracy": result.float_accuracy,
        "calibrations": result.calibrations,
        "assertions": result.assertions,
        "notes": list(result.notes),
        "rows": [
            {
                **r.to_dict(),
                **({"report": f"{folder_name(r.values)}/report.html"} if r.report is not None else {}),
            }
            for r in result.rows
        ],
    }


def sweep_table(doc: dict[str, Any]) -> list[list[str]]:
    """The table printed and written to sweep.csv: one column per swept name, then the results."""
    names = list(doc["swept"])
    checked = doc.get("assertions", 0)
    header = [*names, "ternary_accuracy", "vs_float", "mean_zero_fraction"] + (
        ["assertions"] if checked else []
    )
    rows = [header]
    for r in doc["rows"]:
        z = r["mean_zero_fraction"]
        held = (
            [f"{len(r['failed_assertions'])} failed" if r["failed_assertions"] else "hold"] if checked else []
        )
        rows.append(
            [
                *(str(r["values"][n]) for n in names),
                f"{r['ternary_accuracy']:.4f}",
                f"{r['ternary_accuracy'] - doc['float_accuracy']:+.4f}",
                "" if z is None else f"{z:.4f}",
                *held,
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def write_sweep(out_dir: str, doc: dict[str, Any], result: SweepResult | None = None) -> list[str]:
    """Write `sweep.csv`, `sweep.json` and `sweep.html` into `out_dir`, and for every row of `result` that kept
    its report, `<folder_name>/report.json` and `report.html`; return the paths written."""
    import os

    from ternqc.runtime.report.page import render_report
    from ternqc.runtime.report.sweep_page import render_sweep

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for row in result.rows if result is not None else ():
        if row.report is None:
            continue
        folder = os.path.join(out_dir, folder_name(row.values))
        os.makedirs(folder, exist_ok=True)
        text = json.dumps(pipeline._finite(row.report), indent=2) + "\n"  # as `apply` writes it: NaN as null
        atomic_write_text(os.path.join(folder, "report.json"), text)
        atomic_write_text(os.path.join(folder, "report.html"), render_report(row.report))
        written.append(os.path.join(folder, "report.html"))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(sweep_table(doc))
    paths = [os.path.join(out_dir, n) for n in ("sweep.csv", "sweep.json", "sweep.html")]
    atomic_write_text(paths[0], buf.getvalue())
    atomic_write_text(paths[1], json.dumps(doc, indent=2) + "\n")
    atomic_write_text(paths[2], render_sweep(doc))
    return paths + written
