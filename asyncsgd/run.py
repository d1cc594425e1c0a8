"""`train(config)`: one training run end to end, the function every entry point calls.

Builds the data, model, compiled units and store; runs the trainer epoch by epoch (its threads live
only inside each epoch); evaluates on the test split between epochs (excluded from `wall_time_s`);
writes `config.json`, `metrics.jsonl`, `updates.csv` and `summary.json` into `config.out`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from asyncsgd import checkpoint
from asyncsgd.config import ConfigError, TrainConfig, validate
from asyncsgd.data import Dataset, eval_batches, load_dataset, steps_per_epoch
from asyncsgd.delays import parse_delay
from asyncsgd.devices import run_devices
from asyncsgd.metrics import JsonlWriter, NonFiniteLoss, Recorder, measure_peak_flops, peak_rss_mb
from asyncsgd.models import get_model
from asyncsgd.optim import make_optimizer
from asyncsgd.store import ParamStore
from asyncsgd.trainers import EpochPlan, Session, get_trainer, staleness_bound, units_needed
from asyncsgd.trainers.lapsgd import lpp_slices
from asyncsgd.units import Units, on_home


class OutputExists(ConfigError):
    """The output directory already holds a finished run."""


class TargetReached(Exception):
    """The periodic test evaluation reached `--target-accuracy`: the run stops (a normal end)."""


def load_for(config: TrainConfig) -> Dataset:
    """The raw dataset `config` names, with its loading options."""
    return load_dataset(config.dataset, config.data_dir, cifar100_labels=config.cifar100_labels,
                        vocab_size=config.vocab_size, min_count=config.min_count, max_len=config.max_len)


def prepare_dataset(config: TrainConfig, dataset: Optional[Dataset] = None) -> Dataset:
    """Loads (unless given), subsets and normalises the dataset; checks the batch fits."""
    if dataset is None:
        dataset = load_for(config)
    dataset = dataset.subset(config.train_subset).normalized()
    if config.batch_size > len(dataset.train_y):
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set "
                          f"({len(dataset.train_y)} examples)")
    return dataset


# Configuration fields a resumed run may change (they do not change what is computed).
RESUMABLE_CHANGES = ("progress", "watchdog_s", "log_every", "overwrite", "checkpoint_every", "keep_checkpoints",
                     "eval_batch_size")


def resume_config(out: str, overrides: Optional[dict] = None) -> TrainConfig:
    """The configuration saved in `out` (a run to resume) with `overrides` (fields the user asked for
    explicitly). An override that changes anything but `RESUMABLE_CHANGES` is a `CheckpointError`
    naming the field."""
    try:
        with open(os.path.join(out, "config.json"), encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"--resume {out}: no readable config.json ({exc.__class__.__name__})") from exc
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(saved) - fields
    if unknown:
        raise checkpoint.CheckpointError(f"--resume {out}: config.json has unknown fields {sorted(unknown)}")
    config = TrainConfig(**saved)
    for name, value in sorted((overrides or {}).items()):
        if name in ("out", "trainer") and value is None or name not in fields:
            continue
        if name not in RESUMABLE_CHANGES and value != getattr(config, name):
            raise checkpoint.CheckpointError(
                f"--resume {out}: --{name.replace('_', '-')} {value} differs from the saved run's "
                f"{getattr(config, name)}; a resumed run keeps its configuration")
    config = dataclasses.replace(config, **{k: v for k, v in (overrides or {}).items() if k in RESUMABLE_CHANGES})
    return dataclasses.replace(config, out=out)


def prepare_out_dir(config: TrainConfig, resume: bool = False) -> Optional[str]:
    """Creates the output directory; refuses to overwrite a finished run unless `overwrite`. With
    `resume` the directory must hold a checkpoint and its files are kept (appended to)."""
    if config.out is None:
        return None
    summary = os.path.join(config.out, "summary.json")
    if resume:
        if _finished(summary):
            raise OutputExists(f"--resume {config.out}: the run is already complete")
        if checkpoint.latest(config.out) is None:
            raise checkpoint.CheckpointError(f"--resume {config.out}: no checkpoint in {config.out}/checkpoints")
        return config.out
    if _finished(summary) and not config.overwrite:
        raise OutputExists(f"--out {config.out} already holds a finished run (summary.json); "
                           "pass --overwrite or choose another directory")
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"--out {config.out} exists and is not a directory")
    os.makedirs(config.out, exist_ok=True)
    for name in ("metrics.jsonl", "updates.csv", "summary.json"):
        path = os.path.join(config.out, name)
        if os.path.exists(path):
            os.remove(path)
    _write_json(os.path.join(config.out, "config.json"), config.to_dict())
    return config.out


def _finished(summary_path: str) -> bool:
    try:
        with open(summary_path, encoding="utf-8") as handle:
            return json.load(handle).get("status") == "complete"
    except (OSError, ValueError):
        return False


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def evaluate(units: Units, params: list, states: list, x: np.ndarray, y: np.ndarray,
             batch_size: int) -> tuple[float, float]:
    """Test loss and accuracy of `params` (batch norm: running statistics `states`) over the whole
    split (padded last batch masked out). Parameters held elsewhere (a ddp replica, a device copy)
    are brought to the default device first."""
    params, states = on_home((params, states))
    loss_sum, correct = jnp.zeros(()), jnp.zeros(())
    for xb, yb, mask in eval_batches(x, y, batch_size):
        batch_loss, batch_correct = units.evaluate(params, states, xb, yb, mask)
        loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
    count = len(y)
    return float(loss_sum) / count, float(correct) / count  # blocks: reads the result


class _Checkpointer:
    """Writes checkpoints every `config.checkpoint_every` steps or seconds (from the coordinating
    thread, workers running) and on request (an interrupted run)."""

    def __init__(self, session: Session, tests: "_TestEvaluator", out: Optional[str]):
        from asyncsgd.config import parse_every
        self.session, self.tests, self.out = session, tests, out
        self.every = parse_every(session.config.checkpoint_every) if out else None
        self.last_steps = 0
        self.last_time = time.monotonic()
        self.last_path: Optional[str] = None

    def maybe_save(self) -> None:
        if self.every is None:
            return
        unit, value = self.every
        recorder = self.session.recorder
        due = (recorder.done_through + 1 - self.last_steps >= value if unit == "steps"
               else time.monotonic() - self.last_time >= value)
        if due:
            self.save()

    def save(self, lock_timeout: Optional[float] = None) -> None:
        position = self.session.recorder.state()  # first the position, then the snapshot (at-least-once)
        self.last_path = checkpoint.save(self.out, self.session, position, self.tests.state(),
                                         keep=self.session.config.keep_checkpoints, lock_timeout=lock_timeout)
        steps = checkpoint.read_meta(self.last_path)["steps"]
        self.last_steps, self.last_time = steps, time.monotonic()
        self.session.recorder.log({"event": "checkpoint", "step": steps,
                                   "path": os.path.relpath(self.last_path, self.out)})

    def save_quietly(self) -> None:
        """On Ctrl+C: a checkpoint if there is an output directory; a failure here must not hide the
        interrupt (it is reported on stderr)."""
        if self.out is None:
            return
        try:
            self.session.recorder.tick()
        except Exception:  # noqa: BLE001 - a non-finite loss among the last steps: keep the last checkpoint
            return
        try:
            self.save(lock_timeout=2.0)  # the workers have stopped: a lock held longer was never released
        except Exception as exc:  # noqa: BLE001
            print(f"asyncsgd: warning: no checkpoint on interrupt: {exc}", file=sys.stderr)


class _TestEvaluator:
    """Test evaluations of a run: between epochs (workers stopped; not counted in the wall time) and,
    with `eval_every_steps` or `target_accuracy`, every so many steps while the workers run, on
    `session.view()` (a snapshot; nobody pauses). Reaching the target raises `TargetReached`."""

    def __init__(self, session: Session, config: TrainConfig, per_epoch: int):
        self.session, self.config = session, config
        self.every = config.eval_every_steps or (max(1, per_epoch // 10) if config.target_accuracy else None)
        self.next_step = self.every
        self.loss = self.accuracy = float("nan")
        self.time_s = 0.0
        self.time_to_target_s: Optional[float] = None
        self.steps_to_target: Optional[int] = None

    def evaluate(self, running: bool) -> None:
        session, recorder = self.session, self.session.recorder
        wall, steps = recorder.wall_time_s(), recorder.steps
        start = time.perf_counter()
        params, states = session.view()
        self.loss, self.accuracy = evaluate(session.units, params, states, session.dataset.test_x,
                                            session.dataset.test_y, eval_batch_size(self.config, session.dataset))
        self.time_s += time.perf_counter() - start
        recorder.log({"event": "eval", "epoch": recorder.epoch, "step": steps, "samples": steps * recorder.batch_size,
                      "wall_time_s": round(wall, 4), "test_loss": self.loss, "test_accuracy": self.accuracy,
                      "train_loss": recorder.train_loss(), "during_epoch": running})
        if running:  # the staleness so far, for live views (per epoch it is logged by train())
            for name, stats in recorder.staleness().items():
                recorder.log({"event": "staleness", "epoch": recorder.epoch, "step": steps, "stage": name,
                              "during_epoch": True, **{k: stats[k] for k in ("count", "mean", "p95", "max")}})
        target = self.config.target_accuracy
        if target is not None and self.time_to_target_s is None and self.accuracy >= target:
            self.time_to_target_s, self.steps_to_target = wall, steps

    def state(self) -> dict:
        return {"next_step": self.next_step, "loss": self.loss, "accuracy": self.accuracy, "time_s": self.time_s,
                "time_to_target_s": self.time_to_target_s, "steps_to_target": self.steps_to_target}

    def restore(self, state: dict) -> None:
        self.next_step = state["next_step"]
        self.loss, self.accuracy, self.time_s = state["loss"], state["accuracy"], state["time_s"]
        self.time_to_target_s, self.steps_to_target = state["time_to_target_s"], state["steps_to_target"]

    def maybe_evaluate(self) -> None:
        """Called by the recorder's tick (the coordinating thread) while the workers run."""
        if self.every is None or self.session.recorder.steps < self.next_step:
            return
        while self.next_step <= self.session.recorder.steps:
            self.next_step += self.every
        self.evaluate(running=True)
        self.check_target()

    def check_target(self) -> None:
        if self.time_to_target_s is not None and self.config.stop_at_target:
            raise TargetReached(f"test accuracy {self.accuracy:.4f} >= {self.config.target_accuracy} "
                                f"after {self.time_to_target_s:.1f}s")


def _write_updates(path: str, recorder: Recorder) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "version_read", "version_commit", "staleness", "worker", "t_read", "t_commit"])
        for u in recorder.updates:
            writer.writerow([recorder.stage_names[u.stage], u.version_read, u.version_commit, u.staleness,
                             u.worker, f"{u.t_read:.6f}", f"{u.t_commit:.6f}"])


def eval_batch_size(config: TrainConfig, dataset: Dataset) -> int:
    """The evaluation batch: `config.eval_batch_size`, or the whole test split when that is smaller."""
    return max(1, min(config.eval_batch_size, len(dataset.test_y)))


def build_session(config: TrainConfig, dataset: Dataset, recorder_kwargs: dict,
                  unit_groups: Optional[tuple[str, ...]] = None) -> tuple[Session, int]:
    """Model, optimiser, compiled units (compiled here, before any thread) and the store.

    Args:
      unit_groups: the units to compile (default: those `config.trainer` calls).

    Returns:
      The session and the number of steps the run plans.
    """
    model = get_model(config.model, dataset.input_shape, dataset.num_classes, norm=config.norm,
                      vocab_size=dataset.vocab_size)
    per_epoch = steps_per_epoch(len(dataset.train_y), config.batch_size)
    total_steps = config.epochs * per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    units = Units(model, make_optimizer(config, total_steps), config.residuals)
    devices = run_devices(config.devices)
    params, states = model.init(jax.random.PRNGKey(config.seed))
    opt_states = units.init_opt_states(params)
    if config.trainer == "ddp":
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        mesh = Mesh(np.array(devices), ("devices",))
        units.build_ddp_step(mesh)
        params, opt_states, states = jax.device_put((params, opt_states, states), NamedSharding(mesh, PartitionSpec()))
    if config.trainer == "lppsgd":
        units.build_partial_grads(lpp_slices(len(model.stages), config.workers))
    units.average_copies = len(devices)
    if unit_groups is not None:
        every, home = tuple(unit_groups), ()
    else:
        every, home = units_needed(config.trainer, len(devices))
    if every:
        units.warmup(params, opt_states, states, config.batch_size, eval_batch_size(config, dataset), groups=every,
                     devices=devices if len(devices) > 1 else None)
    units.warmup(params, opt_states, states, config.batch_size, eval_batch_size(config, dataset), groups=home)
    store = ParamStore(model.stage_names, params, opt_states, states)
    recorder = Recorder(model.stage_names, config.batch_size, total_steps, **recorder_kwargs)
    session = Session(config, model, units, store, dataset, recorder, devices=devices,
                      delay=parse_delay(config.delay, devices=len(devices)))
    return session, total_steps


def train(config: TrainConfig, dataset: Optional[Dataset] = None, resume: bool = False) -> dict:
    """Runs one training run and returns its summary (also written to `config.out/summary.json`).

    Args:
      config: the run's configuration (validated here).
      dataset: an already loaded dataset (raw); by default `config.dataset` is loaded.
      resume: continue the run in `config.out` from its latest checkpoint (see `resume_config`).
    Returns:
      The summary dict (see README, "Outputs").
    Raises:
      ConfigError: invalid configuration or output directory.
      KeyboardInterrupt: after writing a checkpoint (with `out`) and the partial outputs with status
        "interrupted".
      NonFiniteLoss: the loss became NaN/inf; the run stops, the outputs are written with status
        "diverged" (the summary is also attached to the exception as `.summary`).
    """
    validate(config)
    if resume and config.out is None:
        raise ConfigError("--resume needs the run's output directory")
    dataset = prepare_dataset(config, dataset)
    out = prepare_out_dir(config, resume)
    writer = JsonlWriter(os.path.join(out, "metrics.jsonl") if out else None)
    session, total_steps = build_session(config, dataset, dict(
        writer=writer, log_every=config.log_every, progress=config.progress, desc=config.trainer))
    units, store, recorder = session.units, session.store, session.recorder
    run_epoch = get_trainer(config.trainer)
    per_epoch = steps_per_epoch(len(dataset.train_y), config.batch_size)
    flops_per_step = units.step_flops(store.params(), store.opt_states(), store.states(), config.batch_size)
    peak_flops = measure_peak_flops()
    status, epochs_completed = "failed", 0
    diverged: Optional[NonFiniteLoss] = None
    tests = _TestEvaluator(session, config, per_epoch)
    saver = _Checkpointer(session, tests, out)
    start = 0
    if resume:
        if config.trainer in ("lapsgd", "lppsgd"):
            from asyncsgd.trainers.lapsgd import prepare
            prepare(session)
        path = checkpoint.latest(out)
        meta = checkpoint.restore(path, session)
        recorder.restore(meta["recorder"])
        tests.restore(meta["evaluator"])
        start = meta["steps"]
        saver.last_steps = start
        recorder.log({"event": "resume", "from_step": start, "checkpoint": os.path.basename(path)})
        earlier = os.path.join(out, "updates.csv")
        if os.path.exists(earlier):  # the interrupted segment's updates (updates.csv gets the new ones)
            os.replace(earlier, os.path.join(out, f"updates.before-step-{start}.csv"))
    if out:  # a run killed before its end leaves this "running" summary: clearly partial
        _write_json(os.path.join(out, "summary.json"), {"status": "running", "trainer": config.trainer,
                                                        "resumed_from_step": start if resume else None})

    def on_tick() -> None:
        tests.maybe_evaluate()
        saver.maybe_save()
    recorder.on_tick = on_tick
    epochs_completed = start // per_epoch
    try:
        for epoch in range(start // per_epoch, config.epochs):
            skip = start - epoch * per_epoch if epoch == start // per_epoch else 0
            remaining = total_steps - epoch * per_epoch - skip
            if remaining <= 0:
                break
            plan = EpochPlan(epoch, epoch * per_epoch + skip, min(per_epoch - skip, remaining), skip)
            recorder.start_epoch(epoch)
            try:
                run_epoch(session, plan)
                recorder.end_epoch()
            finally:
                if recorder.running:
                    recorder.end_epoch(tick=False)
            epochs_completed = epoch + 1
            last = epochs_completed == config.epochs or (epoch + 1) * per_epoch >= total_steps
            if (epoch + 1) % config.eval_every == 0 or last:
                tests.evaluate(running=False)
            for name, stats in recorder.staleness().items():
                recorder.log({"event": "staleness", "epoch": epoch, "stage": name,
                              **{k: stats[k] for k in ("count", "mean", "p95", "max")}})
            tests.check_target()
        status = "complete"
    except TargetReached:
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        saver.save_quietly()  # the workers have stopped: this is the state to resume from
        raise
    except NonFiniteLoss as exc:
        status, diverged = "diverged", exc
        bad = [name for name, params in zip(session.model.stage_names, [s.params for s in store.slots()])
               if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(params))]
        exc.args = (f"{exc.args[0]}; stages with non-finite parameters: {', '.join(bad) or 'none yet'}; "
                    "try a lower --lr or --max-inflight",)
        raise
    finally:
        recorder.close()
        wall = recorder.wall_time_s()
        samples_per_s = recorder.samples / wall if wall > 0 else 0.0
        summary = {
            "status": status,
            "trainer": config.trainer,
            "model": config.model,
            "dataset": config.dataset,
            "seed": config.seed,
            "epochs_completed": epochs_completed,
            "steps": recorder.steps,
            "samples": recorder.samples,
            "wall_time_s": wall,
            "compile_time_s": units.compile_time_s,
            "eval_time_s": tests.time_s,
            "samples_per_s": samples_per_s,
            "test_accuracy": tests.accuracy,
            "test_loss": tests.loss,
            "target_accuracy": config.target_accuracy,
            "time_to_target_s": tests.time_to_target_s,
            "steps_to_target": tests.steps_to_target,
            "train_loss": recorder.train_loss(),
            "staleness": recorder.staleness(),
            "staleness_bound": staleness_bound(config.trainer, config.max_inflight, config.workers, config.devices,
                                               config.window),
            "updates_per_stage": dict(zip(session.model.stage_names, session.updates_per_stage())),
            "devices": len(session.devices),
            "delay": str(session.delay),
            "averaging_rounds": session.averaging_rounds,
            "pulls_per_device": [view.pulls for view in session.views],
            "delay_slept_s": [round(s, 4) for s in session.delay_slept_s()],
            # The most items in flight at once (their residuals are what a run holds beyond the model).
            "peak_inflight_items": session.window.peak_held if session.window is not None else None,
            # Batch-norm running-statistics steps committed per stage (stages with state only).
            "state_updates_per_stage": {name: slot.state_version for name, slot in
                                        zip(session.model.stage_names, store.slots()) if slot.state},
            "residual_mb_per_item": units.residual_bytes / 2 ** 20,
            "peak_rss_mb": peak_rss_mb(),
            "run_peak_rss_mb": recorder.run_peak_rss_mb,
            "flops_per_step": flops_per_step,
            "flops_counted_by": "XLA cost analysis of the whole-model sync step",
            "peak_flops": peak_flops,
            "mfu": flops_per_step * (samples_per_s / config.batch_size) / peak_flops if peak_flops else 0.0,
            "max_trace_count": units.max_trace_count(),
            "resumed_from_step": start if resume else None,
            "checkpoint": saver.last_path,
            "diverged": None if diverged is None else {"step": diverged.step, "batch": diverged.seq,
                                                       "message": str(diverged)},
            "jax_version": jax.__version__,
            "config": dataclasses.asdict(config),
        }
        if out:
            _write_updates(os.path.join(out, "updates.csv"), recorder)
            _write_json(os.path.join(out, "summary.json"), summary)
        writer.close()
        if diverged is not None:
            diverged.summary = summary
    return summary
