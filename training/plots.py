"""Loss-curve PNGs (matplotlib, headless Agg backend), written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .files import atomic_write


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_loss_curve(
    path: str | os.PathLike,
    curves: Mapping[str, Sequence[float]],
    title: str = "training loss",
    xlabel: str = "step",
    ylabel: str = "loss",
    log_y: bool = True,
    points: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> None:
    """Plot one or more loss curves (step i+1 -> value i) with a moving average, as a PNG.

    ``curves`` maps a legend label to its per-step values; ``points`` a label to sparse ``(step, value)``
    series (the validation loss), drawn as markers joined by lines; empty ones are left out."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in a server thread

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for label, values in curves.items():
        if not values:
            continue
        steps = range(1, len(values) + 1)
        window = max(1, len(values) // 25)
        if window > 1:
            line = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
            ax.plot(steps, smoothed(values, window), color=line.get_color(), label=f"{label} (mean of {window})")
        else:
            ax.plot(steps, values, label=label)
    sparse: dict[str, Any] = {label: series for label, series in (points or {}).items() if series}
    for label, series in sparse.items():
        ax.plot([s for s, _ in series], [v for _, v in series], marker="o", markersize=4, label=label)
    values = [v for series in curves.values() for v in series] + [v for ss in sparse.values() for _, v in ss]
    if log_y and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(curves.values()) or sparse:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
