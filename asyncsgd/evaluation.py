"""Test evaluation of a run: between epochs, and every so many steps while the workers run.

`evaluate` computes the test loss and accuracy of a model; `TestEvaluator` decides when, logs each
evaluation, and tracks the time to `--target-accuracy` (on the run's clock).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from asyncsgd.data import Dataset, eval_batches
from asyncsgd.units import Units, on_home


class TargetReached(Exception):
    """The periodic test evaluation reached `--target-accuracy`: the run stops (a normal end)."""


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


def eval_batch_size(config, dataset: Dataset) -> int:
    """The evaluation batch: `config.eval_batch_size`, or the whole test split when that is smaller."""
    return max(1, min(config.eval_batch_size, len(dataset.test_y)))


class TestEvaluator:
    """Test evaluations of a run: between epochs (workers stopped; not counted in the training time)
    and, with `eval_every_steps` or `target_accuracy`, every so many steps while the workers run, on
    `session.view()` (a snapshot; nobody pauses). Reaching the target raises `TargetReached`."""

    __test__ = False  # not a pytest class

    def __init__(self, session, per_epoch: int):
        config = session.config
        self.session, self.config = session, config
        self.every = config.eval_every_steps or (max(1, per_epoch // 10) if config.target_accuracy else None)
        self.next_step = self.every
        self.loss = self.accuracy = float("nan")
        self.time_s = 0.0
        self.time_to_target_s: Optional[float] = None
        self.steps_to_target: Optional[int] = None

    def evaluate(self, running: bool) -> None:
        session, recorder, clock = self.session, self.session.recorder, self.session.clock
        wall, steps = recorder.wall_time_s(), recorder.steps
        start = clock.real_now()  # eval_time_s is real time (it passes no time on a simulated clock)
        params, states = session.view()
        self.loss, self.accuracy = evaluate(session.units, params, states, session.dataset.test_x,
                                            session.dataset.test_y, eval_batch_size(self.config, session.dataset))
        self.time_s += clock.real_now() - start
        recorder.log({"event": "eval", "epoch": recorder.epoch, "step": steps, "samples": steps * recorder.batch_size,
                      "time_s": wall, "wall_time_s": round(recorder.real_time_s(), 4), "test_loss": self.loss, "test_accuracy": self.accuracy,
                      "train_loss": recorder.train_loss(), "during_epoch": running,
                      # memory: the resident set now and the largest sampled in this epoch (a leak grows it)
                      "rss_mb": round(recorder.rss_mb, 1), "epoch_peak_rss_mb": round(recorder.epoch_peak_rss_mb, 1)})
        if running:  # the staleness so far, for live views (per epoch it is logged by the run loop)
            log_staleness(recorder, during_epoch=True)
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


def log_staleness(recorder, during_epoch: bool = False) -> None:
    """One `staleness` record per stage (count, mean, p95, max so far) into metrics.jsonl."""
    extra = {"step": recorder.steps, "during_epoch": True} if during_epoch else {}
    for name, stats in recorder.staleness().items():
        recorder.log({"event": "staleness", "epoch": recorder.epoch, **extra, "stage": name,
                      **{k: stats[k] for k in ("count", "mean", "p95", "max")}})
