"""Plots of finished runs, read back from their `metrics.jsonl` (used by experiments and notebooks).

Matplotlib is imported lazily with the non-interactive Agg backend unless a backend is already
chosen (a notebook's inline backend is left alone).
"""

from __future__ import annotations

import json
import os
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
    """`(wall_time_s, test_accuracy, step)` of every test evaluation, in order."""
    evals = [r for r in records if r.get("event") == "eval"]
    return ([r["wall_time_s"] for r in evals], [r["test_accuracy"] for r in evals], [r["step"] for r in evals])


def _pyplot():
    import matplotlib
    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(runs: Mapping[str, str], path: Optional[str], title: str = "",
                  target: Optional[float] = None, x: str = "time"):
    """Test accuracy against wall-clock seconds (`x="time"`) or training steps (`x="steps"`), one
    line per run.

    Args:
      runs: label -> run folder (or metrics.jsonl path).
      path: where to save the PNG (None: do not save).
      target: draw this accuracy as a dashed line.
    Returns:
      The matplotlib figure.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, run in runs.items():
        times, accuracies, steps = eval_curve(read_metrics(run))
        if accuracies:
            ax.plot(times if x == "time" else steps, [100 * a for a in accuracies], marker="o", markersize=3,
                    label=label)
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.0f}%")
    ax.set_xlabel("wall-clock training time (s)" if x == "time" else "training steps")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
    return fig
