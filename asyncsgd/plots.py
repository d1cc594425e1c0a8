"""Plots of finished runs, read back from their `metrics.jsonl` (used by experiments and notebooks).

Matplotlib is imported lazily, with the non-interactive Agg backend outside notebooks (a notebook's
inline backend is left alone, so figures returned with `path=None` display there).
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Mapping, Optional, Sequence


def read_metrics(path: str) -> list[dict]:
    """The records of a `metrics.jsonl` file (a run folder or the file itself); lines cut short by
    a killed run are skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def eval_curve(records: Sequence[dict]) -> tuple[list[float], list[float], list[int]]:
    """`(time_s, test_accuracy, step)` of every test evaluation, in order; the time is on the run's
    clock (older runs have only `wall_time_s`)."""
    evals = [r for r in records if r.get("event") == "eval"]
    return ([r.get("time_s", r["wall_time_s"]) for r in evals], [r["test_accuracy"] for r in evals],
            [r["step"] for r in evals])


def clock_label(run: str) -> str:
    """The x-axis label of a run's training time: wall-clock, or simulated with its profile."""
    try:
        with open(os.path.join(run if os.path.isdir(run) else os.path.dirname(run), "summary.json"),
                  encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return "wall-clock training time (s)"
    if summary.get("clock") == "simulated":
        return f"SIMULATED training time (s), profile {(summary.get('profile') or {}).get('name', '?')}"
    return "wall-clock training time (s)"


def _pyplot():
    import sys

    import matplotlib
    if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")  # scripts and tests; a notebook keeps its inline backend
    import matplotlib.pyplot as plt
    return plt


def _ticker():
    import matplotlib.ticker
    return matplotlib.ticker


def _finish(plt, fig, path: Optional[str]):
    """Lays the figure out; saves it to `path` and closes it (a script), or returns it open (a notebook)."""
    fig.tight_layout()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
    return fig


def plot_accuracy(runs: Mapping[str, str], path: Optional[str], title: str = "",
                  target: Optional[float] = None, x: str = "time"):
    """Test accuracy against training time on the runs' clock (`x="time"`: wall-clock, or simulated,
    labelled as such with the profile) or training steps (`x="steps"`), one line per run.

    Args:
      runs: label -> run folder (or metrics.jsonl path).
      path: where to save the PNG (None: do not save).
      target: draw this accuracy as a dashed line.
    Returns:
      The matplotlib figure.
    """
    plt = _pyplot()
    many = len(runs) > 8
    fig, ax = plt.subplots(figsize=(9.5 if many else 7, 4.4), dpi=110)
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10").colors
    for index, (label, run) in enumerate(runs.items()):
        times, accuracies, steps = eval_curve(read_metrics(run))
        if accuracies:
            ax.plot(times if x == "time" else steps, [100 * a for a in accuracies], marker="o", markersize=3,
                    label=label, color=colors[index % len(colors)], linestyle="-" if index % 2 == 0 else "--")
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.0f}%")
    labels = {clock_label(run) for run in runs.values()}
    ax.set_xlabel((" / ".join(sorted(labels))) if x == "time" else "training steps")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(alpha=0.3)
    if many:  # beside the axes, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    return _finish(plt, fig, path)


def plot_staleness(staleness: Mapping[str, Mapping[str, dict]], path: Optional[str], title: str = ""):
    """Staleness histograms: one panel per run (label -> a summary's `staleness`), one line per stage.

    Runs without staleness (synchronous trainers) are left out."""
    plt = _pyplot()
    runs = {label: stages for label, stages in staleness.items()
            if any(s.get("max", 0) > 0 for s in stages.values())}
    if not runs:
        runs = dict(list(staleness.items())[:1])
    cols = min(3, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=100, squeeze=False)
    for ax, (label, stages) in zip(axes.flat, runs.items()):
        width = 0.8 / max(1, len(stages))
        for k, (stage, stats) in enumerate(stages.items()):  # grouped bars: one per stage per staleness
            hist = {int(key): v for key, v in stats.get("histogram", {}).items()}
            if hist:
                xs = list(range(max(hist) + 1))
                ax.bar([x - 0.4 + width * (k + 0.5) for x in xs], [hist.get(x, 0) / stats["count"] for x in xs],
                       width=width, label=stage)
        ax.set_title(label, fontsize=9)
        ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
        ax.set_xlabel("staleness (versions)")
        ax.set_ylabel("fraction of updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _finish(plt, fig, path)
