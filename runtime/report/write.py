"""`ternqc report DIR`: read DIR/report.json, write DIR/report.html.

In: a folder `ternqc apply` wrote (or any report.json). Out: the page's path.
"""

from __future__ import annotations

import json
import os

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_write_text
from ternqc.runtime.report.plots import require_matplotlib


def read_report(path: str) -> dict:
    """report.json's content.

    Raises:
        UserError: the file is missing, unreadable or not a report.
    """
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError as exc:
        msg = f"no report.json at {path}: run `ternqc apply --out DIR` first"
        raise UserError(msg) from exc
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    except json.JSONDecodeError as exc:
        msg = f"{path} is not JSON: {exc}"
        raise UserError(msg) from exc
    if not isinstance(report, dict) or not isinstance(report.get("nodes"), dict):
        msg = f"{path} is not a ternqc report (no 'nodes')"
        raise UserError(msg)
    return report


def write_report(folder: str, output: str | None = None) -> str:
    """Render `folder`/report.json as `output` (default `folder`/report.html); return the path written.

    Raises:
        UserError: matplotlib is missing, the report cannot be read, or the page cannot be written.
    """
    require_matplotlib()
    from ternqc.runtime.report.page import render_report

    source = folder if folder.endswith(".json") else os.path.join(folder, "report.json")
    report = read_report(source)
    target = output or os.path.join(os.path.dirname(source), "report.html")
    text = render_report(report)
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        msg = f"cannot write {target}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    return target
