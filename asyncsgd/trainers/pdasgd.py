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
`max_inflight` items ahead, so the window holds N * (max_inflight + 1) items. Delays (`--delay`): a
straggler's workers sleep after each forward and each backward pass; random delays and stalls
follow each finished backward pass (the push of the item's updates).
"""

from __future__ import annotations

import time

import jax

from asyncsgd.trainers.passes import backward_pass, forward_pass
from asyncsgd.trainers.session import EpochPlan, Session, epoch_crew, make_tickets
from asyncsgd.workers import Channel, Tickets


def window_size(max_inflight: int, devices: int = 1) -> int:
    return devices * (max_inflight + 1)


def staleness_bound(max_inflight: int, devices: int = 1) -> int:
    """The largest staleness the (global) window allows (see the module docstring)."""
    return 2 * (window_size(max_inflight, devices) - 1)


def _forward_worker(worker, session: Session, batches, items, window: Tickets, device: int, index: int) -> None:
    view, delay = session.views[device], session.worker_delay(worker, device, index)
    while True:
        batch = worker.get(batches)
        ticket = window.acquire(worker, device, batch.seq)
        start = time.perf_counter()
        item = forward_pass(worker, session, batch, sync_each_stage=session.config.stage_sync,
                            view=view)._replace(ticket=ticket)
        if delay.active:
            jax.block_until_ready(item.loss)  # blocks: the delay scales the measured compute time
            delay.after_compute(time.perf_counter() - start)
        worker.beat(f"handing off item {batch.seq}")
        worker.put(items, item)


def _backward_worker(worker, session: Session, items, window: Tickets, layerwise: bool, device: int,
                     index: int) -> None:
    view, delay = session.views[device], session.worker_delay(worker, device, 1000 + index)
    while True:
        item = worker.get(items)
        start = time.perf_counter()
        last = backward_pass(worker, session, item, layerwise=layerwise, sync_each_stage=session.config.stage_sync,
                             view=view)
        jax.block_until_ready((last, item.loss))  # blocks: an item is finished once its whole backward ran
        delay.after_compute(time.perf_counter() - start)
        window.release(item.ticket)
        session.recorder.item_done(item.seq, item.loss)
        delay.after_push()


def _run(session: Session, plan: EpochPlan, layerwise: bool) -> None:
    config = session.config
    devices = max(1, len(session.devices))
    crew, batches = epoch_crew(session, plan, consumers=config.forward_threads * devices)
    window = make_tickets(session, config.max_inflight + 1, plan)
    channels = []
    for device in range(devices):
        items = Channel(f"items@{device}", max(1, config.max_inflight), producers=config.forward_threads)
        channels.append(items)
        tag = f"@{device}" if devices > 1 else ""
        for index in range(config.forward_threads):
            crew.spawn(f"forward-{index}{tag}", _forward_worker, session, batches, items, window, device, index,
                       closes=[items])
        for index in range(config.backward_threads):
            crew.spawn(f"backward-{index}{tag}", _backward_worker, session, items, window, layerwise, device,
                       index)
    session.recorder.queue_depth = lambda: sum(channel.qsize() for channel in channels)
    try:
        crew.run(tick=session.recorder.tick)
    finally:
        session.recorder.queue_depth = None


def run_pdasgd(session: Session, plan: EpochPlan) -> None:
    _run(session, plan, layerwise=True)


def run_dasgd(session: Session, plan: EpochPlan) -> None:
    _run(session, plan, layerwise=False)
