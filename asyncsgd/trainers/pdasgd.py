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
"""

from __future__ import annotations

import jax

from asyncsgd.trainers.passes import backward_pass, forward_pass
from asyncsgd.trainers.session import EpochPlan, Session, epoch_crew
from asyncsgd.workers import Channel, Window


def staleness_bound(max_inflight: int) -> int:
    """The largest staleness the window allows (see the module docstring)."""
    return 2 * max_inflight


def _forward_worker(worker, session: Session, batches, items, window: Window) -> None:
    while True:
        batch = worker.get(batches)
        window.acquire(worker, batch.seq)
        item = forward_pass(worker, session, batch, sync_each_stage=session.config.stage_sync)
        worker.beat(f"handing off item {batch.seq}")
        worker.put(items, item)


def _backward_worker(worker, session: Session, items, window: Window, layerwise: bool) -> None:
    while True:
        item = worker.get(items)
        last = backward_pass(worker, session, item, layerwise=layerwise, sync_each_stage=session.config.stage_sync)
        jax.block_until_ready((last, item.loss))  # blocks: an item is finished once its whole backward ran
        window.release(item.seq)
        session.recorder.item_done(item.seq, item.loss)


def _run(session: Session, plan: EpochPlan, layerwise: bool) -> None:
    config = session.config
    crew, batches = epoch_crew(session, plan, consumers=config.forward_threads)
    items = Channel("items", max(1, config.max_inflight), producers=config.forward_threads)
    window = Window(config.max_inflight + 1, first_seq=plan.first_seq)
    for index in range(config.forward_threads):
        crew.spawn(f"forward-{index}", _forward_worker, session, batches, items, window, closes=[items])
    for index in range(config.backward_threads):
        crew.spawn(f"backward-{index}", _backward_worker, session, items, window, layerwise)
    session.recorder.queue_depth = items.qsize
    try:
        crew.run(tick=session.recorder.tick)
    finally:
        session.recorder.queue_depth = None


def run_pdasgd(session: Session, plan: EpochPlan) -> None:
    _run(session, plan, layerwise=True)


def run_dasgd(session: Session, plan: EpochPlan) -> None:
    _run(session, plan, layerwise=False)
