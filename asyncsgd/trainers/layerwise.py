"""`layerwise`: the per-stage units run sequentially through the store; the same math as `sync`.

One thread does forward pass, loss, then the backward pass with a commit per stage. It is the
deterministic reference the threaded trainers are checked against, and it measures what splitting
the step into per-stage units costs by itself.
"""

from __future__ import annotations

import jax

from asyncsgd.trainers.base import EpochPlan, EpochResult, TrainerSpec, fixed_units
from asyncsgd.trainers.passes import backward_pass, forward_pass
from asyncsgd.trainers.session import Epoch, Session


def _layerwise_worker(worker, session: Session, batches) -> None:
    recorder = session.recorder
    pending = None
    try:
        while True:
            batch = worker.get(batches)
            item = forward_pass(worker, session, batch, sync_each_stage=False)
            last = backward_pass(worker, session, item, layerwise=True, sync_each_stage=False)
            if pending is not None:
                jax.block_until_ready(pending[2])  # blocks: keeps the host at most one step ahead
                recorder.item_done(pending[0], pending[1])
            pending = (item.seq, item.loss, last)
    finally:
        if pending is not None and not worker.stopping:
            jax.block_until_ready(pending[2])
            recorder.item_done(pending[0], pending[1])


def run_epoch(session: Session, plan: EpochPlan) -> EpochResult:
    epoch = Epoch(session, plan)
    epoch.crew.spawn("layerwise", _layerwise_worker, session, epoch.batches)
    return epoch.run()


SPEC = TrainerSpec(
    name="layerwise",
    description="the per-stage units run one after another through the store: the same math as sync",
    run_epoch=run_epoch,
    compared_by_default=True,
    units=fixed_units("stages"),
)
