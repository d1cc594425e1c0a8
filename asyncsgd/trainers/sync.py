"""`sync`: the reference. One jit of the whole training step (forward, backward, update)."""

from __future__ import annotations

import time

from asyncsgd.metrics import Update
from asyncsgd.trainers.session import EpochPlan, Session, epoch_crew


def _sync_worker(worker, session: Session, batches) -> None:
    units, store, recorder = session.units, session.store, session.recorder
    pending = None  # (seq, loss) of the step dispatched last
    try:
        while True:
            batch = worker.get(batches)
            worker.beat(f"train step (item {batch.seq})")
            commits = store.commit_all(lambda params, opts, states: units.train_step(params, opts, states,
                                                                                     batch.x, batch.y))
            now = time.perf_counter()
            for index, commit in enumerate(commits):
                recorder.record_update(Update(index, commit.before.version, commit.before.version,
                                              worker.name, now, now))
            # Dispatch step t before waiting for step t-1: the device never idles on the host.
            if pending is not None:
                pending[1].block_until_ready()  # blocks: keeps the host at most one step ahead
                recorder.item_done(*pending)
            pending = (batch.seq, commits[0].extra)
    finally:
        if pending is not None and not worker.stopping:
            pending[1].block_until_ready()
            recorder.item_done(*pending)


def run_epoch(session: Session, plan: EpochPlan) -> None:
    crew, batches = epoch_crew(session, plan, consumers=1)
    crew.spawn("sync", _sync_worker, session, batches)
    crew.run(tick=session.recorder.tick)
