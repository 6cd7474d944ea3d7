"""`ternqc report DIR`: read DIR/report.json, write DIR/report.html (or a sweep's sweep.json → sweep.html).

In: a folder `ternqc apply` or `ternqc sweep` wrote (or a report.json / sweep.json). Out: the page's path.
"""

from __future__ import annotations

import json
import os

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_write_text
from ternqc.runtime.report.plots import require_matplotlib


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        msg = f"no report.json at {path}: run `ternqc apply --out DIR` (or `ternqc sweep`) first"
        raise UserError(msg) from exc
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = f"{path} is not JSON: {exc}"
        raise UserError(msg) from exc


def read_report(path: str) -> dict:
    """report.json's content.

    Raises:
        UserError: the file is missing, unreadable or not a report.
    """
    report = _read_json(path)
    if not isinstance(report, dict) or not isinstance(report.get("nodes"), dict):
        msg = f"{path} is not a ternqc report (no 'nodes')"
        raise UserError(msg)
    return report


def write_report(folder: str, output: str | None = None) -> str:
    """Render `folder`/report.json as `output` (default `folder`/report.html); a sweep's folder (sweep.json,
    no report.json) as sweep.html. Return the path written.

    Raises:
        UserError: matplotlib is missing, the report cannot be read, or the page cannot be written.
    """
    require_matplotlib()
    from ternqc.runtime.report.page import render_report
    from ternqc.runtime.report.sweep_page import render_sweep

    source = folder if folder.endswith(".json") else os.path.join(folder, "report.json")
    sweep = os.path.join(folder, "sweep.json")
    if source.endswith("sweep.json") or (not os.path.exists(source) and os.path.exists(sweep)):
        source = sweep if not source.endswith("sweep.json") else source
        doc = _read_json(source)
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not doc.get("swept"):
            msg = f"{source} is not a ternqc sweep (no 'rows' and 'swept')"
            raise UserError(msg)
        target = output or os.path.join(os.path.dirname(source), "sweep.html")
        text = render_sweep(doc)
    else:
        report = read_report(source)
        target = output or os.path.join(os.path.dirname(source), "report.html")
        text = render_report(report)
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        msg = f"cannot write {target}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    return target
