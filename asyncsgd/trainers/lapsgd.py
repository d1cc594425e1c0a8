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
model that is evaluated is the average of the copies.

On Ray (`--backend ray`) each worker actor is one device with its own copy, and its averaging worker
trades its snapshot for the average through the stage servers (`LapKit.exchange`, set by
asyncsgd/cluster/worker.py): the mean of every copy's latest snapshot, so no copy waits for another. Delays: a straggler's workers sleep after each
gradient step; random delays and stalls follow each commit.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from asyncsgd.data import steps_per_epoch
from asyncsgd.staleness import predicted_params, with_prediction
from asyncsgd.store import ParamStore
from asyncsgd.trainers.base import EpochPlan, EpochResult, Prepared, TrainerSpec, cores_per_pass, fixed_units
from asyncsgd.trainers.hogwild import window_size
from asyncsgd.trainers.session import Epoch, Session
from asyncsgd.units import has_state, tree_nbytes
from asyncsgd.workers import Tickets

_POLL_S = 0.002


class LapKit(NamedTuple):
    """What `prepare` compiles (the per-device copies themselves are `session.replicas`).

    `average(copies)` is the element-wise mean of `[(params, states), ...]` (one per device, on home);
    `shift(live, average, snapshot)` is `live + (average - snapshot)`; `partial_grad[k](params, states,
    x, labels) -> (grads of slice k's stages, loss, new_states)` for each of `slices` (LPP-SGD only).
    `exchange((params, states)) -> (params, states)`, when set: this process's copy is one of several
    in other processes; it sends its snapshot and returns the average to move to (a Ray worker).
    """

    average: Callable
    shift: Callable
    slices: tuple = ()
    partial_grad: tuple = ()
    exchange: Optional[Callable] = None


def lpp_slices(stages: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous stage slices `(first, end)`, one per worker (at most one per stage), sizes within one."""
    parts = max(1, min(stages, workers))
    bounds = [round(k * stages / parts) for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


def averaging_due(global_step: int, warmup: int, period: int) -> bool:
    """Whether LAP-SGD averages after `global_step` (1-based): every step up to `warmup`, then every
    `period` steps."""
    return global_step <= warmup or global_step % period == 0


def staleness_bound(config) -> Optional[int]:
    """In gradient updates to one device's copy: each copy has its own (per-device) window."""
    scope_devices = config.devices if config.window == "global" else 1
    return 2 * (window_size(config.workers, config.max_inflight, scope_devices) - 1)


def tree_mean(trees: Sequence[Any]) -> Any:
    """The element-wise mean of equally shaped pytrees (LAP-SGD's model average)."""
    return jax.tree_util.tree_map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def _tree_shift(live: Any, average: Any, snapshot: Any) -> Any:
    """`live + (average - snapshot)`: moves a live copy by what averaging its snapshot changed."""
    return jax.tree_util.tree_map(lambda x, a, s: x + (a - s), live, average, snapshot)


def _partial_grad(units, first: int, end: int) -> Callable:
    """The gradient of stages `first..end-1` only: stages below run forward only, stages above only pass
    the gradient down (their weight gradients are never formed), the backward stops at `first`."""
    def partial_grad(params_list, states, x, labels):
        def loss_of(part):
            return units.model.loss(list(params_list[:first]) + list(part) + list(params_list[end:]),
                                    states, x, labels)
        (loss, new_states), grads = jax.value_and_grad(loss_of, has_aux=True)(list(params_list[first:end]))
        return grads, loss, new_states
    return partial_grad


def _prepare(session: Session, partial: bool) -> Prepared:
    """The per-device copies, and the averaging (and partial-gradient) units compiled on every device."""
    units, store, config = session.units, session.store, session.config
    snapshot = store.snapshot()
    trees = ([s.params for s in snapshot], [s.opt_state for s in snapshot], [s.state for s in snapshot])
    replicas = (store,) + tuple(ParamStore(store.names, *jax.device_put(trees, device))
                                for device in session.devices[1:])
    slices = tuple(lpp_slices(len(store), config.workers)) if partial else ()
    kit = LapKit(units.jit("average", tree_mean), units.jit("shift", _tree_shift), slices,
                 tuple(units.jit(f"partial_grad/{a}-{b}", _partial_grad(units, a, b)) for a, b in slices))
    with units.compiling():
        outputs = []
        x0 = session.model.dummy_input(config.batch_size)
        labels = jnp.zeros((config.batch_size,), jnp.int32)
        for index, (device, replica) in enumerate(zip(session.devices, replicas)):
            params, opts, states = replica.params(), replica.opt_states(), replica.states()
            x, y = session.views[index].put((x0, labels))  # as the workers will place their batches
            outputs.append(kit.shift((params, states), (params, states), (params, states)))
            for (first, end), partial_grad in zip(slices, kit.partial_grad):
                grads, _, _ = partial_grad(params, states, x, y)
                outputs.extend(units.update[stage](params[stage], opts[stage], g, 0, params[stage])
                               for stage, g in zip(range(first, end), grads))
        outputs.append(kit.average([(trees[0], trees[2])] * len(replicas)))
        jax.block_until_ready(outputs)  # blocks: compiled before any thread starts
    return Prepared(kit=kit, replicas=replicas, model_view=lambda: average(kit, replicas, session.devices))


def _home_copy(devices: Sequence[Any], device: int, snapshot: list) -> tuple[list, list]:
    tree = ([s.params for s in snapshot], [s.state for s in snapshot])
    return tree if device == 0 else jax.device_put(tree, devices[0])


def average(kit: LapKit, replicas: Sequence[ParamStore], devices: Sequence[Any]) -> tuple[list, list]:
    """The average of the device copies, `(params, states)` on the home device (no copy is changed)."""
    return kit.average([_home_copy(devices, d, store.snapshot()) for d, store in enumerate(replicas)])


def average_copies(session: Session) -> None:
    """One averaging round: every live copy moves by (average - its snapshot)."""
    kit, clock = session.kit, session.clock
    snapshots = [store.snapshot() for store in session.replicas]
    if kit.exchange is not None:  # the other copies are in other processes
        snap = snapshots[0]
        mean = kit.exchange(([s.params for s in snap], [s.state for s in snap]))
    else:
        model_bytes = tree_nbytes([s.params for s in snapshots[0]])
        for device in range(1, len(snapshots)):  # every copy's snapshot goes home
            clock.transfer(device, model_bytes)
        clock.compute(0, "average")
        mean = kit.average([_home_copy(session.devices, d, snap) for d, snap in enumerate(snapshots)])
        for device in range(1, len(snapshots)):  # and the average goes back
            clock.transfer(0, model_bytes)
        clock.compute_all(range(len(snapshots)), "shift")
        if session.predicts:  # the predicted parameters move too (below)
            clock.compute_all(range(len(snapshots)), "shift")
    predicting = session.predicts
    for device, (store, snap) in enumerate(zip(session.replicas, snapshots)):
        target = mean if device == 0 else jax.device_put(mean, session.devices[device])
        taken = ([s.params for s in snap], [s.state for s in snap])

        def shift(params, opts, states, target=target, taken=taken):
            new_params, new_states = kit.shift((params, states), target, taken)
            if predicting:  # the predicted parameters move with the parameters (same shapes: same unit)
                aheads = [predicted_params(p, o) for p, o in zip(params, opts)]
                moved, _ = kit.shift((aheads, states), target, taken)
                opts = [with_prediction(o, a) for o, a in zip(opts, moved)]
            return new_params, opts, new_states, None
        store.commit_all(shift, count=False)


def _local_worker(worker, session: Session, epoch: Epoch, window: Tickets, device: int, index: int,
                  partial: bool) -> None:
    units, recorder, clock, kit = session.units, session.recorder, session.clock, session.kit
    store = session.replicas[device]
    delay = epoch.delay(worker, device, index)
    slice_index = index % max(1, len(kit.slices))
    predicting = session.predicts
    step = 0
    while True:
        batch = worker.get(epoch.batches)
        ticket = window.acquire(worker, device, batch.seq)
        worker.beat(f"gradient (item {batch.seq})")
        x, y = session.views[device].put((batch.x, batch.y))  # the placements the units were compiled for
        slots = [store.read(stage) for stage in range(len(store))]
        t_read = clock.now()
        # With weight prediction the gradient is taken at each stage's predicted parameters.
        params = [predicted_params(s.params, s.opt_state) if predicting else s.params for s in slots]
        states = [s.state for s in slots]
        if partial and step % 2 == 1:
            first, end = kit.slices[slice_index]
            clock.compute(device, f"partial_grad/{first}-{end}")
            grads, loss, new_states = kit.partial_grad[slice_index](params, states, x, y)
            stages = range(first, end)
        else:
            clock.compute(device, "model_grad")
            grads, loss, new_states = units.model_grad(params, states, x, y)
            stages = range(len(store))
        clock.settle(loss)  # blocks (wall clock): the gradient is computed before it is applied
        delay.after_compute(clock.now() - t_read)
        worker.beat(f"committing (item {batch.seq})")
        for stage, grad in zip(stages, grads):
            clock.compute(device, f"update/{store.names[stage]}")
            commit = store.commit(stage, lambda p, o, stage=stage, g=grad: units.update[stage](
                p, o, g, store.staleness(stage, slots[stage].version), params[stage]))
            recorder.committed(stage, slots[stage].version, commit.before.version, worker.name, t_read)
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
    idle = threading.Event()  # never set: the pause between polls
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
            session.clock.wait(idle, _POLL_S)


def _run(session: Session, plan: EpochPlan, partial: bool) -> EpochResult:
    config = session.config
    devices = len(session.devices)
    epoch = Epoch(session, plan)
    window = epoch.tickets(window_size(config.workers, config.max_inflight))
    for device in range(devices):
        for index in range(config.workers):
            epoch.crew.spawn(f"{config.trainer}-{index}@{device}", _local_worker, session, epoch, window, device,
                             index, partial)
    expected = plan.batches(steps_per_epoch(len(session.dataset.train_y), config.batch_size))
    rounds = [0]
    if devices > 1 or session.kit.exchange is not None:
        epoch.crew.spawn("averaging", _averaging_worker, session, expected, session.recorder.finished, rounds)
    return epoch.run(averaging_rounds=lambda: rounds[0])


def run_lapsgd(session: Session, plan: EpochPlan) -> EpochResult:
    return _run(session, plan, partial=False)


def run_lppsgd(session: Session, plan: EpochPlan) -> EpochResult:
    return _run(session, plan, partial=True)


SPEC = TrainerSpec(
    name="lapsgd",
    description="LAP-SGD (Chatterjee et al. 2022): per device, K Hogwild! threads on that device's own model "
                "copy; a non-blocking averaging thread moves every copy by (average - snapshot)",
    run_epoch=run_lapsgd,
    multi_device=True,
    units=fixed_units("model_grad", "update"),
    prepare=lambda session: _prepare(session, partial=False),
    staleness_bound=staleness_bound,
    conv_threads=cores_per_pass,  # each worker runs whole passes on its device's copy
    backends=("local", "ray"),  # a copy per worker actor, averaged through the stage servers (asyncsgd/cluster/)
    copies=True,
)

LPPSGD_SPEC = dataclasses.replace(
    SPEC, name="lppsgd", run_epoch=run_lppsgd, prepare=lambda session: _prepare(session, partial=True),
    description="LPP-SGD: as lapsgd, but each thread alternates full steps with steps that compute and apply "
                "only its own contiguous slice of stages")
