"""`hogwild`: K worker threads, each a full forward+backward through the whole-model gradient,
each committing the whole model to the shared store (Niu et al. 2011, as a peer of PD-ASGD).

Reads are per stage and lock-free, so a worker may see stages from different moments, as in
Hogwild!; the whole-model commit is atomic so no update is lost. The same window as `pdasgd` bounds
run-ahead: item n starts only after every item up to n - max(K, max_inflight + 1) has been committed.

On N devices each device runs K workers on its refreshed copies of the store's stages (see
`placement`); gradients are pushed home and committed there, and the window grows N-fold. Delays: a
straggler's workers sleep after each gradient step, random delays and stalls after each commit.
"""

from __future__ import annotations

import time

from asyncsgd.metrics import Update
from asyncsgd.trainers.session import EpochPlan, Session, epoch_crew, make_tickets
from asyncsgd.units import has_state
from asyncsgd.workers import Tickets


def window_size(workers: int, max_inflight: int, devices: int = 1) -> int:
    return devices * max(workers, max_inflight + 1)


def _hogwild_worker(worker, session: Session, batches, window: Tickets, device: int = 0, index: int = 0) -> None:
    units, store, recorder = session.units, session.store, session.recorder
    view, delay = session.views[device], session.worker_delay(worker, device, index)
    while True:
        batch = worker.get(batches)
        ticket = window.acquire(worker, device, batch.seq)
        worker.beat(f"gradient (item {batch.seq})")
        x, y = view.put((batch.x, batch.y))
        slots = [view.read(stage) for stage in range(len(store))]
        t_read = time.perf_counter()
        grads, loss, new_states = units.model_grad([s.params for s in slots], [s.state for s in slots], x, y)
        loss.block_until_ready()  # blocks: the gradient is computed before we commit it
        delay.after_compute(time.perf_counter() - t_read)
        worker.beat(f"committing the whole model (item {batch.seq})")
        read_states = [view.source(stage, slot).state for stage, slot in enumerate(slots)]
        grads, new_states, loss = view.to_home((grads, new_states, loss))

        def update(params, opts, states):
            merged = units.model_merge_state(states, read_states, new_states) if has_state(states) else states
            return (*units.model_update(params, opts, grads), merged, None)
        commits = store.commit_all(update)
        now = time.perf_counter()
        for stage, (slot, commit) in enumerate(zip(slots, commits)):
            recorder.record_update(Update(stage, slot.version, commit.before.version, worker.name, t_read, now))
        window.release(ticket)
        recorder.item_done(batch.seq, loss)
        delay.after_push()


def run_epoch(session: Session, plan: EpochPlan) -> None:
    config = session.config
    devices = max(1, len(session.devices))
    crew, batches = epoch_crew(session, plan, consumers=config.workers * devices)
    window = make_tickets(session, window_size(config.workers, config.max_inflight), plan)
    for device in range(devices):
        for index in range(config.workers):
            name = f"hogwild-{index}" + (f"@{device}" if devices > 1 else "")
            crew.spawn(name, _hogwild_worker, session, batches, window, device, index)
    crew.run(tick=session.recorder.tick)
