"""Training curves (loss, learning rate, throughput) drawn from the journal into one PNG.

matplotlib is imported when a figure is drawn, so training without tracking runs where it is not installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def metric_history(records: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] sorted by step; a step logged again (after a resume) keeps the last value."""
    by_name: dict[str, dict[int, float]] = {}
    for record in records:
        if record["kind"] == "metrics":
            for name, value in record["values"].items():
                by_name.setdefault(name, {})[record["step"]] = value
    return {name: sorted(points.items()) for name, points in by_name.items()}


def draw_curves(history: dict[str, list[tuple[int, float]]], names: Iterable[str], out: Path) -> Path:
    """One panel per metric name (step on x); a metric never logged gets an empty panel saying so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(names)
    if not names:
        raise ValueError("draw_curves needs at least one metric name")
    figure = Figure(figsize=(5 * len(names), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        axes.set_title(name)
        axes.set_xlabel("step")
        points = history.get(name, [])
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, linewidth=1.2)
            axes.grid(alpha=0.3)
        else:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out
