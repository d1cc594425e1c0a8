"""`ddp`: synchronous data parallelism over N devices (the paper's "synchronous DP" baseline).

One compiled step (`Units.build_ddp_step`, a `shard_map` over a one-axis mesh): the global batch
(`--batch-size`) is split across the devices, each computes the gradient of its shard, the gradients
are averaged with an all-reduce (`pmean`) and every device applies the same update to its replica.
With one device it is `sync`; with N devices it equals `sync` at the same global batch up to
floating-point reordering (tested).

Every step waits for the slowest device: under `--delay` the step's extra time is the largest of
the devices' delays (a straggler's (factor - 1) x the step's compute time; the largest of the
devices' random push delays).
"""

from __future__ import annotations

import time

from asyncsgd.metrics import Update
from asyncsgd.trainers.session import EpochPlan, Session, epoch_crew


def _ddp_worker(worker, session: Session, batches) -> None:
    units, store, recorder = session.units, session.store, session.recorder
    delays = [session.worker_delay(worker, device) for device in range(len(session.devices))]
    while True:
        batch = worker.get(batches)
        worker.beat(f"ddp step (item {batch.seq})")
        start = time.perf_counter()
        commits = store.commit_all(lambda params, opts, states: units.ddp_step(params, opts, states, batch.x, batch.y))
        loss = commits[0].extra
        loss.block_until_ready()  # blocks: a synchronous step ends when every device has applied it
        elapsed = time.perf_counter() - start
        now = time.perf_counter()
        for index, commit in enumerate(commits):
            recorder.record_update(Update(index, commit.before.version, commit.before.version, worker.name, now, now))
        recorder.item_done(batch.seq, loss)
        worker.beat(f"waiting for the slowest device (item {batch.seq})")
        extras = [d.compute_extra(elapsed) + d.push_extra() for d in delays]
        slowest = max(range(len(extras)), key=extras.__getitem__)
        delays[slowest].sleep(extras[slowest])  # everybody waits for it; the wait is booked to it


def run_epoch(session: Session, plan: EpochPlan) -> None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = session.units.mesh
    crew, batches = epoch_crew(session, plan, consumers=1, placement=NamedSharding(mesh, P(mesh.axis_names[0])))
    crew.spawn("ddp", _ddp_worker, session, batches)
    crew.run(tick=session.recorder.tick)
