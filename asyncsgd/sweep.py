"""Experiments' shared harness: run labelled configurations over seeds, aggregate, tabulate, plot.

An experiment script (in `experiments/`) builds a list of `Arm`s (a label, a `TrainConfig` and the
extra columns that describe it), calls `run_arms` and `write_results`. Every result table has, per
arm: mean and spread over seeds (half the range) of the final test accuracy, the test accuracy after
each epoch, training seconds, samples per second, time to the target (if one is set), staleness
mean/max and peak memory (the run's own process peak when isolated, else the largest RSS sampled
during the run). `isolate=True` runs every training run in its own process (through the
`asyncsgd train` command), which a peak-memory comparison needs: a process's peak RSS only grows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from asyncsgd.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of an experiment: `label` names it in tables and plots; `columns` are extra
    table columns (e.g. {"threads": "1:2"})."""

    label: str
    config: TrainConfig
    columns: dict = dataclasses.field(default_factory=dict)


def _run_isolated(config: TrainConfig) -> dict:
    """Trains `config` in a fresh `asyncsgd train` process; returns its summary."""
    from asyncsgd.cli import config_to_argv
    cmd = [sys.executable, "-m", "asyncsgd", *config_to_argv(dataclasses.replace(config, overwrite=True,
                                                                                 progress=False))]
    result = subprocess.run(cmd, capture_output=True, text=True)
    summary_path = os.path.join(config.out, "summary.json")
    if result.returncode not in (0, 1) or not os.path.exists(summary_path):
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    with open(summary_path, encoding="utf-8") as handle:
        return json.load(handle)


def run_arms(arms: Sequence[Arm], seeds: int, out: str, dataset=None, isolate: bool = False,
             log=sys.stderr) -> list[dict]:
    """Trains every arm with seeds 0..seeds-1 (outputs in `out/<label>/seed<k>/`); returns one row per
    run: its summary plus `label`, `out` and the arm's columns. A diverged run is a row too."""
    from asyncsgd.errors import DivergedError
    from asyncsgd.run import train
    rows, total, started = [], len(arms) * seeds, time.perf_counter()
    for number, (arm, seed) in enumerate(((a, s) for a in arms for s in range(seeds)), 1):
        config = dataclasses.replace(arm.config, seed=seed, overwrite=True,
                                     out=os.path.join(out, arm.label.replace(" ", "_").replace("/", "-"), f"seed{seed}"))
        print(f"[{number}/{total}, {time.perf_counter() - started:.0f}s] {arm.label} seed {seed}", file=log, flush=True)
        if isolate:
            summary = _run_isolated(config)
        else:
            try:
                summary = train(config, dataset)
            except DivergedError as exc:
                summary = exc.summary
        rows.append(dict(summary, label=arm.label, out=config.out, isolated=isolate, arm_columns=list(arm.columns),
                         **arm.columns))
    return rows


def epoch_accuracies(run_out: str) -> list[float]:
    """Test accuracy after each epoch of a run (its between-epoch evaluations, in order)."""
    from asyncsgd.plots import read_metrics
    return [r["test_accuracy"] for r in read_metrics(run_out)
            if r.get("event") == "eval" and not r.get("during_epoch", False)]


def mean_spread(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return None, None
    return statistics.mean(values), ((max(values) - min(values)) / 2 if len(values) > 1 else 0.0)


def _status(row: dict) -> str:
    """A run's status for the tables: "complete at chance" where it learned nothing."""
    return row["status"] + (" at chance" if row.get("learned_nothing") else "")


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One line per label (in first-seen order): means and spreads over its seeds."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    lines = []
    for label, runs in by_label.items():
        per_epoch = [epoch_accuracies(r["out"]) for r in runs]
        epochs = max((len(e) for e in per_epoch), default=0)
        line: dict[str, Any] = {"label": label, "seeds": len(runs), "trainer": runs[0]["trainer"],
                                "statuses": sorted({_status(r) for r in runs})}
        line.update({k: runs[0][k] for k in runs[0].get("arm_columns", ())})
        line["clock"] = runs[0].get("clock", "wall")
        for key in ("test_accuracy", "wall_time_s", "samples_per_s", "time_to_target_s"):
            # training time on the run's clock: simulated seconds for a simulated run
            source = "simulated_time_s" if key == "wall_time_s" and line["clock"] == "simulated" else key
            line[key], line[key + "_spread"] = mean_spread([r.get(source) for r in runs])
        # Memory of the run itself: the process's peak when it had its own process, else the largest
        # RSS sampled during the run (a process's peak would carry over from the arms before it).
        line["peak_rss_mb"], line["peak_rss_mb_spread"] = mean_spread(
            [r["peak_rss_mb"] if r.get("isolated") else r.get("run_peak_rss_mb", r["peak_rss_mb"]) for r in runs])
        line["epoch_accuracy"] = [mean_spread([e[k] for e in per_epoch if len(e) > k])[0] for k in range(epochs)]
        stale = [s for r in runs for s in r["staleness"].values() if s["count"]]
        line["staleness_mean"] = statistics.mean(s["mean"] for s in stale) if stale else 0.0
        line["staleness_max"] = max((s["max"] for s in stale), default=0)
        line["reached"] = sum(r.get("time_to_target_s") is not None for r in runs)
        lines.append(line)
    return lines


def _fmt(value, pattern: str, spread=None) -> str:
    if value is None:
        return "-"
    text = pattern.format(value)
    return text + (f" ± {pattern.format(spread)}" if spread else "")


def format_table(lines: Sequence[dict], columns: Sequence[str] = (), with_target: bool = False) -> str:
    """Markdown: the arm's columns, then accuracy (final and per epoch), time, throughput, staleness, memory."""
    epochs = max((len(line["epoch_accuracy"]) for line in lines), default=0)
    simulated = any(line.get("clock") == "simulated" for line in lines)
    head = ["arm", *columns, "final test acc", *[f"acc e{k + 1}" for k in range(epochs)],
            "SIMULATED train s" if simulated else "train s", "samples/s"]
    seconds = "{:.3g}" if simulated else "{:.1f}"  # simulated accelerators finish in milliseconds
    if with_target:
        head += ["time to target s", "reached"]
    head += ["staleness mean/max", "peak RSS MB", "status"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in lines:
        cells = [line["label"], *[str(line.get(c, "")) for c in columns],
                 _fmt(100 * line["test_accuracy"] if line["test_accuracy"] is not None else None, "{:.2f}%",
                      100 * (line["test_accuracy_spread"] or 0)),
                 *[_fmt(100 * a if a is not None else None, "{:.2f}%") for a in
                   line["epoch_accuracy"] + [None] * (epochs - len(line["epoch_accuracy"]))],
                 _fmt(line["wall_time_s"], seconds, line["wall_time_s_spread"]),
                 _fmt(line["samples_per_s"], "{:.0f}")]
        if with_target:
            cells += [_fmt(line["time_to_target_s"], seconds, line["time_to_target_s_spread"]),
                      f"{line['reached']}/{line['seeds']}"]
        cells += [f"{line['staleness_mean']:.1f}/{line['staleness_max']}", _fmt(line["peak_rss_mb"], "{:.0f}"),
                  ", ".join(line["statuses"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_runs(rows: Sequence[dict], out: str, title: str, target: Optional[float] = None) -> list[str]:
    """Accuracy against wall-clock time and against steps (seed 0 of each arm), and staleness
    histograms per stage per arm; returns the PNG paths."""
    from asyncsgd.plots import plot_accuracy, plot_staleness
    first = {}
    for row in rows:
        first.setdefault(row["label"], row)
    runs = {label: row["out"] for label, row in first.items()}
    paths = [os.path.join(out, "accuracy_vs_time.png"), os.path.join(out, "accuracy_vs_steps.png"),
             os.path.join(out, "staleness.png")]
    plot_accuracy(runs, paths[0], title=title, target=target)
    plot_accuracy(runs, paths[1], title=title, target=target, x="steps")
    plot_staleness({label: row["staleness"] for label, row in first.items()}, paths[2], title=title)
    return paths


def write_results(out: str, rows: Sequence[dict], lines: Sequence[dict], table: str, meta: dict) -> None:
    """`out/results.json` (every run's summary, the aggregated lines, `meta`) and `out/results.md`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "lines": list(lines), "runs": list(rows)}, handle, indent=2, default=str)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")


def experiment_parser(doc: str, name: str, seeds: int = 3):
    """The flags every experiment script shares: --quick (default) / --full, --seeds, --out, --data-dir."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="this CPU, minutes (the default)")
    size.add_argument("--full", action="store_true", help="the paper's setting, meant for GPUs")
    parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds per arm (default {seeds})")
    parser.add_argument("--out", default=os.path.join("results", name))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--overwrite", action="store_true", help="accepted for make reproduce-quick; runs "
                        "inside --out are always replaced")
    return parser


def finish(args, rows: Sequence[dict], title: str, columns: Sequence[str] = (), meta: Optional[dict] = None,
           target: Optional[float] = None, started: Optional[float] = None, extra=None) -> str:
    """Aggregates, writes results.json/results.md and the plots into `args.out`, prints the table;
    returns it. `extra(lines) -> str` adds a section below the table (e.g. ratios)."""
    lines = aggregate(rows)
    took = f"; {time.perf_counter() - started:.0f}s in all" if started is not None else ""
    header = f"{title} ({'full' if args.full else 'quick'}, {args.seeds} seed(s){took})"
    table = header + "\n\n" + format_table(lines, columns, with_target=target is not None)
    if extra is not None:
        table += "\n\n" + extra(lines)
    write_results(args.out, rows, lines, table, {"title": title, "args": vars(args), **(meta or {})})
    plot_runs(rows, args.out, title, target)
    print(table)
    return table
