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

from typing import Optional

from asyncsgd.trainers.base import EpochPlan, EpochResult, TrainerSpec, cores_per_pass, fixed_units
from asyncsgd.trainers.session import Epoch, Session
from asyncsgd.units import has_state
from asyncsgd.workers import Tickets


def window_size(workers: int, max_inflight: int, devices: int = 1) -> int:
    return devices * max(workers, max_inflight + 1)


def staleness_bound(config) -> Optional[int]:
    """2 (window - 1); None with per-device windows on several devices (one shared store)."""
    if config.devices > 1 and config.window == "device":
        return None
    return 2 * (window_size(config.workers, config.max_inflight, config.devices) - 1)


def _hogwild_worker(worker, session: Session, epoch: Epoch, window: Tickets, device: int = 0, index: int = 0) -> None:
    units, store, recorder, clock = session.units, session.store, session.recorder, session.clock
    view, delay = session.views[device], epoch.delay(worker, device, index)
    while True:
        batch = worker.get(epoch.batches)
        ticket = window.acquire(worker, device, batch.seq)
        worker.beat(f"gradient (item {batch.seq})")
        x, y = view.put((batch.x, batch.y))
        slots = [view.read(stage) for stage in range(len(store))]
        t_read = clock.now()
        clock.compute(device, "model_grad")
        grads, loss, new_states = units.model_grad([s.params for s in slots], [s.state for s in slots], x, y)
        clock.settle(loss)  # blocks (wall clock): the gradient is computed before we commit it
        delay.after_compute(clock.now() - t_read)
        worker.beat(f"committing the whole model (item {batch.seq})")
        if view.remote:  # a Ray worker: each stage's server applies its part (asyncsgd/cluster)
            for stage, slot in enumerate(slots):
                view.push(stage, grads[stage], slot.version, worker.name, t_read)
            window.release(ticket)
            recorder.item_done(batch.seq, loss)
            continue
        sources = [view.source(stage, slot) for stage, slot in enumerate(slots)]
        read_states = [source.state for source in sources]
        read_params = [source.params for source in sources]  # on home: what a dc correction compares to
        grads, new_states, loss = view.to_home((grads, new_states, loss))
        clock.compute(0, "model_update")

        def update(params, opts, states):
            merged = units.model_merge_state(states, read_states, new_states) if has_state(states) else states
            staleness = [store.staleness(stage, slot.version) for stage, slot in enumerate(slots)]
            return (*units.model_update(params, opts, grads, staleness, read_params), merged, None)
        commits = store.commit_all(update)
        recorder.committed_all(commits, worker.name, [s.version for s in slots], [t_read] * len(slots))
        window.release(ticket)
        recorder.item_done(batch.seq, loss)
        delay.after_push()


def run_epoch(session: Session, plan: EpochPlan) -> EpochResult:
    config = session.config
    devices = max(1, len(session.devices))
    epoch = Epoch(session, plan)
    window = epoch.tickets(window_size(config.workers, config.max_inflight))
    for device in range(devices):
        for index in range(config.workers):
            name = f"hogwild-{index}" + (f"@{device}" if devices > 1 else "")
            epoch.crew.spawn(name, _hogwild_worker, session, epoch, window, device, index)
    return epoch.run()


SPEC = TrainerSpec(
    name="hogwild",
    description="K threads, each a full forward+backward, committing the whole model to the shared store",
    run_epoch=run_epoch,
    multi_device=True,
    compared_by_default=True,
    units=fixed_units("model_grad"),
    backends=("local", "ray"),
    staleness_bound=staleness_bound,
    conv_threads=cores_per_pass,
)
