"""Several trainers on the same data and settings, one after another, and a result table."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

from asyncsgd.config import TrainConfig, validate
from asyncsgd.data import Dataset
from asyncsgd.assemble import load_for
from asyncsgd.errors import DivergedError
from asyncsgd.run import train


def compare(base: TrainConfig, trainers: Sequence[str], dataset: Optional[Dataset] = None) -> dict:
    """Trains `base` once per trainer (outputs in `base.out/<trainer>/`) and collects the summaries.

    Returns:
      {"rows": [summary, ...], "table": markdown}; also written to `base.out/comparison.{json,md}`.
    """
    configs = [validate(dataclasses.replace(base, trainer=name,
                                            out=os.path.join(base.out, name) if base.out else None))
               for name in trainers]
    if dataset is None:
        dataset = load_for(base)  # load once for every trainer
    rows = []
    for config in configs:
        try:
            rows.append(train(config, dataset))
        except DivergedError as exc:  # a diverged trainer is a result, not the end of the comparison
            rows.append(exc.summary)
    table = format_comparison(rows)
    result = {"rows": rows, "table": table}
    if base.out:
        os.makedirs(base.out, exist_ok=True)
        with open(os.path.join(base.out, "comparison.json"), "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
        with open(os.path.join(base.out, "comparison.md"), "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    return result


def format_comparison(rows: Sequence[dict]) -> str:
    """Markdown: accuracy, throughput, ratio to sync, and per-stage staleness mean/max."""
    reference = next((r["samples_per_s"] for r in rows if r["trainer"] == "sync"), None)
    first = rows[0]
    simulated = first.get("clock") == "simulated"
    lines = [f"{first['model']} on {first['dataset']}, {first['epochs_completed']} epoch(s), "
             f"batch {first['config']['batch_size']}, seed {first['seed']}"
             + (f"; SIMULATED time on profile {first['profile']['name']}" if simulated else ""),
             "",
             "| trainer | test acc | test loss | samples/s | ratio to sync | train s | MFU | peak RSS MB | "
             "staleness mean/max per stage |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['samples_per_s'] / reference:.2f}x" if reference else "n/a"
        if r["status"] == "diverged":
            ratio += f" (diverged at step {r['diverged']['step']})"
        stale = " ".join(f"{name}:{s['mean']:.1f}/{s['max']}" for name, s in r["staleness"].items())
        chance = " (at chance)" if r.get("learned_nothing") else ""
        lines.append(f"| {r['trainer']} | {100 * r['test_accuracy']:.2f}%{chance} | {r['test_loss']:.4f} | "
                     f"{r['samples_per_s']:.0f} | {ratio} | "
                     + (f"{r['simulated_time_s']:.4g}" if simulated else f"{r['wall_time_s']:.1f}")
                     + f" | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_rss_mb']:.0f} | {stale} |")
    return "\n".join(lines)
