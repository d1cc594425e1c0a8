"""The forward and the backward pass through the store, shared by layerwise, pdasgd and dasgd.

A forward pass reads each stage's `(version, params, state)` just before running that stage, commits
the stage's new batch-norm statistics right away (merged into whatever is current, see
`StagedModel.merge_state`; stages without state skip this) and returns a `WorkItem`; a backward pass walks the stages from the last to the first. With layer-wise commits it
commits stage l as soon as its gradient exists (PD-ASGD); otherwise it collects every gradient and
commits the whole model at the end (D-ASGD, the block-update ablation).

Both run on one device through that device's `DeviceView`: on the home device straight on the store
(the backward fuses each stage's update), on another device on its refreshed copies, with each
gradient sent home and applied there by the stage's `update` unit.

Each unit is charged to the run's clock (`clock.compute(device, unit)`) just before it is called and
outside every lock: on the wall clock that does nothing; on a simulated clock it is where virtual
time passes.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax

from asyncsgd.data.dataset import Batch
from asyncsgd.trainers.placement import DeviceView
from asyncsgd.trainers.session import Session
from asyncsgd.units import has_state


class WorkItem(NamedTuple):
    """A finished forward pass handed to a backward worker.

    Arrays crossing the thread boundary: `residuals[l]` (stage l's pullback or input), `dlogits_BxC`.
    """

    seq: int
    loss: jax.Array
    dlogits_BxC: jax.Array
    residuals: tuple
    versions_read: tuple[int, ...]
    times_read: tuple[float, ...]
    ticket: tuple = (0, -1)  # the run-ahead window slot it holds (released after its backward pass)
    # Per stage, the home parameters the forward pass read when a `dc` correction needs them (stash
    # mode: the gradient is taken there), else None.
    params_read: tuple = ()


def forward_pass(worker, session: Session, batch: Batch, sync_each_stage: bool,
                 view: Optional[DeviceView] = None) -> WorkItem:
    """Runs every forward unit on the store's current parameters, then the loss head.

    Args:
      sync_each_stage: wait for stage l's output before reading stage l+1, so each read is as fresh
        as possible (what a forward thread on a device does); off for the sequential trainer.
      view: the device to run on (default: home).
    """
    units, store, clock = session.units, session.store, session.clock
    view = view or session.views[0]
    keep = session.keeps_read_params and units.residuals == "stash"
    x, y = view.put((batch.x, batch.y))
    residuals, versions, times, reads = [], [], [], []
    for index, name in enumerate(session.model.stage_names):
        worker.beat(f"forward stage {name} (item {batch.seq})")
        slot = view.read(index)
        versions.append(slot.version)
        times.append(clock.now())
        reads.append(view.source(index, slot).params if keep else None)
        clock.compute(view.index, f"forward/{name}")
        x, res, new_state = units.forward[index](slot.params, slot.state, x)
        residuals.append(res)
        if has_state(slot.state):
            read, new = view.source(index, slot).state, view.to_home(new_state)
            store.commit_state(index, lambda current, index=index, read=read, new=new:
                               units.merge_state[index](current, read, new))
        if sync_each_stage:
            clock.settle(x)  # blocks (wall clock): the next stage's read must come after this stage ran
    clock.compute(view.index, "loss_grad")
    loss, dlogits = units.loss_grad(x, y)
    return WorkItem(batch.seq, loss, dlogits, tuple(residuals), tuple(versions), tuple(times),
                    params_read=tuple(reads))


def backward_pass(worker, session: Session, item: WorkItem, layerwise: bool, sync_each_stage: bool,
                  view: Optional[DeviceView] = None) -> Any:
    """Walks the stages from last to first and commits the updates.

    Args:
      layerwise: commit each stage as soon as its gradient exists (PD-ASGD); otherwise commit the
        whole model after the full backward (D-ASGD).
      sync_each_stage: wait for each stage's input gradient before moving on (a backward thread's
        real pace; it also keeps a committed update computed before others read it).
      view: the device the item's forward pass ran on (default: home).
    Returns:
      The last array dispatched (block on it to wait for the whole pass).
    """
    units, store, recorder, clock = session.units, session.store, session.recorder, session.clock
    view = view or session.views[0]
    recompute = units.residuals == "recompute"
    keep = session.keeps_read_params
    names = session.model.stage_names
    dy = item.dlogits_BxC
    grads: list = [None] * len(names)
    reads: list = [None] * len(names)  # home parameters each gradient was taken at (dc only)
    last = dy
    for index in reversed(range(len(names))):
        worker.beat(f"backward stage {names[index]} (item {item.seq})")
        residuals = item.residuals[index]
        if item.params_read:  # stash mode with dc: the forward pass kept them
            reads[index] = item.params_read[index]
        if layerwise and view.is_home:
            clock.compute(0, f"backward_update/{names[index]}")

            def update(params, opt_state, index=index, residuals=residuals, dy=dy):
                return units.backward_update[index](params, opt_state, residuals, dy,
                                                    store.staleness(index, item.versions_read[index]),
                                                    _or_current(reads[index], params))
            commit = store.commit(index, update)
            dy = commit.extra
        else:
            # Recompute mode differentiates at the current parameters; stash mode ignores them.
            slot = view.read(index) if recompute else None
            params = slot.params if recompute else view.local(index)
            clock.compute(view.index, f"backward/{names[index]}")
            grads[index], dy = units.backward[index](params, residuals, dy)
            if keep and recompute:  # the gradient was taken at this device's copy of that version
                reads[index] = view.source(index, slot).params
            last = dy if dy is not None else grads[index]
        if layerwise and view.remote:  # a Ray worker: the stage's server applies it (asyncsgd/cluster)
            view.push(index, grads[index], item.versions_read[index], worker.name, item.times_read[index])
        elif layerwise and not view.is_home:  # the gradient is pushed home and applied to the store there
            pushed = view.to_home(grads[index])
            clock.compute(0, f"update/{names[index]}")
            commit = store.commit(index, lambda p, o, index=index, g=pushed, r=reads[index]: units.update[index](
                p, o, g, store.staleness(index, item.versions_read[index]), _or_current(r, p)))
        if layerwise and not view.remote:  # a server records its own updates
            recorder.committed(index, item.versions_read[index], commit.before.version, worker.name,
                               item.times_read[index])
            last = dy if dy is not None else commit.after.params
        if sync_each_stage:
            clock.settle(last)  # blocks (wall clock): this stage's work finishes before the next starts
    if not layerwise and view.remote:  # a Ray worker: the whole model's gradients go to the servers at once
        worker.beat(f"pushing the whole model (item {item.seq})")
        for index in range(len(names)):
            view.push(index, grads[index], item.versions_read[index], worker.name, item.times_read[index])
        return last
    if not layerwise:
        worker.beat(f"committing the whole model (item {item.seq})")
        grads = view.to_home(grads)

        def update_all(params, opts, states):
            staleness = [store.staleness(index, item.versions_read[index]) for index in range(len(names))]
            read = [_or_current(r, p) for r, p in zip(reads, params)]
            return (*units.model_update(params, opts, grads, staleness, read), states, None)
        clock.compute(0, "model_update")
        commits = store.commit_all(update_all)
        recorder.committed_all(commits, worker.name, item.versions_read, item.times_read)
        last = commits[0].after.params
    return last


def _or_current(read, params):
    """The parameters a gradient was taken at where they were kept (a dc correction), else the current
    ones (nothing reads them then; recompute mode on the home device differentiates at them anyway)."""
    return params if read is None else read
