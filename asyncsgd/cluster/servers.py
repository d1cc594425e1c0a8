"""Stage servers: the layer-wise parameter server, one Ray actor per group of stages.

A server holds, for each of its stages, the same `Slot` the local `ParamStore` holds (version,
parameters, optimiser state) in a `ParamStore` of its own, and applies pushed gradients with the
stage's compiled `update` unit under that store's commit rule. It is a plain class here; the backend
wraps it with `ray.remote` (so importing this module needs no Ray).
"""

from __future__ import annotations

import collections
import os
import socket
import time
from typing import Any, Sequence

import jax
import numpy as np

from asyncsgd.config import TrainConfig
from asyncsgd.models import get_model
from asyncsgd.optim import make_optimizer
from asyncsgd.staleness import needs_read_params, predicted_params
from asyncsgd.store import ParamStore
from asyncsgd.trainers.lapsgd import tree_mean
from asyncsgd.units import Units, tree_nbytes

# A dc correction needs the parameters each gradient was taken at: a server keeps what it served for
# the newest versions of each stage, at most this many versions and this many bytes per server (split
# evenly among its stages). A gradient read from an older version gets no dc term (counted as missed).
READ_KEEP_VERSIONS = 128
READ_KEEP_BYTES = 512 * 2**20


def split_stages(sizes: Sequence[int], servers: int) -> list[list[int]]:
    """Contiguous groups of stage indices, at most `servers` of them, of about equal total size."""
    servers = max(1, min(servers, len(sizes)))
    total, groups, current, done = float(sum(sizes)), [], [], 0.0
    for index, size in enumerate(sizes):
        current.append(index)
        done += size
        remaining_groups = servers - len(groups) - 1
        remaining_stages = len(sizes) - index - 1
        if remaining_groups and (done >= total * (len(groups) + 1) / servers or remaining_stages == remaining_groups):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


class StageServer:
    """Versioned parameters and optimiser state of `stages`; applies pushed gradients.

    Args:
      config: the run's configuration, as a dict (`dataclasses.asdict(TrainConfig)`).
      shapes: `input_shape`, `num_classes`, `vocab_size` of the data and the run's `total_steps`.
      stages: the model's stage indices this server holds.
      slots: per stage `(stage, version, params, opt_state)` as NumPy trees (`host_slots` of the driver's store).
      t0: the driver's `time.time()` at the start (update times are seconds since then).
    """

    def __init__(self, config: dict, shapes: dict, stages: Sequence[int], slots: Sequence[tuple], t0: float):
        config = TrainConfig(**config)
        model = get_model(config.model, tuple(shapes["input_shape"]), shapes["num_classes"], norm=config.norm,
                          vocab_size=shapes["vocab_size"])
        self.units = Units(model, make_optimizer(config, shapes["total_steps"]), config.residuals)
        self.stages = list(stages)
        self.names = [model.stage_names[stage] for stage in self.stages]
        self.t0 = t0
        self._updates: list[tuple] = []
        # Copies trainers (LAP-SGD): every worker's latest snapshot of these stages (a worker that has
        # sent none yet still holds what it started from: the stages' parameters at the last load).
        self._latest: dict[int, list] = {}
        self._members = set(range(config.devices))
        by_stage = {slot[0]: slot for slot in slots}
        self.store = ParamStore(self.names, [jax.device_put(by_stage[s][2]) for s in self.stages],
                                [jax.device_put(by_stage[s][3]) for s in self.stages])
        # dc: per stage, version -> the parameters served for it (what the gradient pushed later was taken at)
        self.keeps_read = needs_read_params(config.staleness_correction)
        self._served: list[collections.OrderedDict] = [collections.OrderedDict() for _ in self.stages]
        budget = READ_KEEP_BYTES // max(len(self.stages), 1)
        self.read_keep = [max(2, min(READ_KEEP_VERSIONS, budget // max(tree_nbytes(self.store.read(local).params), 1)))
                          for local in range(len(self.stages))]
        self.read_misses = 0
        self.load(slots)
        for local, stage in enumerate(self.stages):  # compile before the first push
            slot = self.store.read(local)
            jax.block_until_ready(self.units.update[stage](slot.params, slot.opt_state, slot.params, 0, slot.params))

    def info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "stages": self.names}

    def pull(self, stage: int, have_version: int):
        """`None` when `have_version` is the stage's version, else `(version, params)` with the params
        as NumPy arrays (the reply itself goes through the object store, to the caller that owns it);
        with weight prediction the params are the stage's predicted ones (`staleness.predicted_params`).

        Not an object ref put once per version: a worker's get of such a ref (owned by this server,
        borrowed through the reply) hung now and then while the server replaced it with the next
        version's (1 run in 7 of a 2-worker Hogwild run, Ray 2.60); a plain reply cannot."""
        local = self.stages.index(stage)
        slot = self.store.read(local)
        if slot.version == have_version:
            return None
        params = predicted_params(slot.params, slot.opt_state)
        if self.keeps_read:
            served = self._served[local]
            served[slot.version] = params
            served.move_to_end(slot.version)
            while len(served) > self.read_keep[local]:
                served.popitem(last=False)
        return slot.version, jax.device_get(params)

    def push(self, stage: int, grads: Any, version_read: int, worker: str, t_read: float) -> int:
        """Applies one gradient of `stage`, computed from `version_read`; returns the version it was
        applied to (staleness = that minus `version_read`). A dc correction compares the parameters now
        with those served for `version_read` (`pull`); where they are no longer kept, with the
        parameters now (no dc term; counted in `read_misses`)."""
        local = self.stages.index(stage)
        grads = jax.device_put(grads)
        update = self.units.update[stage]
        read = self._served[local].get(version_read) if self.keeps_read else None
        if self.keeps_read and read is None:
            self.read_misses += 1
        commit = self.store.commit(local, lambda params, opt_state: update(
            params, opt_state, grads, self.store.staleness(local, version_read), params if read is None else read))
        version = commit.before.version
        self._updates.append((stage, version_read, version, worker, t_read, time.time() - self.t0))
        return version

    def average(self, position: int, params: Sequence[Any]) -> list:
        """Worker `position`'s snapshot of these stages in, the mean of every member's latest snapshot
        out (NumPy trees, in stage order). The mean becomes these stages' parameters (what is evaluated
        and checkpointed) and their version counts averaging rounds."""
        self._latest[position] = [jax.device_put(tree) for tree in params]
        rows = [self._latest.get(member, self._base) for member in sorted(self._members | {position})]
        means = [tree_mean(column) for column in zip(*rows)]
        for local, mean in enumerate(means):
            self.store.commit(local, lambda params, opt_state, mean=mean: (mean, opt_state))
        return jax.device_get(means)

    def forget(self, position: int) -> None:
        """Worker `position` is gone for good (dropped): its copy leaves the average."""
        self._members.discard(position)
        self._latest.pop(position, None)

    def load(self, slots: Sequence[tuple]) -> None:
        """Replaces its stages with `(stage, version, params, opt_state)` (a resumed run's checkpoint)."""
        by_stage = {slot[0]: slot for slot in slots}
        ordered = [by_stage[stage] for stage in self.stages]
        self.store.load([s[1] for s in ordered], [jax.device_put(s[2]) for s in ordered],
                        [jax.device_put(s[3]) for s in ordered], self.store.states(), [0] * len(ordered))
        self._base = self.store.params()
        self._latest.clear()
        for served in self._served:  # the versions start again from the loaded ones
            served.clear()

    def read_stats(self) -> dict:
        """What a dc correction kept: per stage the most versions kept, and the pushes whose read
        parameters were no longer kept (applied without the dc term)."""
        return {"stages": self.names, "versions_kept": self.read_keep, "misses": self.read_misses}

    def take_updates(self) -> list[tuple]:
        """Every update applied since the last call: `(stage, version_read, version_commit, worker,
        t_read, t_commit)`."""
        updates, self._updates = self._updates, []
        return updates

    def slots(self) -> list[tuple]:
        """Per stage `(stage, version, params, opt_state)` as NumPy trees (for evaluation and checkpoints)."""
        out = []
        for local, stage in enumerate(self.stages):
            slot = self.store.read(local)
            out.append((stage, slot.version, *jax.device_get((slot.params, slot.opt_state))))
        return out


def host_tree(tree: Any) -> Any:
    """`tree` with every leaf a NumPy array (what crosses to and from the actors)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def host_slots(store: ParamStore, stages: Sequence[int]) -> list[tuple]:
    """`(stage, version, params, opt_state)` of `stages` of `store`, as NumPy trees (a server's slots)."""
    return [(stage, store.read(stage).version, host_tree(store.read(stage).params),
             host_tree(store.read(stage).opt_state)) for stage in stages]
