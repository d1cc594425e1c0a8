"""ParamStore: the shared model state, and the only locks that guard parameters.

(The thread plumbing in `workers.py` has locks of its own, for its channels and windows; they guard
hand-offs between threads, never model state.)

One slot per stage holds an immutable `Slot(version, params, opt_state, state, state_version)`:
`state` is the stage's mutable non-trained state (batch-norm running statistics, `{}` if none),
written by forward passes through `commit_state` and versioned separately from the parameters. Readers take the slot
reference (atomic in CPython) and get an immutable snapshot; JAX arrays are immutable, so a reader can
never see half an update. Writers commit through `commit`, which runs a read-modify-write under that
stage's lock, so two threads committing to the same stage never lose an update; every commit bumps the
version by exactly one.

The lock is held only while the update is *dispatched*: the update function returns JAX arrays that
may still be computing (async dispatch), and a later reader simply waits on them inside XLA. The
version order therefore equals the order in which the updates are applied to the parameters.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence


class Slot(NamedTuple):
    """An immutable snapshot of one stage."""

    version: int
    params: Any
    opt_state: Any
    state: Any = {}
    state_version: int = 0


class Commit(NamedTuple):
    """What a commit did: the slot it replaced and the slot it installed, plus the update's extra output."""

    before: Slot
    after: Slot
    extra: Any


class ParamStore:
    """Versioned per-stage parameter slots.

    Args:
      names: stage names, in model order.
      params: initial parameters, one pytree per stage.
      opt_states: initial optimiser states, one per stage.
      states: initial mutable states, one per stage (default: none, `{}` each).
    """

    def __init__(self, names: Sequence[str], params: Sequence[Any], opt_states: Sequence[Any],
                 states: Optional[Sequence[Any]] = None):
        states = [{} for _ in names] if states is None else states
        if not (len(names) == len(params) == len(opt_states) == len(states)):
            raise ValueError("names, params, opt_states and states must have one entry per stage")
        self.names = tuple(names)
        self._slots = [Slot(0, p, o, st, 0) for p, o, st in zip(params, opt_states, states)]
        self._locks = [threading.Lock() for _ in names]

    def __len__(self) -> int:
        return len(self._slots)

    def read(self, stage: int) -> Slot:
        """The current slot of `stage` (a reference read: no lock needed, the slot is immutable)."""
        return self._slots[stage]

    def staleness(self, stage: int, version_read: int) -> int:
        """Updates `stage` has received since `version_read`. Inside `update` of a `commit` (or a
        `commit_all`), under the stage's lock, this is the staleness of the update being applied."""
        return self._slots[stage].version - version_read

    def commit(self, stage: int, update: Callable[[Any, Any], tuple]) -> Commit:
        """Atomically replaces stage `stage` with `update(params, opt_state)`.

        Args:
          stage: stage index.
          update: called under the stage's lock with the current params and optimiser state; returns
            `(new_params, new_opt_state)` or `(new_params, new_opt_state, extra)`. It should only
            dispatch device work, never wait for it.
        Returns:
          A `Commit` with the replaced and the installed slot and `extra` (or None).
        """
        with self._locks[stage]:
            before = self._slots[stage]
            result = update(before.params, before.opt_state)
            extra = result[2] if len(result) == 3 else None
            after = before._replace(version=before.version + 1, params=result[0], opt_state=result[1])
            self._slots[stage] = after
        return Commit(before, after, extra)

    def commit_state(self, stage: int, update: Callable[[Any], Any]) -> Slot:
        """Atomically replaces stage `stage`'s mutable state with `update(state)`; bumps `state_version`
        (the parameter version is unchanged). Returns the installed slot."""
        with self._locks[stage]:
            before = self._slots[stage]
            after = before._replace(state=update(before.state), state_version=before.state_version + 1)
            self._slots[stage] = after
        return after

    def commit_all(self, update: Callable[[list, list, list], tuple], count: bool = True) -> list[Commit]:
        """Atomically replaces every stage with `update(params_list, opt_list, state_list)`.

        `update` returns `(params_list, opt_list, state_list, extra)`; a stage whose returned state
        is non-empty and not the object it was given gets its `state_version` bumped. Locks are taken in stage
        order (the one global order, so no deadlock with `snapshot`).

        Args:
          count: bump every stage's version (a gradient update). False for a change that is not one
            (LAP-SGD's averaging): versions count gradient updates, so staleness stays theirs.
        Returns:
          One `Commit` per stage; `extra` of each is the update's fourth output.
        """
        self._acquire_all()
        try:
            before = list(self._slots)
            params_list, opt_list, state_list, extra = update(
                [s.params for s in before], [s.opt_state for s in before], [s.state for s in before])
            commits = []
            for stage, (old, params, opt_state, state) in enumerate(zip(before, params_list, opt_list, state_list)):
                new = Slot(old.version + count, params, opt_state, state,
                           old.state_version + (bool(state) and state is not old.state))
                self._slots[stage] = new
                commits.append(Commit(old, new, extra))
            return commits
        finally:
            for lock in reversed(self._locks):
                lock.release()

    def load(self, versions: Sequence[int], params: Sequence[Any], opt_states: Sequence[Any], states: Sequence[Any],
             state_versions: Sequence[int]) -> None:
        """Replaces every slot (a restored checkpoint); only before any worker runs."""
        if not (len(versions) == len(params) == len(opt_states) == len(states) == len(state_versions) == len(self)):
            raise ValueError("load needs one entry per stage")
        with contextlib.ExitStack() as stack:
            for lock in self._locks:
                stack.enter_context(lock)
            self._slots = [Slot(int(v), p, o, st, int(sv))
                           for v, p, o, st, sv in zip(versions, params, opt_states, states, state_versions)]

    def _acquire_all(self, timeout: Optional[float] = None) -> None:
        """Takes every stage lock in stage order; on a timeout or an exception (a Ctrl+C landing in
        the main thread) releases the ones taken, so no lock is ever left held."""
        taken = 0
        try:
            for lock in self._locks:
                if not lock.acquire(timeout=-1 if timeout is None else timeout):
                    raise TimeoutError(f"store: a stage stayed locked for over {timeout}s")
                taken += 1
        except BaseException:
            for lock in reversed(self._locks[:taken]):
                lock.release()
            raise

    def snapshot(self, timeout: Optional[float] = None) -> list[Slot]:
        """A consistent whole-model cut: no commit is half-way through while it is taken.

        Args:
          timeout: seconds to wait for each stage lock (default: as long as it takes); `TimeoutError`
            after that.
        """
        self._acquire_all(timeout)
        try:
            return list(self._slots)
        finally:
            for lock in reversed(self._locks):
                lock.release()

    def slots(self) -> list[Slot]:
        """Every stage's current slot without taking any lock (each slot is consistent in itself;
        the stages may be from slightly different moments). For reports, never for a checkpoint."""
        return list(self._slots)

    def params(self) -> list:
        return [slot.params for slot in self.snapshot()]

    def opt_states(self) -> list:
        return [slot.opt_state for slot in self.snapshot()]

    def states(self) -> list:
        return [slot.state for slot in self.snapshot()]

    def versions(self) -> list[int]:
        return [slot.version for slot in self.slots()]
