"""One device's view of the shared store (multi-device runs).

The store's parameters live on the home device (the run's first). Each other device keeps its own
copy of every stage and refreshes it when the store's version of that stage has moved since the copy
was made (a *pull*); gradients it computes are sent home (a *push*) and committed to the store there.
On the home device a view is the store itself: no copies, no transfers, and the fused
backward-and-update unit can be used.

With weight prediction (`--staleness-correction ...,predict`) a view reads every stage's predicted
parameters (`staleness.predicted_params`) in place of its current ones, on every device: the forward
passes, and the gradients taken at them, see where the weights are going, while the store's commits
still apply each update to the current parameters.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import jax

from asyncsgd.clock import WALL, Clock
from asyncsgd.staleness import predicted_params
from asyncsgd.store import ParamStore, Slot
from asyncsgd.units import tree_nbytes


class DeviceView:
    """Device `index`'s copies of the store's stages.

    Shared by the workers of one device: two of them may refresh the same stage at once, which costs a
    copy but is safe (a copy is an immutable slot swapped in by reference).

    Args:
      store: the shared store (on the home device).
      devices: the run's devices; `devices[0]` is home.
      index: which of them this view is for.
      clock: the run's clock; pulls are charged to the home device's link, pushes to this device's.
      predict: read the predicted parameters (module docstring).
    """

    remote = False  # a Ray worker's view of the stage servers is (asyncsgd/cluster/worker.py)

    def __init__(self, store: ParamStore, devices: list, index: int, clock: Clock = WALL, predict: bool = False):
        self.store = store
        self.predict = predict
        self.clock = clock
        self.index = index
        self.device = devices[index]
        self.home = devices[0]
        self.is_home = index == 0
        # Several real devices: every array is committed to one (the store starts so, see assemble.py),
        # batches included, so each unit runs with the placements it was compiled for.
        self._commit_batches = len(set(devices)) > 1
        self._copies: list[Optional[Slot]] = [None] * len(store)
        self._sources: list[Optional[Slot]] = [None] * len(store)
        self._lock = threading.Lock()
        self.pulls = 0  # stage copies made (version moved since the last copy)
        self.pull_bytes = 0  # bytes those copies moved from home to this device
        self.push_bytes = 0  # bytes this device sent home (gradients, batch-norm statistics)

    def read(self, stage: int) -> Slot:
        """The store's current slot of `stage`, with params (the predicted ones where the view
        predicts) and state on this device."""
        slot = self.store.read(stage)
        if self.predict:
            slot = slot._replace(params=predicted_params(slot.params, slot.opt_state))
        if self.is_home:
            return slot
        copy = self._copies[stage]
        source = self._sources[stage]
        if copy is None or source.version != slot.version or source.state_version != slot.state_version:
            nbytes = tree_nbytes((slot.params, slot.state))
            self.clock.transfer(0, nbytes)  # home sends the stage
            params, state = jax.device_put((slot.params, slot.state), self.device)
            copy = slot._replace(params=params, state=state, opt_state=None)
            with self._lock:
                self._copies[stage], self._sources[stage] = copy, slot
                self.pulls += 1
                self.pull_bytes += nbytes
        return copy

    def source(self, stage: int, copy: Slot) -> Slot:
        """The home slot `copy` (returned by `read`) was made from (on home, `copy` itself)."""
        if self.is_home:
            return copy
        with self._lock:
            source = self._sources[stage]
        # A newer refresh may have replaced the source meanwhile; the versions tell them apart.
        if source.version == copy.version and source.state_version == copy.state_version:
            return source
        return copy._replace(params=jax.device_put(copy.params, self.home),
                             state=jax.device_put(copy.state, self.home))

    def local(self, stage: int) -> Any:
        """Parameters of `stage` on this device without refreshing (any recent version; for units
        that take parameters only for their shape, such as a stash-mode backward)."""
        if self.is_home:
            return self.store.read(stage).params
        copy = self._copies[stage]
        return copy.params if copy is not None else self.read(stage).params

    def to_home(self, tree: Any) -> Any:
        """Sends arrays computed here to the home device (a no-op on home)."""
        if self.is_home:
            return tree
        nbytes = tree_nbytes(tree)
        self.clock.transfer(self.index, nbytes)
        with self._lock:
            self.push_bytes += nbytes
        return jax.device_put(tree, self.home)

    def put(self, tree: Any) -> Any:
        """Places host or home arrays (a batch) on this device (on home: commits them there, no copy;
        a no-op with one real device)."""
        return jax.device_put(tree, self.device) if self._commit_batches else tree
