"""`pdasgd` and `dasgd`: decoupled forward and backward worker threads.

F forward workers take batches, run the forward units on the store's current parameters and hand
`WorkItem`s to a bounded channel without waiting for any backward pass. B backward workers take
items and walk the stages from the top: `pdasgd` commits stage l the moment its gradient exists
(layer-wise partial updates, the paper's method); `dasgd` commits the whole model once the full
backward is done (the paper's block-update ablation).

Run-ahead is bounded by a window: item n may start its forward pass only after every item up to
n - (max_inflight + 1) has been fully committed. Every update a stage receives between an item's
read and its commit then comes from the 2 * max_inflight items around it, so the staleness of every
update is at most 2 * max_inflight. With F = B = 1 and max_inflight = 0 the items run strictly one
after another and the result equals `layerwise` exactly (the deterministic mode).

On N devices every device runs its own F forward and B backward workers (with its own channel of
items: residuals stay on the device that made them) over the one shared store; each device may have
`max_inflight` items ahead, so the window holds N * (max_inflight + 1) items. With `--placement
split` (the paper's split of the work across devices) the first device runs the F forward workers
only and each other device runs B backward workers: a finished forward pass's residuals and loss
gradient cross the first device's link to whichever backward device takes the item; one global window
of N * (max_inflight + 1) items. Delays (`--delay`): a
straggler's workers sleep after each forward and each backward pass; random delays and stalls
follow each finished backward pass (the push of the item's updates).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from asyncsgd.trainers.base import EpochPlan, EpochResult, TrainerSpec, UnitGroups
from asyncsgd.trainers.passes import backward_pass, forward_pass
from asyncsgd.errors import ConfigError
from asyncsgd.trainers.passes import WorkItem
from asyncsgd.trainers.session import Epoch, Session
from asyncsgd.units import tree_nbytes
from asyncsgd.workers import Channel, Tickets


def window_size(max_inflight: int, devices: int = 1) -> int:
    return devices * (max_inflight + 1)


def staleness_bound(config) -> Optional[int]:
    """The largest staleness the window allows (see the module docstring); None with per-device
    windows on several devices (a slow item's staleness grows with how far the others get)."""
    if config.devices > 1 and config.window == "device" and config.placement != "split":
        return None
    return 2 * (window_size(config.max_inflight, config.devices) - 1)


def _forward_worker(worker, session: Session, epoch: Epoch, items, window: Tickets, device: int, index: int) -> None:
    view, delay, clock = session.views[device], epoch.delay(worker, device, index), session.clock
    while True:
        batch = worker.get(epoch.batches)
        ticket = window.acquire(worker, device, batch.seq)
        start = clock.now()
        item = forward_pass(worker, session, batch, sync_each_stage=session.config.stage_sync,
                            view=view)._replace(ticket=ticket)
        if delay.active:
            jax.block_until_ready(item.loss)  # blocks: the delay scales the measured compute time
            delay.after_compute(clock.now() - start)
        worker.beat(f"handing off item {batch.seq}")
        worker.put(items, item)


def _hand_over(session: Session, item: WorkItem, device: int) -> WorkItem:
    """A split placement: the item made on the first device moves to backward device `device` (its
    residuals and loss gradient cross the first device's link)."""
    moving = (item.residuals, item.dlogits_BxC)
    session.clock.transfer(0, tree_nbytes(moving))
    residuals, dlogits = jax.device_put(moving, session.devices[device])
    return item._replace(residuals=residuals, dlogits_BxC=dlogits)


def _backward_worker(worker, session: Session, epoch: Epoch, items, window: Tickets, layerwise: bool, device: int,
                     index: int, made_on: int) -> None:
    view, delay, clock = session.views[device], epoch.delay(worker, device, 1000 + index), session.clock
    while True:
        item = worker.get(items)
        if made_on != device:
            item = _hand_over(session, item, device)
        start = clock.now()
        last = backward_pass(worker, session, item, layerwise=layerwise, sync_each_stage=session.config.stage_sync,
                             view=view)
        clock.settle((last, item.loss))  # blocks (wall clock): an item is finished once its whole backward ran
        delay.after_compute(clock.now() - start)
        window.release(item.ticket)
        session.recorder.item_done(item.seq, item.loss)
        delay.after_push()


def _run_split(session: Session, epoch: Epoch, layerwise: bool) -> EpochResult:
    """Forward workers on the first device, backward workers on every other one (one shared channel)."""
    config = session.config
    devices = len(session.devices)
    window = epoch.tickets(config.max_inflight + 1, scope="global")
    items = epoch.crew.track(Channel("items", max(1, config.max_inflight) * (devices - 1),
                                     producers=config.forward_threads))
    for index in range(config.forward_threads):
        epoch.crew.spawn(f"forward-{index}@0", _forward_worker, session, epoch, items, window, 0, index, closes=[items])
    for device in range(1, devices):
        for index in range(config.backward_threads):
            epoch.crew.spawn(f"backward-{index}@{device}", _backward_worker, session, epoch, items, window, layerwise,
                             device, index, 0)
    return epoch.run()


def _run(session: Session, plan: EpochPlan, layerwise: bool) -> EpochResult:
    config = session.config
    devices = max(1, len(session.devices))
    epoch = Epoch(session, plan)
    if config.placement == "split":
        return _run_split(session, epoch, layerwise)
    window = epoch.tickets(config.max_inflight + 1)
    for device in range(devices):
        items = epoch.crew.track(Channel(f"items@{device}", max(1, config.max_inflight),
                                         producers=config.forward_threads))
        tag = f"@{device}" if devices > 1 else ""
        for index in range(config.forward_threads):
            epoch.crew.spawn(f"forward-{index}{tag}", _forward_worker, session, epoch, items, window, device, index,
                             closes=[items])
        for index in range(config.backward_threads):
            epoch.crew.spawn(f"backward-{index}{tag}", _backward_worker, session, epoch, items, window, layerwise,
                             device, index, device)
    return epoch.run()


def run_pdasgd(session: Session, plan: EpochPlan) -> EpochResult:
    return _run(session, plan, layerwise=True)


def run_dasgd(session: Session, plan: EpochPlan) -> EpochResult:
    return _run(session, plan, layerwise=False)


def _check(config) -> None:
    if config.placement == "split" and config.devices < 2:
        raise ConfigError(f"--placement split puts the forward and the backward workers on different devices; "
                          f"it needs --devices 2 or more, got {config.devices}")


def _units(stages: str):
    def units(config, devices: int) -> UnitGroups:
        if devices > 1:  # other devices run forward and backward units; their gradients are applied at home
            return ("stages_split",), (stages, "update")
        return (stages,), ()
    return units


SPEC = TrainerSpec(
    name="pdasgd",
    description="F forward threads, B backward threads (default 1:2), each stage committed as soon as its "
                "gradient exists (the paper's method)",
    run_epoch=run_pdasgd,
    multi_device=True,
    compared_by_default=True,
    units=_units("stages"),
    check=_check,
    placements=("replicated", "split"),
    staleness_bound=staleness_bound,
    backends=("local", "ray"),  # layer-wise pushes to stage servers (asyncsgd/cluster/)
)

DASGD_SPEC = dataclasses.replace(
    SPEC, name="dasgd", run_epoch=run_dasgd, units=_units("stages_split"),
    description="the same threads, but the whole model is committed after the full backward (the paper's "
                "block-update ablation)")
