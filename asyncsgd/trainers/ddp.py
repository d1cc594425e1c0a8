"""`ddp`: synchronous data parallelism over N devices (the paper's "synchronous DP" baseline).

One compiled step (a `shard_map` over a one-axis mesh, built by `prepare`): the global batch
(`--batch-size`) is split across the devices, each computes the gradient of its shard, the gradients
are averaged with an all-reduce (`pmean`) and every device applies the same update to its replica.
With one device it is `sync`; with N devices it equals `sync` at the same global batch up to
floating-point reordering (tested).

Every step waits for the slowest device: under `--delay` the step's extra time is the largest of
the devices' delays (a straggler's (factor - 1) x the step's compute time; the largest of the
devices' random push delays).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from asyncsgd.errors import ConfigError
from asyncsgd.trainers.base import EpochPlan, EpochResult, Prepared, TrainerSpec, fixed_units
from asyncsgd.trainers.session import Epoch, Session
from asyncsgd.units import tree_nbytes


class DdpKit(NamedTuple):
    """The mesh and the compiled step `step(params, opts, states, x, labels) -> (params, opts, states, loss)`."""

    mesh: Any
    step: Callable


def _ddp_worker(worker, session: Session, epoch: Epoch) -> None:
    store, recorder, clock = session.store, session.recorder, session.clock
    step = session.kit.step
    devices = range(len(session.devices))
    delays = [epoch.delay(worker, device) for device in devices]
    grad_bytes = tree_nbytes(store.params())
    while True:
        batch = worker.get(epoch.batches)
        worker.beat(f"ddp step (item {batch.seq})")
        start = clock.now()
        # Each device computes the gradient of its 1/N of the batch, then the ring all-reduce.
        clock.compute_all(devices, "train_step", scale=1.0 / len(devices))
        clock.allreduce(devices, grad_bytes)
        commits = store.commit_all(lambda params, opts, states: step(params, opts, states, batch.x, batch.y))
        loss = commits[0].extra
        clock.settle(loss)  # blocks (wall clock): a synchronous step ends when every device has applied it
        elapsed = clock.now() - start
        recorder.committed_all(commits, worker.name)
        recorder.item_done(batch.seq, loss)
        worker.beat(f"waiting for the slowest device (item {batch.seq})")
        extras = [d.compute_extra(elapsed) + d.push_extra() for d in delays]
        slowest = max(range(len(extras)), key=extras.__getitem__)
        delays[slowest].sleep(extras[slowest])  # everybody waits for it; the wait is booked to it


def run_epoch(session: Session, plan: EpochPlan) -> EpochResult:
    mesh = session.kit.mesh
    epoch = Epoch(session, plan, placement=NamedSharding(mesh, P(mesh.axis_names[0])))
    epoch.crew.spawn("ddp", _ddp_worker, session, epoch)
    return epoch.run()


def _build_step(units, mesh) -> Callable:
    """`step(params, opts, states, x, labels)` over `mesh` (one axis): parameters replicated, the batch
    split along the axis, gradients (and the loss and the batch-norm statistics) averaged across
    devices with `pmean` before the update."""
    axis = mesh.axis_names[0]

    def step(params_list, opt_list, states, x, labels):
        grads, loss, new_states = units.grads_of(params_list, states, x, labels)
        grads, loss, new_states = jax.lax.pmean((grads, loss, new_states), axis)
        params_list, opt_list = units.apply_updates(params_list, opt_list, grads)
        return params_list, opt_list, new_states, loss
    # check_vma=False: the CNN's custom-VJP convolution does not carry shard_map's varying-axis types;
    # the pmean makes every output replicated, which the ddp tests check against sync.
    return units.jit("ddp_step", jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(axis), P(axis)),
                                               out_specs=(P(), P(), P(), P()), check_vma=False))


def prepare(session: Session) -> Prepared:
    """The mesh over the run's devices, the store replicated on it, and the step compiled."""
    units, store, config = session.units, session.store, session.config
    # The run's devices (on a simulated clock several simulated devices share one real device: the mesh
    # is over the real ones, and the step is the same math at the same global batch).
    mesh = Mesh(np.array(list(dict.fromkeys(session.devices))), ("devices",))
    step = _build_step(units, mesh)
    snapshot = store.snapshot()
    trees = jax.device_put(([s.params for s in snapshot], [s.opt_state for s in snapshot],
                            [s.state for s in snapshot]), NamedSharding(mesh, P()))
    store.load([s.version for s in snapshot], *trees, [s.state_version for s in snapshot])
    with units.compiling():
        batch = NamedSharding(mesh, P(mesh.axis_names[0]))
        x0 = jax.device_put(session.model.dummy_input(config.batch_size), batch)
        labels = jax.device_put(jnp.zeros((config.batch_size,), jnp.int32), batch)
        jax.block_until_ready(step(*trees, x0, labels))  # blocks: compiled before any thread starts
    return Prepared(kit=DdpKit(mesh, step))


def _check(config) -> None:
    if config.batch_size % config.devices:
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by --devices {config.devices} "
                          "for ddp (the global batch is split across devices)")


SPEC = TrainerSpec(
    name="ddp",
    description="synchronous data parallelism over --devices: one compiled step, the global batch split, "
                "gradients all-reduced; every step waits for the slowest device",
    run_epoch=run_epoch,
    multi_device=True,
    exact_position=True,
    units=fixed_units(),
    check=_check,
    prepare=prepare,
)
