"""`hogwild`: K worker threads, each a full forward+backward through the whole-model gradient,
each committing the whole model to the shared store (Niu et al. 2011, as a peer of PD-ASGD).

Reads are per stage and lock-free, so a worker may see stages from different moments, as in
Hogwild!; the whole-model commit is atomic so no update is lost. The same window as `pdasgd` bounds
run-ahead: item n starts only after every item up to n - max(K, max_inflight + 1) has been committed.
"""

from __future__ import annotations

import time

from asyncsgd.metrics import Update
from asyncsgd.trainers.session import EpochPlan, Session, epoch_crew
from asyncsgd.units import has_state
from asyncsgd.workers import Window


def window_size(workers: int, max_inflight: int) -> int:
    return max(workers, max_inflight + 1)


def _hogwild_worker(worker, session: Session, batches, window: Window) -> None:
    units, store, recorder = session.units, session.store, session.recorder
    while True:
        batch = worker.get(batches)
        window.acquire(worker, batch.seq)
        worker.beat(f"gradient (item {batch.seq})")
        slots = [store.read(index) for index in range(len(store))]
        t_read = time.perf_counter()
        read_states = [s.state for s in slots]
        grads, loss, new_states = units.model_grad([s.params for s in slots], read_states, batch.x, batch.y)
        loss.block_until_ready()  # blocks: the gradient is computed before we commit it
        worker.beat(f"committing the whole model (item {batch.seq})")

        def update(params, opts, states):
            merged = units.model_merge_state(states, read_states, new_states) if has_state(states) else states
            return (*units.model_update(params, opts, grads), merged, None)
        commits = store.commit_all(update)
        now = time.perf_counter()
        for index, (slot, commit) in enumerate(zip(slots, commits)):
            recorder.record_update(Update(index, slot.version, commit.before.version, worker.name, t_read, now))
        window.release(batch.seq)
        recorder.item_done(batch.seq, loss)


def run_epoch(session: Session, plan: EpochPlan) -> None:
    config = session.config
    crew, batches = epoch_crew(session, plan, consumers=config.workers)
    window = Window(window_size(config.workers, config.max_inflight), first_seq=plan.first_seq)
    for index in range(config.workers):
        crew.spawn(f"hogwild-{index}", _hogwild_worker, session, batches, window)
    crew.run(tick=session.recorder.tick)
