"""A run's output directory: `config.json`, `metrics.jsonl`, `updates.csv` and `summary.json`.

`prepare_out_dir` creates it (refusing to overwrite a finished run), `resume_config` reads a run back
for `--resume`, `JsonlWriter` appends the metrics, `write_updates` and `summary` write the rest.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from asyncsgd import checkpoint, staleness, trainers
from asyncsgd.config import TrainConfig
from asyncsgd.errors import CheckpointError, ConfigError, OutputExists
from asyncsgd.metrics import Recorder, peak_rss_mb
from asyncsgd.models import conv

# Configuration fields a resumed run may change (they do not change what is computed).
# (`backend` and `ray_address` say where the run goes on, not what it computes: a Ray run's checkpoint
# resumes on the local backend and the other way round, on the same --devices.)
RESUMABLE_CHANGES = ("progress", "watchdog_s", "log_every", "overwrite", "checkpoint_every", "keep_checkpoints",
                     "eval_batch_size", "backend", "ray_address")
# Fields added after runs were written, with the value that reproduces those runs (a config.json without
# the field resumes as it was trained, whatever today's default is).
LEGACY_DEFAULTS = {"staleness_correction": "none"}


class JsonlWriter:
    """Appends one JSON object per line, flushing each so a killed run keeps what it logged."""

    def __init__(self, path: Optional[str]):
        self._handle = open(path, "a", encoding="utf-8") if path else None

    def write(self, record: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def write_json(path: str, payload: dict) -> None:
    """Writes `payload` atomically (a temporary file renamed into place)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def finished(out: str) -> bool:
    """True when `out/summary.json` says the run there is complete."""
    try:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as handle:
            return json.load(handle).get("status") == "complete"
    except (OSError, ValueError):
        return False


def resume_config(out: str, overrides: Optional[dict] = None) -> TrainConfig:
    """The configuration saved in `out` (a run to resume) with `overrides` (fields the user asked for
    explicitly). An override that changes anything but `RESUMABLE_CHANGES` is a `CheckpointError`
    naming the field."""
    try:
        with open(os.path.join(out, "config.json"), encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--resume {out}: no readable config.json ({exc.__class__.__name__})") from exc
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(saved) - fields
    if unknown:
        raise CheckpointError(f"--resume {out}: config.json has unknown fields {sorted(unknown)}")
    for name, value in LEGACY_DEFAULTS.items():  # written before the field existed: the behaviour of then
        saved.setdefault(name, value)
    config = TrainConfig(**saved)
    for name, value in sorted((overrides or {}).items()):
        if name in ("out", "trainer") and value is None or name not in fields:
            continue
        if name not in RESUMABLE_CHANGES and value != getattr(config, name):
            raise CheckpointError(
                f"--resume {out}: --{name.replace('_', '-')} {value} differs from the saved run's "
                f"{getattr(config, name)}; a resumed run keeps its configuration")
    config = dataclasses.replace(config, **{k: v for k, v in (overrides or {}).items() if k in RESUMABLE_CHANGES})
    return dataclasses.replace(config, out=out)


def prepare_out_dir(config: TrainConfig, resume: bool = False) -> Optional[str]:
    """Creates the output directory; refuses to overwrite a finished run unless `overwrite`. With
    `resume` the directory must hold a checkpoint and its files are kept (appended to)."""
    if config.out is None:
        return None
    if resume:
        if finished(config.out):
            raise OutputExists(f"--resume {config.out}: the run is already complete")
        if checkpoint.latest(config.out) is None:
            raise CheckpointError(f"--resume {config.out}: no checkpoint in {config.out}/checkpoints")
        return config.out
    if finished(config.out) and not config.overwrite:
        raise OutputExists(f"--out {config.out} already holds a finished run (summary.json); "
                           "pass --overwrite or choose another directory")
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"--out {config.out} exists and is not a directory")
    os.makedirs(config.out, exist_ok=True)
    for name in ("metrics.jsonl", "updates.csv", "summary.json"):
        path = os.path.join(config.out, name)
        if os.path.exists(path):
            os.remove(path)
    write_json(os.path.join(config.out, "config.json"), config.to_dict())
    return config.out


def write_updates(path: str, recorder: Recorder) -> None:
    """`updates.csv`: every committed update (stage, versions, staleness, worker, clock times)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "version_read", "version_commit", "staleness", "worker", "t_read", "t_commit"])
        for u in recorder.updates:
            writer.writerow([recorder.stage_names[u.stage], u.version_read, u.version_commit, u.staleness,
                             u.worker, f"{u.t_read:.6f}", f"{u.t_commit:.6f}"])


def nonfinite_stages(session) -> list[str]:
    """Names of the stages whose parameters hold a NaN or an infinity (a diverged run)."""
    return [name for name, slot in zip(session.model.stage_names, session.store.slots())
            if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(slot.params))]


@dataclasses.dataclass
class RunTotals:
    """What the epochs of a run did, summed from their `EpochResult`s (and restored on resume)."""

    epochs_completed: int = 0
    averaging_rounds: int = 0
    delay_slept_s: list = dataclasses.field(default_factory=list)
    peak_inflight: Optional[int] = None

    def add(self, result: Any) -> None:
        if result is None:
            return
        self.averaging_rounds += result.averaging_rounds
        slept = list(result.delay_slept_s)
        self.delay_slept_s = [a + b for a, b in zip(self.delay_slept_s, slept)] if self.delay_slept_s else slept
        if result.peak_inflight is not None:
            self.peak_inflight = max(self.peak_inflight or 0, result.peak_inflight)


def learned_nothing(test_accuracy: Optional[float], train_loss: float, num_classes: int) -> bool:
    """Whether a run that finished is no better than a guess: test accuracy within 2 points of chance
    (1 / classes) and a training loss still at 95% or more of a uniform guess's, ln(classes). A run can
    stall so with a finite loss (measured: the CNN, one device, without `scale`, one seed in three),
    where the divergence stop does not fire."""
    if test_accuracy is None or not math.isfinite(train_loss) or num_classes < 2:
        return False
    return test_accuracy <= 1.0 / num_classes + 0.02 and train_loss >= 0.95 * math.log(num_classes)


def divergence_advice(config: TrainConfig, spec) -> str:
    """What a diverged run's user should try first (the end of its one-line error)."""
    if not staleness.parse_corrections(config.staleness_correction) and spec.staleness_bound(config) != 0:
        first = f"--staleness-correction {TrainConfig.staleness_correction} (the default; this run turned it off)"
    else:
        first = f"--lr {config.lr / 2:g} (half)"
    warmup = trainers.resolve_defaults(config).warmup_steps  # the run's, given or its trainer's default
    return (f"try first {first}, then --warmup-steps {max(100, 4 * warmup)} or --max-inflight 1 "
            "(docs/usage.md, \"Staleness\")")


def summary(session, spec, status: str, tests, totals: RunTotals, *, flops_per_step: float,
            peak_flops: float, resumed_from: Optional[int], checkpoint_path: Optional[str],
            diverged: Optional[Exception]) -> dict:
    """The run's `summary.json` (docs/outputs.md)."""
    config, recorder, units, store, clock = (session.config, session.recorder, session.units, session.store,
                                             session.clock)
    run_time = recorder.wall_time_s()  # on the run's clock
    samples_per_s = recorder.samples / run_time if run_time > 0 else 0.0
    train_loss = recorder.train_loss()
    simulated = {}
    if clock.simulated:
        simulated = {"profile": clock.profile.to_json(), "sim_tie_seed": clock.tie_seed,
                     "busy_fraction": [round(clock.busy_s.get(d, 0.0) / run_time, 6) if run_time > 0 else 0.0
                                       for d in range(len(session.devices))]}
    return {
        "status": status, "trainer": config.trainer, "model": config.model, "dataset": config.dataset,
        "seed": config.seed, "epochs_completed": totals.epochs_completed, "steps": recorder.steps,
        "samples": recorder.samples, "clock": clock.name, "wall_time_s": recorder.real_time_s(),
        "simulated_time_s": run_time if clock.simulated else None, **simulated,
        "compile_time_s": units.compile_time_s, "eval_time_s": tests.time_s, "samples_per_s": samples_per_s,
        "test_accuracy": tests.accuracy, "test_loss": tests.loss, "target_accuracy": config.target_accuracy,
        "time_to_target_s": tests.time_to_target_s, "steps_to_target": tests.steps_to_target,
        "train_loss": train_loss, "staleness": recorder.staleness(),
        "learned_nothing": learned_nothing(tests.accuracy, train_loss, session.model.num_classes),
        "staleness_correction": staleness.describe(config, [slot.opt_state for slot in store.slots()]),
        "staleness_bound": spec.staleness_bound(config),
        "updates_per_stage": dict(zip(session.model.stage_names, session.updates_per_stage())),
        "devices": len(session.devices), "delay": str(session.delay),
        "averaging_rounds": totals.averaging_rounds,
        "pulls_per_device": [view.pulls for view in session.views],
        # bytes between devices (home's views move none): stage copies pulled and gradients pushed
        "pull_bytes_per_device": [view.pull_bytes for view in session.views],
        "push_bytes_per_device": [view.push_bytes for view in session.views],
        "bytes_moved_per_sample": (sum(view.pull_bytes + view.push_bytes for view in session.views)
                                   / max(recorder.samples, 1)),
        "delay_slept_s": [round(s, 4) for s in (totals.delay_slept_s or [0.0] * max(1, len(session.devices)))],
        # The most items in flight at once (their residuals are what a run holds beyond the model).
        "peak_inflight_items": totals.peak_inflight,
        # Batch-norm running-statistics steps committed per stage (stages with state only).
        "state_updates_per_stage": {name: slot.state_version for name, slot in
                                    zip(session.model.stage_names, store.slots()) if slot.state},
        "residual_mb_per_item": units.residual_bytes / 2 ** 20,
        "peak_rss_mb": peak_rss_mb(), "run_peak_rss_mb": recorder.run_peak_rss_mb,
        "flops_per_step": flops_per_step, "flops_counted_by": "XLA cost analysis of the whole-model sync step",
        "peak_flops": peak_flops,
        "mfu": flops_per_step * (samples_per_s / config.batch_size) / peak_flops if peak_flops else 0.0,
        "max_trace_count": units.max_trace_count(), "resumed_from_step": resumed_from,
        "checkpoint": checkpoint_path,
        "diverged": None if diverged is None else {"step": diverged.step, "batch": diverged.seq,
                                                   "message": str(diverged)},
        # how each convolution traced in this process was computed ("onednn", or XLA's form)
        "convolutions": conv.describe_choices(),
        "jax_version": jax.__version__, "config": dataclasses.asdict(config),
    }
