"""Worker actors: one per device, running the trainer's own threads against the stage servers.

A worker builds its own session (its process's JAX, its compiled forward and backward units, the
dataset read from its files) and runs the trainer's epoch function unchanged on its share of each
chunk of batches. The only difference from a local run is its view of the model, `RemoteView`:
reads pull from the stage servers, layer-wise commits push to them. A copies trainer's worker
(LAP-SGD) keeps the session's own store as its copy instead and averages it through the same view
(`RemoteView.average`). It is a plain class here; the backend wraps it with `ray.remote`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import threading
import time
from typing import Any, Optional, Sequence

import jax

from asyncsgd import trainers
from asyncsgd.assemble import build_session, prepare_dataset
from asyncsgd.clock import WALL
from asyncsgd.config import TrainConfig
from asyncsgd.errors import StallError
from asyncsgd.store import Slot
from asyncsgd.trainers import EpochPlan
from asyncsgd.units import tree_nbytes
from asyncsgd.workers import current_worker

# Pushes a worker may have on their way to the servers before its backward thread waits for the oldest.
MAX_PENDING_PUSHES = 32
# A wait for a server's reply wakes this often to ask again (a fetch another get cancelled starts
# again), to check the waiting crew thread's stop event, and to say what it waits for (`waiting`).
WAIT_POLL_S = 0.2


class RemoteView:
    """A worker's view of the model on the stage servers (the interface of `trainers.placement.DeviceView`).

    Args:
      servers: the stage servers' actor handles.
      owner: for each stage, the index of the server that holds it.
      t0: the driver's `time.time()` at the start (read times are seconds since then).
    """

    remote = True
    is_home = False
    index = 0  # its device in its own process (the run's clock charges nothing on the wall clock)

    def __init__(self, servers: Sequence[Any], owner: Sequence[int], t0: float):
        import ray
        self._ray, self.servers, self.owner, self.t0 = ray, list(servers), list(owner), t0
        # One ray.get at a time in this process: concurrent gets from several threads of one actor task
        # can cancel each other's object fetches and hang (ray-project/ray#54007; seen here: two
        # Hogwild threads stuck in a pull whose server was idle).
        self._get_lock = threading.Lock()
        self._copies: list = [None] * len(owner)
        # read times are on this process's clock (perf_counter); the servers' count from the driver's t0
        self.to_run_time = (time.time() - t0) - WALL.now()
        self._pending: collections.deque = collections.deque()
        self.pulls = self.pull_bytes = self.push_bytes = self.pushes = 0
        self.waiting: Optional[tuple[str, float]] = None  # (what, since when) while a reply is awaited
        self.tag = f"@{socket.gethostname()}:{os.getpid()}"  # after a thread's name: which worker process

    def read(self, stage: int) -> Slot:
        """The stage's newest parameters: fetched only when the server's version moved."""
        copy = self._copies[stage]
        server = self.owner[stage]
        reply = self._get(self.servers[server].pull.remote(stage, -1 if copy is None else copy.version),
                          f"the version of stage {stage} from stage server {server}")
        if reply is not None:
            version, params = reply
            params = jax.device_put(params)
            copy = Slot(version, params, None, {}, 0)
            self._copies[stage] = copy
            self.pulls += 1
            self.pull_bytes += tree_nbytes(params)
        return copy

    def source(self, stage: int, copy: Slot) -> Slot:
        return copy

    def local(self, stage: int) -> Any:
        copy = self._copies[stage]
        return copy.params if copy is not None else self.read(stage).params

    def put(self, tree: Any) -> Any:
        return tree

    def push(self, stage: int, grads: Any, version_read: int, worker: str, t_read: float) -> None:
        """Sends one stage's gradient to its server without waiting for it to be applied."""
        host = jax.device_get(grads)  # blocks: this gradient is computed
        self.push_bytes += tree_nbytes(host)
        self.pushes += 1
        t_read += self.to_run_time
        self._pending.append(self.servers[self.owner[stage]].push.remote(
            stage, host, version_read, worker + self.tag, t_read))
        while len(self._pending) > MAX_PENDING_PUSHES:
            try:
                oldest = self._pending.popleft()
            except IndexError:  # another thread took it
                break
            self._get(oldest, "the oldest pending push")  # blocks: back-pressure on a slow server

    def average(self, position: int, params: Sequence[Any]) -> list:
        """Trades worker `position`'s snapshot of every stage for the average of the copies (a copies
        trainer: LAP-SGD); each stage server averages its own stages."""
        host = jax.device_get(list(params))
        groups: dict[int, list[int]] = {}
        for stage in range(len(host)):
            groups.setdefault(self.owner[stage], []).append(stage)
        refs = [self.servers[server].average.remote(position, [host[stage] for stage in stages])
                for server, stages in groups.items()]
        mean: list = [None] * len(host)
        for stages, reply in zip(groups.values(), self._get(refs, "the average of the copies")):
            for stage, tree in zip(stages, reply):
                mean[stage] = tree
        self.pushes += 1
        self.pulls += 1
        self.push_bytes += tree_nbytes(host)
        self.pull_bytes += tree_nbytes(mean)
        return jax.device_put(mean)

    def slots(self) -> list:
        """Every stage's `(stage, version, params, opt_state)` on the servers, in stage order."""
        replies = self._get([server.slots.remote() for server in self.servers], "the servers' slots")
        return sorted((slot for reply in replies for slot in reply), key=lambda slot: slot[0])

    def flush(self) -> None:
        """Waits until every push sent so far has been applied (raises a server's error)."""
        pending = list(self._pending)
        self._pending.clear()
        self._get(pending, f"{len(pending)} pending pushes")

    def _get(self, refs, what: str):
        """`ray.get(refs)`, one at a time in this process; a reply that takes longer than `WAIT_POLL_S`
        is waited for again (a fetch another get cancelled starts again) and named in `waiting`. A
        crew thread that waits checks its crew's stop event at each poll and raises `Stopped` (a
        stopped epoch never leaves a thread waiting on a server that does not answer)."""
        worker = current_worker()
        check = worker.check if worker is not None else (lambda: None)
        while not self._get_lock.acquire(timeout=WAIT_POLL_S):
            check()
        try:
            listed = refs if isinstance(refs, list) else [refs]
            if not listed:
                return []
            self.waiting = (what, time.time())
            try:
                while len(self._ray.wait(listed, num_returns=len(listed), timeout=WAIT_POLL_S)[0]) < len(listed):
                    check()
                return self._ray.get(refs)
            finally:
                self.waiting = None
        finally:
            self._get_lock.release()

    def describe_wait(self) -> str:
        """What this view waits for now, if anything ('' when nothing)."""
        waiting = self.waiting
        return "" if waiting is None else f"; waiting {time.time() - waiting[1]:.0f}s for {waiting[0]}"


class Worker:
    """One worker device of a Ray run.

    Args:
      config: the run's configuration, as a dict.
      position, count: this worker's index among the `count` workers (its share of every chunk).
      servers, owner: the stage servers and which one holds each stage.
      t0: the driver's start time.
    """

    def __init__(self, config: dict, position: int, count: int, servers: Sequence[Any], owner: Sequence[int],
                 t0: float):
        config = dataclasses.replace(TrainConfig(**config), devices=1, backend="local", ray_address=None, out=None,
                                     progress=False)
        self.config, self.position, self.count = config, position, count
        dataset = prepare_dataset(config)  # from its own files: no dataset through the driver
        self.spec = trainers.get(config.trainer)
        # the units the trainer calls on a device that is not home (no fused update: the servers apply it)
        groups = {"stages": "stages_split"}
        every = tuple(groups.get(group, group) for group in self.spec.units(config, 1)[0])
        session, _ = build_session(config, dataset, unit_groups=every)
        self.view = RemoteView(servers, owner, t0)
        if self.spec.copies:  # its own copy of the model, averaged through the servers (LAP-SGD)
            kit = session.kit._replace(exchange=lambda tree: (self.view.average(position, tree[0]), tree[1]))
            self.session = dataclasses.replace(session, kit=kit)
        else:  # reads pull from the servers, commits push to them
            self.session = dataclasses.replace(session, views=(self.view,))
        self.synced = not self.spec.copies  # a copy starts from the servers' parameters (a restart too)
        self.next_seq = 0
        self.t0 = t0

    def info(self) -> dict:
        return {"position": self.position, "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, epoch: int, first_batch: int, batches: int) -> dict:
        """Trains on this worker's share of batches `first_batch .. first_batch + batches` of `epoch`.

        Returns the losses of the items it finished (in order), the pull/push counts and bytes, and its
        peak items in flight. Every push has been applied when it returns.
        """
        recorder = self.session.recorder
        if not self.synced:
            store = self.session.store
            slots = self.view.slots()
            store.load(store.versions(), jax.device_put([s[2] for s in slots]), jax.device_put([s[3] for s in slots]),
                       store.states(), [slot.state_version for slot in store.slots()])
            self.synced = True
        done_before = len(recorder.losses)
        plan = EpochPlan(epoch, self.next_seq, batches, first_batch, shard=(self.position, self.count))
        recorder.start_epoch(epoch)
        try:
            result = self.spec.run_epoch(self.session, plan)
        except StallError as error:  # name the reply it waits for, if any
            raise StallError(f"{error}{self.view.describe_wait()}") from error
        finally:
            recorder.end_epoch()
        self.view.flush()
        losses = recorder.losses[done_before:]
        self.next_seq += len(losses)
        # updates applied here (a copy's): read times on the driver's time base, as the servers' are
        updates = [(u.stage, u.version_read, u.version_commit, u.worker + self.view.tag,
                    u.t_read + self.view.to_run_time) for u in recorder.updates]
        recorder.updates.clear()
        view = self.view
        return {"losses": losses, "peak_inflight": result.peak_inflight, "window_size": result.window_size,
                "averaging_rounds": result.averaging_rounds, "updates": updates,
                "pulls": view.pulls, "pull_bytes": view.pull_bytes, "pushes": view.pushes,
                "push_bytes": view.push_bytes, "time": time.time() - self.t0}
