"""`train(config)`: one training run end to end, the function every entry point calls.

The epoch loop and nothing else: the session comes from `assemble`, the trainer from the registry
(`asyncsgd.trainers`), evaluation from `evaluation`, checkpoints from `checkpoint`, and the files
(`config.json`, `metrics.jsonl`, `updates.csv`, `summary.json`) from `outputs`. Each epoch runs the
trainer's threads and returns what it did; evaluation between epochs is excluded from the training time.
"""

from __future__ import annotations

import os
from typing import Optional

from asyncsgd import checkpoint, outputs, trainers
from asyncsgd.assemble import build_session, prepare_dataset
from asyncsgd.config import TrainConfig, validate
from asyncsgd.data import Dataset, steps_per_epoch
from asyncsgd.errors import ConfigError, DivergedError
from asyncsgd.evaluation import TargetReached, TestEvaluator, log_staleness
from asyncsgd.metrics import measure_peak_flops
from asyncsgd.trainers import EpochPlan


def _epoch_plans(start: int, per_epoch: int, total_steps: int, epochs: int):
    """`EpochPlan`s from step `start` (a resumed run starts inside an epoch) to the end of the run."""
    for epoch in range(start // per_epoch, epochs):
        skip = start - epoch * per_epoch if epoch == start // per_epoch else 0
        remaining = total_steps - epoch * per_epoch - skip
        if remaining <= 0:
            return
        yield EpochPlan(epoch, epoch * per_epoch + skip, min(per_epoch - skip, remaining), skip)


def _resume(out: str, session, tests: TestEvaluator, saver: checkpoint.Checkpointer,
            totals: outputs.RunTotals) -> int:
    """Loads the latest checkpoint of `out` into the run; returns the step it continues from."""
    path = checkpoint.latest(out)
    meta = checkpoint.restore(path, session)
    session.recorder.restore(meta["recorder"])
    tests.restore(meta["evaluator"])
    totals.averaging_rounds = meta.get("averaging_rounds", 0)
    start = saver.last_steps = meta["steps"]
    session.recorder.log({"event": "resume", "from_step": start, "checkpoint": os.path.basename(path)})
    earlier = os.path.join(out, "updates.csv")
    if os.path.exists(earlier):  # the interrupted segment's updates (updates.csv gets the new ones)
        os.replace(earlier, os.path.join(out, f"updates.before-step-{start}.csv"))
    return start


def _run_epochs(spec, session, tests: TestEvaluator, totals: outputs.RunTotals, start: int, per_epoch: int,
                total_steps: int) -> None:
    """Every epoch from step `start`: the trainer's threads, then (between epochs) evaluation."""
    config, recorder = session.config, session.recorder
    totals.epochs_completed = start // per_epoch
    for plan in _epoch_plans(start, per_epoch, total_steps, config.epochs):
        recorder.start_epoch(plan.epoch)
        try:
            totals.add(spec.run_epoch(session, plan))
            recorder.end_epoch()
        except BaseException as exc:
            totals.add(getattr(exc, "epoch_result", None))  # what the interrupted epoch did
            raise
        finally:
            if recorder.running:
                recorder.end_epoch(tick=False)
        totals.epochs_completed = plan.epoch + 1
        if totals.epochs_completed % config.eval_every == 0 or plan.first_seq + plan.max_batches >= total_steps:
            tests.evaluate(running=False)
        log_staleness(recorder)
        tests.check_target()


def train(config: TrainConfig, dataset: Optional[Dataset] = None, resume: bool = False) -> dict:
    """Runs one training run and returns its summary (also written to `config.out/summary.json`).

    Args:
      config: the run's configuration (validated here).
      dataset: an already loaded dataset (raw); by default `config.dataset` is loaded.
      resume: continue the run in `config.out` from its latest checkpoint (see `outputs.resume_config`).
    Returns:
      The summary dict (see docs/outputs.md).
    Raises:
      ConfigError: invalid configuration or output directory.
      KeyboardInterrupt: after writing a checkpoint (with `out`) and the partial outputs with status
        "interrupted".
      DivergedError: the loss became NaN/inf; the run stops, the outputs are written with status
        "diverged" (the summary is also attached to the exception as `.summary`).
    """
    config = trainers.resolve_defaults(validate(config))  # resolved: what config.json and summary.json record
    if resume and config.out is None:
        raise ConfigError("--resume needs the run's output directory")
    spec = trainers.get(config.trainer)
    if config.backend == "ray":  # the same trainer, its epochs on Ray worker actors
        from asyncsgd.cluster import ray_spec
        spec = ray_spec(spec)
    dataset = prepare_dataset(config, dataset)
    out = outputs.prepare_out_dir(config, resume)
    writer = outputs.JsonlWriter(os.path.join(out, "metrics.jsonl") if out else None)
    session, total_steps = build_session(config, dataset, dict(writer=writer, progress=config.progress), spec=spec)
    recorder = session.recorder
    per_epoch = steps_per_epoch(len(dataset.train_y), config.batch_size)
    flops_per_step = session.units.step_flops(session.store.params(), session.store.opt_states(),
                                              session.store.states(), config.batch_size)
    # MFU's roof: this machine's measured matmul peak, or the simulated device's peak.
    peak_flops = session.clock.profile.peak_flops if session.clock.simulated else measure_peak_flops()
    status, diverged, totals = "failed", None, outputs.RunTotals()
    tests = TestEvaluator(session, per_epoch)
    saver = checkpoint.Checkpointer(session, out, spec.exact_position, tests.state, lambda: totals.averaging_rounds)
    start = _resume(out, session, tests, saver, totals) if resume else 0
    if out:  # a run killed before its end leaves this "running" summary: clearly partial
        outputs.write_json(os.path.join(out, "summary.json"), {"status": "running", "trainer": config.trainer,
                                                               "resumed_from_step": start if resume else None})

    def on_tick() -> None:
        tests.maybe_evaluate()
        saver.maybe_save()
    recorder.on_tick = on_tick
    try:
        _run_epochs(spec, session, tests, totals, start, per_epoch, total_steps)
        status = "complete"
    except TargetReached:
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        saver.save_quietly()  # the workers have stopped: this is the state to resume from
        raise
    except DivergedError as exc:
        status, diverged = "diverged", exc
        exc.args = (f"{exc.args[0]}; stages with non-finite parameters: "
                    f"{', '.join(outputs.nonfinite_stages(session)) or 'none yet'}; "
                    f"{outputs.divergence_advice(config, spec)}",)
        raise
    finally:
        recorder.close()
        try:
            extra = spec.summary(session)
        except Exception as exc:  # noqa: BLE001 - the run's own error (or result) matters more
            extra = {"summary_error": f"{type(exc).__name__}: {exc}"}
        finally:
            spec.finish(session)  # a Ray run's actors stop here, whatever happened
        summary = outputs.summary(session, spec, status, tests, totals,
                                  flops_per_step=flops_per_step, peak_flops=peak_flops,
                                  resumed_from=start if resume else None, checkpoint_path=saver.last_path,
                                  diverged=diverged)
        summary.update(extra)
        if out:
            outputs.write_updates(os.path.join(out, "updates.csv"), recorder)
            outputs.write_json(os.path.join(out, "summary.json"), summary)
        writer.close()
        if diverged is not None:
            diverged.summary = summary
    return summary
