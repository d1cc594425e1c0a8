"""`sync`: the reference. One jit of the whole training step (forward, backward, update)."""

from __future__ import annotations

from asyncsgd.trainers.base import EpochPlan, EpochResult, TrainerSpec, fixed_units
from asyncsgd.trainers.session import Epoch, Session


def _sync_worker(worker, session: Session, batches) -> None:
    units, store, recorder = session.units, session.store, session.recorder
    pending = None  # (seq, loss) of the step dispatched last
    try:
        while True:
            batch = worker.get(batches)
            worker.beat(f"train step (item {batch.seq})")
            session.clock.compute(0, "train_step")
            commits = store.commit_all(lambda params, opts, states: units.train_step(params, opts, states,
                                                                                     batch.x, batch.y))
            recorder.committed_all(commits, worker.name)
            # Dispatch step t before waiting for step t-1: the device never idles on the host.
            if pending is not None:
                pending[1].block_until_ready()  # blocks: keeps the host at most one step ahead
                recorder.item_done(*pending)
            pending = (batch.seq, commits[0].extra)
    finally:
        if pending is not None and not worker.stopping:
            pending[1].block_until_ready()
            recorder.item_done(*pending)


def run_epoch(session: Session, plan: EpochPlan) -> EpochResult:
    epoch = Epoch(session, plan)
    epoch.crew.spawn("sync", _sync_worker, session, epoch.batches)
    return epoch.run()


SPEC = TrainerSpec(
    name="sync",
    description="one jit of the whole training step: the reference backprop, and the speed to beat",
    run_epoch=run_epoch,
    exact_position=True,
    compared_by_default=True,
    units=fixed_units("train_step"),
)
