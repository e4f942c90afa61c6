"""Line plots (loss curves, training comparisons) with matplotlib's Agg canvas, written atomically.

Why matplotlib: axes, ticks, log scales and legends are its job; drawing them by hand gave worse
plots for more code. The object API (Figure + FigureCanvasAgg) is used instead of pyplot, so no
global backend or figure state is touched and nothing needs a display.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from d2c.fsutil import atomic_write

#: (label, xs, ys, matplotlib colour)
Curve = tuple[str, Sequence[float], Sequence[float], str]
#: (title, curves): one subplot
Panel = tuple[str, list[Curve]]


def _wants_log(curves: list[Curve]) -> bool:
    """Logarithmic when every finite value is positive and they span more than a factor 30."""
    values = [y for _l, _xs, ys, _c in curves for y in ys if math.isfinite(y)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 30


def plot_panels(path: str | Path, panels: list[Panel], *, xlabel: str = "iteration", ylabel: str = "loss",
                log_y: bool | None = None, size: tuple[float, float] = (9.6, 5.4)) -> None:
    """One PNG with a subplot per panel stacked vertically; `size` is one panel's (width, height)
    in inches at 100 dpi. `log_y` None: per panel, see _wants_log. Non-finite points are gaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0], size[1] * len(panels)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, curves) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, color="0.9")
        if not any(math.isfinite(y) for _l, _xs, ys, _c in curves for y in ys):
            ax.text(0.5, 0.5, "no finite values to plot", transform=ax.transAxes, ha="center", color="tab:red")
            continue
        if _wants_log(curves) if log_y is None else log_y:
            ax.set_yscale("log")
        for k, (label, xs, ys, color) in enumerate(curves):
            wide = k == 0 and len(curves) > 1          # the first curve wide, so overlaps stay visible
            ax.plot(xs, [y if math.isfinite(y) else math.nan for y in ys], color=color, label=label,
                    linewidth=4 if wide else 1.5, marker="o" if len(xs) <= 60 else None, markersize=5 if wide else 3)
        ax.legend(loc="best", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def plot_curves(path: str | Path, curves: list[Curve], *, title: str, xlabel: str = "iteration",
                ylabel: str = "loss", log_y: bool | None = None) -> None:
    """A single-panel line plot (see plot_panels)."""
    plot_panels(path, [(title, curves)], xlabel=xlabel, ylabel=ylabel, log_y=log_y)
