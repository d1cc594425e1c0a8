"""Telemetry: per-update staleness, progress, throughput, memory and MFU.

Worker threads only ever *append* to lists here (atomic in CPython, no lock); the coordinating thread
reads what has been appended so far in `Recorder.tick`, converts device scalars to floats (the only
place a loss is fetched, after the item that produced it has finished), writes `metrics.jsonl` and
drives the progress bar.
"""

from __future__ import annotations

import functools
import math
import resource
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from asyncsgd.clock import WALL, Clock
from asyncsgd.errors import DivergedError


class Update(NamedTuple):
    """One committed update of one stage."""

    stage: int
    version_read: int     # version of the stage the forward pass (or gradient) used
    version_commit: int   # version of the stage the update was applied to
    worker: str
    t_read: float         # the run's clock at the read
    t_commit: float       # ... and at the commit

    @property
    def staleness(self) -> int:
        return self.version_commit - self.version_read


def summarize_staleness(updates: Sequence[Update], stage_names: Sequence[str]) -> dict:
    """Per stage name: count, mean, p95, max and a histogram {staleness: count}."""
    by_stage: dict[int, list[int]] = {i: [] for i in range(len(stage_names))}
    for update in updates:
        by_stage[update.stage].append(update.staleness)
    summary = {}
    for index, name in enumerate(stage_names):
        values = np.asarray(by_stage[index], dtype=np.int64)
        if values.size == 0:
            summary[name] = {"count": 0, "mean": 0.0, "p95": 0.0, "max": 0, "histogram": {}}
            continue
        counts = np.bincount(values)
        summary[name] = {
            "count": int(values.size),
            "mean": float(values.mean()),
            "p95": float(np.percentile(values, 95)),
            "max": int(values.max()),
            "histogram": {str(s): int(c) for s, c in enumerate(counts) if c},
        }
    return summary


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize() / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


@functools.lru_cache(maxsize=None)
def measure_peak_flops(size: int = 2048, repeats: int = 12) -> float:
    """Best-of-`repeats` f32 matmul throughput (FLOP/s) of the default device: the MFU roof."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()  # blocks: we are timing the device
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


class Recorder:
    """Collects what workers report during a run and turns it into logs and a progress bar.

    Args:
      stage_names: model stage names (staleness is summarised per name).
      batch_size: examples per training step.
      total_steps: steps planned (for the progress bar).
      writer: the metrics.jsonl writer (`outputs.JsonlWriter`; None: records are dropped).
      log_every: write a train record every this many completed steps.
      progress: show a tqdm bar on stderr.
      clock: the run's clock (timestamps, training time, throughput).
    """

    def __init__(self, stage_names: Sequence[str], batch_size: int, total_steps: int,
                 writer: Any, log_every: int = 20, progress: bool = True, desc: str = "train",
                 clock: Clock = WALL):
        self.stage_names = tuple(stage_names)
        self.clock = clock
        self.batch_size = batch_size
        self.writer = writer
        self.log_every = log_every
        self.updates: list[Update] = []
        self._done: list[tuple[int, Any]] = []   # (seq, loss device scalar), appended by workers
        self._cursor = 0
        self._base = 0  # steps restored from a checkpoint
        self.steps = 0
        # Every batch with seq <= done_through has finished (the low-water mark; a checkpoint's position).
        self.done_through = -1
        self._above: set[int] = set()
        self.losses: list[float] = []
        self._window: list[float] = []
        self._queue_depth: Optional[int] = None  # the hand-off queues at the last tick (None: no queues)
        self.epoch = 0
        self.train_time_s = 0.0       # training time so far on the run's clock
        self.real_train_time_s = 0.0  # ... and in real seconds (the same on the wall clock)
        self._epoch_start: Optional[float] = None
        self._epoch_real_start = 0.0
        # Notified (on the run's clock) whenever a batch finishes: a crew's coordinator waits on it.
        self.progress = threading.Event()
        # Called at the end of every `tick` (coordinating thread): periodic evaluation hooks in here.
        self.on_tick: Optional[Callable[[], None]] = None
        # The largest resident set seen at a tick of this run (unlike the process's peak RSS, it does
        # not carry over from earlier runs in the same process).
        self.run_peak_rss_mb = current_rss_mb()
        self.rss_mb = self.epoch_peak_rss_mb = self.run_peak_rss_mb  # the latest sample; this epoch's largest
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True,
                             mininterval=0.5, file=sys.stderr)

    # -- called by workers (append only) ---------------------------------------------------------
    def item_done(self, seq: int, loss: Any) -> None:
        """A training step's gradients have been fully applied."""
        self._done.append((seq, loss))
        self.clock.notify(self.progress)

    def committed(self, stage: int, version_read: int, version_commit: int, worker: str, t_read: float) -> None:
        """Stage `stage` got an update computed from `version_read`, applied to `version_commit`."""
        self.updates.append(Update(stage, version_read, version_commit, worker, t_read, self.clock.now()))

    def committed_all(self, commits: Sequence[Any], worker: str, versions_read: Optional[Sequence[int]] = None,
                      times_read: Optional[Sequence[float]] = None) -> None:
        """A whole-model commit (`store.commit_all`'s commits). Without `versions_read` the update was
        computed from the versions it replaced (a synchronous step: staleness 0)."""
        now = self.clock.now()
        for stage, commit in enumerate(commits):
            version = commit.before.version
            self.updates.append(Update(stage, version if versions_read is None else versions_read[stage], version,
                                       worker, now if times_read is None else times_read[stage], now))

    @property
    def finished(self) -> int:
        """Steps reported finished so far (read by any thread; `steps` counts those consumed by `tick`)."""
        return self._base + len(self._done)

    # -- called by the coordinator ---------------------------------------------------------------
    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    def wall_time_s(self) -> float:
        """Training time so far on the run's clock (simulated seconds on a simulated clock)."""
        running = self.clock.now() - self._epoch_start if self._epoch_start is not None else 0.0
        return self.train_time_s + running

    def real_time_s(self) -> float:
        """Training time so far in real seconds."""
        running = self.clock.real_now() - self._epoch_real_start if self._epoch_start is not None else 0.0
        return self.real_train_time_s + running

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_peak_rss_mb = current_rss_mb()
        self._queue_depth = None
        self._epoch_start = self.clock.now()
        self._epoch_real_start = self.clock.real_now()

    @property
    def running(self) -> bool:
        """An epoch has started and not ended (its time counts)."""
        return self._epoch_start is not None

    def end_epoch(self, tick: bool = True) -> None:
        try:
            if tick:
                self.tick()
        finally:
            self.train_time_s, self.real_train_time_s = self.wall_time_s(), self.real_time_s()
            self._epoch_start = None

    def tick(self, queue_depth: Optional[int] = None) -> None:
        """Consumes newly finished steps: losses, progress bar, periodic train records.

        Args:
          queue_depth: items waiting in the trainer's hand-off queues now (its crew's `queue_depth()`).
        Raises:
          DivergedError: a finished step's loss is NaN or infinite (the steps before it are counted).
        """
        if queue_depth is not None:
            self._queue_depth = queue_depth
        end = len(self._done)
        advanced = 0
        try:
            while self._cursor < end:
                seq, loss = self._done[self._cursor]
                value = float(loss)  # the item finished, so this does not wait on the device
                self._cursor += 1
                if not math.isfinite(value):
                    raise DivergedError(f"non-finite training loss ({value}) at step {self.steps + 1} "
                                        f"(batch {seq})", step=self.steps + 1, seq=seq)
                self.losses.append(value)
                self._window.append(value)
                self._above.add(seq)
                while self.done_through + 1 in self._above:
                    self.done_through += 1
                    self._above.discard(self.done_through)
                self.steps += 1
                advanced += 1
                if self.steps % self.log_every == 0:
                    self._log_train()
        finally:
            if self._bar is not None and advanced:
                wall = max(self.wall_time_s(), 1e-9)
                self._bar.update(advanced)
                self._bar.set_postfix(loss=f"{self.losses[-1]:.4f}", samples_s=f"{self.samples / wall:.0f}",
                                      refresh=False)
        self.rss_mb = current_rss_mb()
        self.run_peak_rss_mb = max(self.run_peak_rss_mb, self.rss_mb)
        self.epoch_peak_rss_mb = max(self.epoch_peak_rss_mb, self.rss_mb)
        if self.on_tick is not None:
            self.on_tick()

    def state(self) -> dict:
        """What a checkpoint keeps of the recorder (at its low-water mark `done_through`)."""
        return {"steps": self.done_through + 1, "losses": self.losses[:self.done_through + 1],
                "train_time_s": self.wall_time_s(), "real_train_time_s": self.real_time_s(), "epoch": self.epoch}

    def restore(self, state: dict) -> None:
        """Continues from a checkpoint's `state()`: the next batch is seq `state["steps"]`."""
        self.steps = self._base = self.done_through = state["steps"]
        self.done_through -= 1
        self.losses = list(state["losses"])
        self.train_time_s = state["train_time_s"]
        self.real_train_time_s = state.get("real_train_time_s", state["train_time_s"])
        self.epoch = state["epoch"]
        if self._bar is not None:
            self._bar.update(self.steps)

    def _log_train(self) -> None:
        wall = self.wall_time_s()
        record = {"event": "train", "epoch": self.epoch, "step": self.steps, "samples": self.samples,
                  "time_s": wall, "wall_time_s": round(self.real_time_s(), 4), "loss": float(np.mean(self._window)),
                  "samples_per_s": self.samples / wall if wall > 0 else 0.0, "rss_mb": round(self.rss_mb, 1)}
        if self._queue_depth is not None:
            record["queue_depth"] = self._queue_depth
        self.log(record)
        self._window = []

    def log(self, record: dict) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def train_loss(self, last: int = 50) -> float:
        return float(np.mean(self.losses[-last:])) if self.losses else float("nan")

    def staleness(self) -> dict:
        return summarize_staleness(self.updates, self.stage_names)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
