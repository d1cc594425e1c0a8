"""Checkpoints of a running (possibly asynchronous) run, written atomically, and resuming from them.

A checkpoint is a directory `OUT/checkpoints/step-NNNNNNNN/` holding
  - `trees.msgpack`: every stage's parameters, optimiser state and batch-norm state, for the store and
    (LAP/LPP-SGD) every device's copy (flax msgpack serialisation, restored into the run's own
    freshly built trees, so the structure is checked);
  - `meta.json`: format, position, versions, recorder and evaluator state, the configuration.
It is written to a hidden temporary directory, flushed to disk, then renamed into place, so a crash
at any moment (SIGKILL included) leaves either the complete new checkpoint or none; the last `keep`
are kept. `Checkpointer` decides when (every N steps or seconds, and on Ctrl+C).

Consistency without stopping the workers: the position is the recorder's low-water mark (every batch
up to it has finished; taken first), then each store's `snapshot()` holds the stage locks only while
it copies the slot references (as long as one commit). The snapshot therefore contains every update
of the batches up to the position, plus possibly parts of a few later ones (at most the window's
worth: N x (max-inflight + 1)). Resuming starts at the batch after the position: no batch is lost,
and those few are trained on again (at-least-once). For trainers whose spec says `exact_position`
(one commit of every stage per batch), the position is the store's version itself and a resumed run
continues exactly. The data order and augmentation are seeded by
(seed, epoch) and (seed, batch), so the resumed run sees exactly the batches an uninterrupted one
would; the delay generators restart from their seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Callable, Optional

import flax.serialization
import jax
import jax.numpy as jnp

from asyncsgd.config import parse_every
from asyncsgd.errors import CheckpointError

FORMAT = 1
DIR = "checkpoints"
PREFIX = "step-"


def _trees(stores, timeout: Optional[float] = None) -> list:
    out = []
    for store in stores:
        snap = store.snapshot(timeout)
        out.append({"params": [s.params for s in snap], "opt_states": [s.opt_state for s in snap],
                    "states": [s.state for s in snap],
                    "versions": [s.version for s in snap], "state_versions": [s.state_version for s in snap]})
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out: str, session, position: dict, evaluator: dict, keep: int = 2,
         lock_timeout: Optional[float] = None, exact: bool = False, averaging_rounds: int = 0) -> str:
    """Writes a checkpoint of `session` at `position` (see the module docstring); returns its path.

    Args:
      lock_timeout: give up (`TimeoutError`) if a stage stays locked this long (on Ctrl+C).
      exact: the trainer commits every stage once per batch (the store's versions are the position).
      averaging_rounds: the run's model-averaging rounds so far (restored with the run).
    """
    stores = session.stores
    taken = _trees(stores, lock_timeout)
    if exact:
        # Whole-model commits: the versions count the batches applied, exactly (the recorder may lag
        # by the step the trainer dispatched before reporting the previous one).
        steps = min(taken[0]["versions"])
        position = dict(position, steps=steps, losses=position["losses"][:steps])
    arrays = jax.device_get([{k: t[k] for k in ("params", "opt_states", "states")} for t in taken])
    meta = {"format": FORMAT, "steps": position["steps"], "recorder": position, "evaluator": evaluator,
            "versions": [t["versions"] for t in taken], "state_versions": [t["state_versions"] for t in taken],
            "averaging_rounds": averaging_rounds, "config": session.config.to_dict(),
            "saved_at": time.time()}
    root = os.path.join(out, DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{PREFIX}{position['steps']:08d}")
    tmp = os.path.join(root, f".tmp-{position['steps']:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, payload in (("trees.msgpack", flax.serialization.to_bytes(arrays)),
                          ("meta.json", json.dumps(meta, indent=1).encode())):
        with open(os.path.join(tmp, name), "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out: str) -> list[str]:
    """Complete checkpoints in `out`, oldest first (temporary directories of a crashed save are ignored)."""
    root = os.path.join(out, DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit())
    return [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n, "meta.json"))]


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable meta.json ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {meta.get('format')!r}, this version reads {FORMAT}")
    return meta


def latest(out: str) -> Optional[str]:
    found = checkpoints(out)
    return found[-1] if found else None


def _place_like(values, template):
    """`values` (NumPy) placed where the matching `template` leaves are (uncommitted stays uncommitted,
    so compiled units see the placement they were compiled for)."""
    def place(value, like):
        if isinstance(like, jax.Array) and like.committed:
            return jax.device_put(value, like.sharding)
        return jnp.asarray(value)
    return jax.tree_util.tree_map(place, values, template)


def restore(path: str, session) -> dict:
    """Loads checkpoint `path` into `session`'s store(s); returns its meta (position, evaluator).

    Raises:
      CheckpointError: unreadable, or its trees do not fit the session's model.
    """
    meta = read_meta(path)
    stores = session.stores
    if len(meta["versions"]) != len(stores):
        raise CheckpointError(f"checkpoint {path} holds {len(meta['versions'])} model copies; this run has {len(stores)}")
    template = jax.device_get([{k: t[k] for k in ("params", "opt_states", "states")} for t in _trees(stores)])
    try:
        with open(os.path.join(path, "trees.msgpack"), "rb") as handle:
            values = flax.serialization.from_bytes(template, handle.read())
        values = jax.tree_util.tree_map(lambda v, t: v.reshape(t.shape).astype(t.dtype), values, template)
    except Exception as exc:  # corrupt or foreign data: one line, no traceback
        raise CheckpointError(f"checkpoint {path}: trees.msgpack does not fit this model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    for index, (store, tree) in enumerate(zip(stores, values)):
        live = store.snapshot()
        placed = _place_like(tree, {"params": [s.params for s in live], "opt_states": [s.opt_state for s in live],
                                    "states": [s.state for s in live]})
        store.load(meta["versions"][index], placed["params"], placed["opt_states"], placed["states"],
                   meta["state_versions"][index])
    return meta


class Checkpointer:
    """Writes checkpoints every `config.checkpoint_every` steps or seconds (from the coordinating
    thread, workers running) and on request (an interrupted run).

    Args:
      session: the run's session (its recorder gives the position, its clock the time).
      out: the output directory (None: no checkpoints).
      exact: the trainer's position is exact (see `save`).
      evaluator_state: `() -> dict`, the test evaluator's state to keep.
      averaging_rounds: `() -> int`, the run's averaging rounds so far.
    """

    def __init__(self, session, out: Optional[str], exact: bool, evaluator_state: Callable[[], dict],
                 averaging_rounds: Callable[[], int]):
        self.session, self.out, self.exact = session, out, exact
        self.evaluator_state, self.averaging_rounds = evaluator_state, averaging_rounds
        self.every = parse_every(session.config.checkpoint_every) if out else None
        self.last_steps = 0
        self.last_time = session.clock.now()
        self.last_path: Optional[str] = None

    def maybe_save(self) -> None:
        if self.every is None:
            return
        unit, value = self.every
        recorder = self.session.recorder
        due = (recorder.done_through + 1 - self.last_steps >= value if unit == "steps"
               else self.session.clock.now() - self.last_time >= value)
        if due:
            self.save()

    def save(self, lock_timeout: Optional[float] = None) -> None:
        recorder = self.session.recorder
        position = recorder.state()  # first the position, then the snapshot (at-least-once)
        self.last_path = save(self.out, self.session, position, self.evaluator_state(),
                              keep=self.session.config.keep_checkpoints, lock_timeout=lock_timeout, exact=self.exact,
                              averaging_rounds=self.averaging_rounds())
        steps = read_meta(self.last_path)["steps"]
        self.last_steps, self.last_time = steps, self.session.clock.now()
        recorder.log({"event": "checkpoint", "step": steps, "path": os.path.relpath(self.last_path, self.out)})

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
