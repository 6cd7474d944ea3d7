"""The report's figures, drawn with matplotlib (Agg) and returned as SVG data URIs for `<img src=...>`.

In: plain data from report.json / sweep.json. Out: `data:image/svg+xml;base64,...` strings. Text stays text
in the SVG (`svg.fonttype = none`), so the figures are small and sharp at any zoom.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from ternqc.runtime.errors import UserError

#: One colour per tensor, the same in every figure.
TENSOR_COLOURS = {"data_in": "#4c72b0", "weight": "#dd8452", "bias": "#55a868"}
DELTA_COLOUR = "#c44e52"
ALPHA_COLOUR = "#8172b3"
_STYLE = {
    "svg.fonttype": "none",
    "font.size": 8,
    "font.family": "sans-serif",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#888888",
    "axes.titlesize": 9,
    "axes.titleweight": "bold",
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "svg.hashsalt": "ternqc",  # the same figure gives the same bytes
}


def require_matplotlib() -> None:
    """Raise a `UserError` saying how to install matplotlib when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        msg = (
            "the HTML report needs matplotlib, which is not installed: pip install 'ternqc[report]' "
            "(or pip install matplotlib)"
        )
        raise UserError(msg) from exc


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _data_uri(fig: Any, *, tight: bool = False) -> str:
    """The figure as an SVG data URI; `tight` crops to what is drawn (a legend outside the axes), at the cost
    of drawing twice."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _values(v: Any) -> list[float]:
    """Δ or α from report.json as a list of floats: a scalar, or a `{values, mean, min, max}` summary's three."""
    if v is None:
        return []
    if isinstance(v, dict):
        return [v["min"], v["mean"], v["max"]]
    return [float(v)]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return f"{v['mean']:.3g} (mean of {v['values']})"
    return f"{v:.3g}"


def _histogram_panel(ax: Any, tensor: str, t: dict[str, Any]) -> None:
    if t.get("histogram_over_delta"):  # per-channel Δ: each value over its own Δ, the threshold at ±1
        t = {**t, "histogram": t["histogram_over_delta"], "delta": 1.0, "scaling": False, "per_channel": True}
    h = t["histogram"]
    counts = h["counts"]
    n = len(counts)
    lo, hi = h["lo"], h["hi"]
    width = (hi - lo) / n if n else 1.0
    edges = [lo + i * width for i in range(n + 1)]
    colour = TENSOR_COLOURS.get(tensor, "#4c72b0")
    ax.stairs(counts, edges, fill=True, color=colour, alpha=0.85, linewidth=0)
    nonzero = [c for c in counts if c > 0]
    if nonzero and max(nonzero) > 10 * (sum(nonzero) / len(nonzero)):
        from matplotlib.ticker import NullFormatter

        ax.set_yscale("log")  # a spike (e.g. the zeros of a ReLU's output) would flatten the rest
        ax.yaxis.set_minor_formatter(NullFormatter())
    deltas = _values(t.get("delta"))
    if deltas:
        d_lo, d_hi = min(deltas), max(deltas)
        d_mean = deltas[1] if len(deltas) == 3 else deltas[0]
        ax.axvspan(-d_lo, d_lo, color="#999999", alpha=0.18, linewidth=0)  # always zero
        if d_hi > d_lo:  # per-channel Δ: the band where some channels zero a value
            for sign in (-1, 1):
                ax.axvspan(sign * d_lo, sign * d_hi, color=DELTA_COLOUR, alpha=0.12, linewidth=0)
        for sign in (-1, 1):
            ax.axvline(sign * d_mean, color=DELTA_COLOUR, linestyle="--", linewidth=1.2)
    alphas = _values(t.get("alpha")) if t.get("scaling") else []
    if alphas:
        a = alphas[0] if len(alphas) == 1 else alphas[1]
        for sign in (-1, 1):
            ax.axvline(sign * a, color=ALPHA_COLOUR, linestyle=":", linewidth=1.4)
    zeros = t.get("zero_fraction")
    title = f"{tensor} / Δ of its channel" if t.get("per_channel") else f"{tensor}   Δ={_fmt(t.get('delta'))}"
    if t.get("scaling"):
        title += f"   α={_fmt(t.get('alpha'))}"
    ax.set_title(title, loc="left")
    sub = [] if zeros is None else [f"zeros {zeros:.1%}"]
    if t.get("rel_l2_error") is not None:
        sub.append(f"rel. L2 error {t['rel_l2_error']:.3f}")
    ax.set_xlabel("   ".join(sub) if sub else "value", color="#444444")
    ax.set_ylabel("count")
    span = max(abs(h["min"]), abs(h["max"]), *(d for d in deltas), *(a for a in alphas), 1e-12)
    ax.set_xlim(
        min(h["min"], -max(deltas or [0])) - 0.03 * span, max(h["max"], max(deltas or [0])) + 0.03 * span
    )


def node_histograms(tensors: dict[str, dict[str, Any]]) -> str | None:
    """One panel per quantised tensor of a node that has a histogram; `None` when none has one."""
    shown = [
        (name, t)
        for name, t in tensors.items()
        if t.get("quantized") and t.get("histogram", {}).get("counts")
    ]
    if not shown:
        return None
    plt = _pyplot()
    with plt.rc_context(_STYLE):
        width = 3.7 * len(shown)
        fig, axes = plt.subplots(1, len(shown), figsize=(width, 2.5), squeeze=False)
        # fixed margins (in inches) instead of tight_layout: laying out by measuring text doubles the cost
        fig.subplots_adjust(
            left=0.62 / width, right=1 - 0.15 / width, bottom=0.5 / 2.5, top=1 - 0.3 / 2.5, wspace=0.32
        )
        for ax, (name, t) in zip(axes[0], shown):
            _histogram_panel(ax, name, t)
        return _data_uri(fig)


def layer_bars(nodes: dict[str, dict[str, Any]], field: str, label: str, *, percent: bool) -> str | None:
    """A grouped bar chart: one group per node (model order), one bar per quantised tensor, of `field`
    (`zero_fraction` or `rel_l2_error`); `None` when no tensor has the field."""
    tensors = [
        t
        for t in TENSOR_COLOURS
        if any(n["tensors"].get(t, {}).get(field) is not None for n in nodes.values())
    ]
    if not tensors:
        return None
    names = list(nodes)
    plt = _pyplot()
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(9.0, 2.5))
        width = 0.8 / len(tensors)
        for k, t in enumerate(tensors):
            xs, ys = [], []
            for i, node in enumerate(names):
                v = nodes[node]["tensors"].get(t, {}).get(field)
                if v is not None and math.isfinite(v):
                    xs.append(i - 0.4 + (k + 0.5) * width)
                    ys.append(100 * v if percent else v)
            ax.bar(xs, ys, width=width * 0.92, color=TENSOR_COLOURS[t], label=t)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(
            names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
        )
        ax.set_ylabel(label)
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.legend(frameon=False, ncol=len(tensors), loc="lower right", bbox_to_anchor=(1, 1.0), fontsize=7)
        fig.tight_layout()
        return _data_uri(fig)


def sweep_lines(
    xs: Sequence[Any],
    series: dict[str, Sequence[float]],
    zeros: dict[str, Sequence[float]],
    *,
    xlabel: str,
    float_accuracy: float | None,
) -> str:
    """Accuracy (left axis, one line per series) and mean zero fraction (right axis, dashed) against the swept
    values `xs`; numeric `xs` on a numeric axis, others as categories."""
    plt = _pyplot()
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    pos = list(xs) if numeric else list(range(len(xs)))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(8.6, 3.4))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (name, ys) in enumerate(series.items()):
            # later series thinner and smaller, so one that coincides with an earlier one leaves it visible
            ax.plot(
                pos,
                ys,
                marker="o",
                color=colours[i % len(colours)],
                linewidth=max(0.8, 2.4 - 0.6 * i),
                markersize=max(2.5, 7 - 1.5 * i),
                label=f"accuracy{(' ' + name) if name else ''}",
            )
        if float_accuracy is not None:
            ax.axhline(float_accuracy, color="#333333", linestyle=":", linewidth=1, label="float accuracy")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy")
        if not numeric:
            ax.set_xticks(pos)
            ax.set_xticklabels([str(x) for x in xs])
        ax.grid(color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        right = ax.twinx()
        right.spines["right"].set_visible(True)
        for i, (name, zs) in enumerate(zeros.items()):
            # one series: the zeros in their own colour; several: each in its accuracy line's colour, dashed
            colour = "#999999" if len(zeros) == 1 else colours[i % len(colours)]
            right.plot(
                pos,
                [100 * z if z is not None else math.nan for z in zs],
                marker="s",
                markersize=3,
                linestyle="--",
                color=colour,
                alpha=0.8,
                label=f"mean zeros{(' ' + name) if name else ''}",
            )
        right.set_ylabel("mean zero fraction (%)")
        lines = ax.get_legend_handles_labels()
        extra = right.get_legend_handles_labels()
        ax.legend(
            lines[0] + extra[0],
            lines[1] + extra[1],
            frameon=False,
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.1, 1.0),
        )
        return _data_uri(fig, tight=True)


def zero_heatmap(
    rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float | None]]
) -> str:
    """A heatmap of zero fractions: one row per quantised tensor (`node.tensor`), one column per swept
    combination, each cell annotated in percent when the grid is small enough to read."""
    plt = _pyplot()
    import numpy as np

    grid = np.array([[math.nan if v is None else 100 * v for v in row] for row in values], dtype=float)
    with plt.rc_context(_STYLE):
        height = 0.8 + 0.24 * len(rows)
        width = 2.4 + 0.75 * len(columns)
        fig, ax = plt.subplots(figsize=(max(5.0, width), height))
        image = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=100)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(
            columns, rotation=30 if len(columns) > 6 else 0, ha="right" if len(columns) > 6 else "center"
        )
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if grid.size <= 400:
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if not math.isnan(grid[i, j]):
                        ax.text(
                            j,
                            i,
                            f"{grid[i, j]:.0f}",
                            ha="center",
                            va="center",
                            fontsize=6.5,
                            color="white" if grid[i, j] > 55 else "#1f2430",
                        )
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="zeros (%)")
        fig.tight_layout()
        return _data_uri(fig)


def sensitivity_bars(
    names: Sequence[str], accuracies: Sequence[float], float_accuracy: float, ternary_accuracy: float | None
) -> str:
    """Per node, the accuracy lost (vs float) with only that node quantised; the whole model's loss dashed."""
    plt = _pyplot()
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(9.0, 2.5))
        drops = [100 * (float_accuracy - a) for a in accuracies]
        ax.bar(range(len(names)), drops, width=0.6, color="#c44e52")
        if ternary_accuracy is not None:
            ax.axhline(
                100 * (float_accuracy - ternary_accuracy),
                color="#333333",
                linestyle="--",
                linewidth=1,
                label="every layer quantised",
            )
            ax.legend(frameon=False, fontsize=7, loc="lower right", bbox_to_anchor=(1, 1.0))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(
            names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
        )
        ax.set_ylabel("accuracy lost (points)")
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        fig.tight_layout()
        return _data_uri(fig)
