"""`lapsgd` and `lppsgd`: Hogwild! per device plus non-blocking model averaging across devices
(Chatterjee, Kungurtsev, Alistarh 2022, "Scaling the Wild"; PAPER.md, "Baselines").

Each device holds its own copy of the model (a `ParamStore` in `session.replicas`; the home copy is
`session.store`) and runs `--workers` Hogwild! workers on it: each reads the stages lock-free,
computes a gradient on its batch and commits it stage by stage (no update lost, per-stage locks).
An averaging worker watches the global step (batches finished over all devices / devices) and, after
every global step for the first `--averaging-warmup` global steps and then every
`--averaging-period` global steps, snapshots every copy, averages them on the home device and adds
(average - snapshot) to each live copy: updates that land while it averages are kept, and no worker
waits for it beyond a per-copy commit.

`lppsgd` (partitioned partial backprop) alternates, per worker, a full gradient step with a partial
one: the stages are split into as many contiguous slices as there are workers per device, and on
its partial steps worker i computes and applies only its slice's gradient (the backward pass stops
at the slice's first stage).

The optimiser (momentum, schedule) is the one every trainer uses, one state per stage per copy; the
model that is evaluated is the average of the copies. Delays: a straggler's workers sleep after each
gradient step; random delays and stalls follow each commit.
"""

from __future__ import annotations

import threading
import time

import jax

from asyncsgd.data import steps_per_epoch
from asyncsgd.metrics import Update
from asyncsgd.store import ParamStore
from asyncsgd.trainers.hogwild import window_size
from asyncsgd.trainers.session import EpochPlan, Session, epoch_crew, make_tickets
from asyncsgd.units import has_state
from asyncsgd.workers import Tickets

_POLL_S = 0.002


def lpp_slices(stages: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous stage slices `(first, end)`, one per worker (at most one per stage), sizes within one."""
    parts = max(1, min(stages, workers))
    bounds = [round(k * stages / parts) for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


def averaging_due(global_step: int, warmup: int, period: int) -> bool:
    """Whether LAP-SGD averages after `global_step` (1-based): every step up to `warmup`, then every
    `period` steps."""
    return global_step <= warmup or global_step % period == 0


def prepare(session: Session) -> None:
    """Creates the per-device copies (once per run, in the main thread before any worker starts)."""
    if session.replicas:
        return
    snapshot = session.store.snapshot()
    trees = ([s.params for s in snapshot], [s.opt_state for s in snapshot], [s.state for s in snapshot])
    session.replicas = [session.store] + [ParamStore(session.store.names, *jax.device_put(trees, device))
                                          for device in session.devices[1:]]
    session.model_view = lambda: average(session)


def _home_copy(session: Session, device: int, snapshot: list) -> tuple[list, list]:
    tree = ([s.params for s in snapshot], [s.state for s in snapshot])
    return tree if device == 0 else jax.device_put(tree, session.devices[0])


def average(session: Session) -> tuple[list, list]:
    """The average of the device copies, `(params, states)` on the home device (no copy is changed)."""
    copies = [_home_copy(session, d, store.snapshot()) for d, store in enumerate(session.replicas)]
    return session.units.average(copies)


def average_copies(session: Session) -> None:
    """One averaging round: every live copy moves by (average - its snapshot)."""
    units = session.units
    snapshots = [store.snapshot() for store in session.replicas]
    mean = units.average([_home_copy(session, d, snap) for d, snap in enumerate(snapshots)])
    for device, (store, snap) in enumerate(zip(session.replicas, snapshots)):
        target = mean if device == 0 else jax.device_put(mean, session.devices[device])
        taken = ([s.params for s in snap], [s.state for s in snap])

        def shift(params, opts, states, target=target, taken=taken):
            new_params, new_states = units.shift((params, states), target, taken)
            return new_params, opts, new_states, None
        store.commit_all(shift, count=False)


def _local_worker(worker, session: Session, batches, window: Tickets, device: int, index: int,
                  partial: bool) -> None:
    units, recorder = session.units, session.recorder
    store = session.replicas[device]
    here = session.devices[device]
    delay = session.worker_delay(worker, device, index)
    slice_index = index % max(1, len(units.slices))
    step = 0
    while True:
        batch = worker.get(batches)
        ticket = window.acquire(worker, device, batch.seq)
        worker.beat(f"gradient (item {batch.seq})")
        x, y = (batch.x, batch.y) if device == 0 else jax.device_put((batch.x, batch.y), here)
        slots = [store.read(stage) for stage in range(len(store))]
        t_read = time.perf_counter()
        params, states = [s.params for s in slots], [s.state for s in slots]
        if partial and step % 2 == 1:
            first, end = units.slices[slice_index]
            grads, loss, new_states = units.partial_grad[slice_index](params, states, x, y)
            stages = range(first, end)
        else:
            grads, loss, new_states = units.model_grad(params, states, x, y)
            stages = range(len(store))
        loss.block_until_ready()  # blocks: the gradient is computed before it is applied
        delay.after_compute(time.perf_counter() - t_read)
        worker.beat(f"committing (item {batch.seq})")
        for stage, grad in zip(stages, grads):
            commit = store.commit(stage, lambda p, o, stage=stage, g=grad: units.update[stage](p, o, g))
            recorder.record_update(Update(stage, slots[stage].version, commit.before.version, worker.name,
                                          t_read, time.perf_counter()))
        for stage, slot in enumerate(slots):
            if has_state(slot.state):
                store.commit_state(stage, lambda current, stage=stage, read=slot.state, new=new_states[stage]:
                                   units.merge_state[stage](current, read, new))
        window.release(ticket)
        recorder.item_done(batch.seq, jax.device_put(loss, session.devices[0]) if device else loss)
        delay.after_push()
        step += 1


def _averaging_worker(worker, session: Session, expected: int, done_before: int, rounds: list) -> None:
    """Averages when the global step calls for it; ends when the epoch's batches are all finished."""
    config, recorder = session.config, session.recorder
    devices = len(session.devices)
    averaged_through = done_before // devices
    idle = threading.Event()
    while True:
        worker.check()
        finished = recorder.finished
        global_step = finished // devices
        worker.doing = f"watching (global step {global_step})"  # no beat: only averaging is progress
        due = [g for g in range(averaged_through + 1, global_step + 1)
               if averaging_due(g, config.averaging_warmup, config.averaging_period)]
        if due:
            averaged_through = global_step
            worker.beat(f"averaging the copies (global step {global_step})")
            average_copies(session)
            rounds[0] += 1
        elif finished - done_before >= expected:
            return
        else:
            idle.wait(_POLL_S)


def _run(session: Session, plan: EpochPlan, partial: bool) -> None:
    config = session.config
    prepare(session)
    devices = len(session.devices)
    crew, batches = epoch_crew(session, plan, consumers=config.workers * devices)
    window = make_tickets(session, window_size(config.workers, config.max_inflight), plan)
    for device in range(devices):
        for index in range(config.workers):
            crew.spawn(f"{config.trainer}-{index}@{device}", _local_worker, session, batches, window, device,
                       index, partial)
    expected = plan.max_batches if plan.max_batches is not None else steps_per_epoch(
        len(session.dataset.train_y), config.batch_size)
    rounds = [0]
    if devices > 1:
        crew.spawn("averaging", _averaging_worker, session, expected, session.recorder.finished, rounds)
    try:
        crew.run(tick=session.recorder.tick)
    finally:
        session.averaging_rounds += rounds[0]


def run_lapsgd(session: Session, plan: EpochPlan) -> None:
    _run(session, plan, partial=False)


def run_lppsgd(session: Session, plan: EpochPlan) -> None:
    _run(session, plan, partial=True)
