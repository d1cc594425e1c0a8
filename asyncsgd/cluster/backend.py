"""The driver's half of a Ray run: start the actors, hand out chunks of batches, survive dead workers.

`ray_spec(spec)` is the trainer's `TrainerSpec` with its epochs sent to worker actors, so that
`asyncsgd.run.train` runs the usual epoch loop, evaluation, checkpoints and output files. The driver's
own store is a mirror of the stage servers (refreshed after every chunk a worker finishes): what a
checkpoint saves and what a resumed run loads into the servers before its first chunk. Evaluation
reads the servers' parameters directly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from typing import Any, Optional

import jax

from asyncsgd.assemble import planned_steps
from asyncsgd.cluster import require_ray
from asyncsgd.cluster.servers import StageServer, host_slots, split_stages
from asyncsgd.cluster.worker import Worker
from asyncsgd.errors import StallError, WorkerError
from asyncsgd.trainers.base import EpochResult, Prepared
from asyncsgd.units import tree_nbytes

# Stage servers of a run (fewer when the model has fewer stages): the parameters split by size.
STAGE_SERVERS = 2
# Chunks a worker's share of an epoch is handed out in: a worker that dies loses at most one chunk.
CHUNKS_PER_EPOCH = 8
# How often the driver wakes to collect updates, tick the recorder and check on the workers (s).
POLL_S = 0.2
# How often the driver asks a worker running a chunk whether it is still there (s); one that does not
# answer within --watchdog (a stopped process, a host cut off) is dropped.
BEAT_S = 1.0
_ACTOR_ERRORS_NAMES = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")


@dataclasses.dataclass
class RayKit:
    """What a Ray run holds on the driver."""

    ray: Any
    servers: list
    owner: list            # stage -> server index
    workers: list          # worker actor handles, by position
    infos: list            # per worker: its latest {position, host, pid}
    server_infos: list     # per stage server: {host, pid, stages}
    started_ray: bool      # this run started Ray (and shuts it down at the end)
    out: Optional[str]
    t0: float
    copies: bool = False   # a copies trainer (LAP-SGD): each worker trains its own copy, averaged by the servers
    loaded: bool = False   # the servers hold the driver's (possibly restored) store
    workers_lost: int = 0
    workers_restarted: int = 0
    dropped: set = dataclasses.field(default_factory=set)  # positions no longer given work
    beats: dict = dataclasses.field(default_factory=dict)  # position -> (ref of its pending info() or None, since)
    events: list = dataclasses.field(default_factory=list)
    traffic: dict = dataclasses.field(default_factory=dict)  # position -> its latest pull/push counters
    peak_inflight: int = 0
    window_size: Optional[int] = None
    averaging_rounds: int = 0

    def write_workers(self) -> None:
        """`workers.json`: host and PID of every worker actor (rewritten after each restart)."""
        if self.out:
            path = os.path.join(self.out, "workers.json")
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                json.dump({"workers": self.infos, "stage_servers": self.server_infos, "workers_lost": self.workers_lost,
                           "workers_restarted": self.workers_restarted, "events": self.events}, handle, indent=2)
            os.replace(path + ".tmp", path)


def _init_ray(ray, address: Optional[str]) -> bool:
    """Connects to `address`, or starts a local instance bound to this machine only; True if started here."""
    if ray.is_initialized():
        return False
    options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1", **options)
    return True


def keep_token_private() -> Optional[str]:
    """Makes Ray's authentication token file readable by its owner only; returns its path (None when the
    token comes from `$RAY_AUTH_TOKEN`).

    Ray reads the token of a local instance from `$RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` and writes
    that file, when missing, readable by every local user (0644): anyone who reads it may run code in the
    instance. A missing file is created here first, mode 0600, as Ray would fill it (32 random bytes in
    hex); an existing one is set to 0600.
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(32))
    return path


def _prepare(session, copies: bool) -> Prepared:
    config, store = session.config, session.store
    if not config.ray_address and "ray" not in sys.modules:
        # Ray's core services listen on every interface whatever address it is given (measured with
        # ss: gcs_server, raylet and each actor on *:port), so a local instance requires Ray's token
        # authentication (a random token in ~/.ray/auth_token). Read when Ray is imported: set first.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        keep_token_private()
    ray = require_ray()
    started = _init_ray(ray, config.ray_address)
    t0 = time.time()
    config_dict = dataclasses.asdict(config)
    shapes = {"input_shape": list(session.model.input_shape), "num_classes": session.model.num_classes,
              "vocab_size": session.dataset.vocab_size, "total_steps": planned_steps(config, session.dataset)}
    sizes = [tree_nbytes(params) for params in store.params()]
    groups = split_stages(sizes, STAGE_SERVERS)
    owner = [0] * len(store)
    server_class = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(StageServer)
    servers = []
    for index, stages in enumerate(groups):
        for stage in stages:
            owner[stage] = index
        servers.append(server_class.remote(config_dict, shapes, stages, host_slots(store, stages), t0))
    worker_class = ray.remote(**worker_resources(ray.cluster_resources(), config.devices), max_restarts=-1,
                              max_task_retries=0, concurrency_groups={"beat": 1})(_answering_worker(ray))
    workers = [worker_class.remote(config_dict, position, config.devices, servers, owner, t0)
               for position in range(config.devices)]
    kit = RayKit(ray, servers, owner, workers, infos=[], server_infos=[], started_ray=started, out=config.out, t0=t0,
                 copies=copies)
    try:
        kit.server_infos = ray.get([server.info.remote() for server in servers])  # blocks: servers compiled
        kit.infos = ray.get([worker.info.remote() for worker in workers])  # blocks: workers compiled
    except Exception:
        _finish_kit(kit)
        raise
    kit.write_workers()
    return Prepared(kit=kit, model_view=lambda: _server_view(session, kit))


def _from_servers(session, kit: RayKit, method: str, *args_per_server) -> list:
    """`method` called on every stage server (with its own arguments when given), the replies in
    server order; a server that died raises the one-line error of `_check_servers`."""
    calls = [getattr(server, method).remote(*(args[index] for args in args_per_server))
             for index, server in enumerate(kit.servers)]
    try:
        return kit.ray.get(calls)
    except Exception as error:  # noqa: BLE001 - a server died
        if _is_actor_error(error):
            _check_servers(session, kit)
        raise


def _answering_worker(ray):
    """`Worker` whose `info()` is answered beside a running chunk (its own concurrency group): the
    driver's heartbeat."""
    class AnsweringWorker(Worker):
        @ray.method(concurrency_group="beat")
        def info(self) -> dict:
            return Worker.info(self)
    return AnsweringWorker


def worker_resources(cluster: dict, workers: int) -> dict:
    """What each of `workers` worker actors asks Ray for: a CPU (a share when the cluster has fewer
    CPUs than workers) and, on a cluster with GPUs, a GPU each (a share when there are fewer GPUs than
    workers), so that Ray places one worker per accelerator and sets its CUDA_VISIBLE_DEVICES."""
    resources = {"num_cpus": min(1.0, cluster.get("CPU", 1.0) / workers)}
    gpus = cluster.get("GPU", 0.0)
    if gpus > 0:
        resources["num_gpus"] = min(1.0, gpus / workers)
    return resources


def _server_slots(session, kit: RayKit) -> list:
    """Every stage's `(stage, version, params, opt_state)` from the servers, in stage order."""
    slots = [slot for reply in _from_servers(session, kit, "slots") for slot in reply]
    return sorted(slots, key=lambda slot: slot[0])


def _server_view(session, kit: RayKit) -> tuple[list, list]:
    """The servers' parameters now, on the driver's device (for evaluation)."""
    slots = _server_slots(session, kit)
    return [jax.device_put(slot[2]) for slot in slots], session.store.states()


def _refresh_mirror(session, kit: RayKit) -> None:
    """The driver's store := the servers' slots (what a checkpoint saves)."""
    slots = _server_slots(session, kit)
    store = session.store
    store.load([s[1] for s in slots], jax.device_put([s[2] for s in slots]), jax.device_put([s[3] for s in slots]),
               store.states(), [0] * len(store))


def _load_servers(session, kit: RayKit) -> None:
    """Once, before the first chunk: a resumed run's restored store goes to the servers."""
    if kit.loaded:
        return
    kit.loaded = True
    store = session.store
    if store.versions() == [slot[1] for slot in _server_slots(session, kit)]:
        return
    _from_servers(session, kit, "load", [host_slots(store, [s for s in range(len(store)) if kit.owner[s] == index])
                                         for index in range(len(kit.servers))])


def _check_servers(session, kit: RayKit) -> None:
    """Raises a one-line error naming a stage server that is gone (the run cannot go on without it)."""
    for index, server in enumerate(kit.servers):
        try:
            kit.ray.get(server.info.remote(), timeout=30)
        except Exception as error:  # noqa: BLE001 - dead, or unreachable for 30 s
            stages = [session.model.stage_names[s] for s in range(len(kit.owner)) if kit.owner[s] == index]
            raise WorkerError(f"stage server {index} ({', '.join(stages)}) is gone ({type(error).__name__}); "
                              f"the run stops; continue it from its last checkpoint with --resume OUT") from error


def _collect_updates(session, kit: RayKit) -> None:
    """The servers' new updates into the recorder (updates.csv, staleness)."""
    recorder = session.recorder
    for reply in _from_servers(session, kit, "take_updates"):
        for stage, version_read, version_commit, worker, t_read, _ in reply:
            recorder.committed(stage, version_read, version_commit, worker, t_read)


def _is_actor_error(error: BaseException) -> bool:
    """A Ray error saying an actor died or is unavailable (matched by name: they move between Ray's modules)."""
    return any(cls.__name__ in _ACTOR_ERRORS_NAMES for cls in type(error).__mro__)


def _chunks(plan, devices: int) -> list[tuple[int, int]]:
    """`(first_batch, batches)` ranges of the epoch, each split among the workers by `shard`."""
    size = max(devices, -(-plan.max_batches // CHUNKS_PER_EPOCH))
    size -= size % devices  # whole rounds: every worker gets the same share of each chunk
    return [(start, min(size, plan.skip + plan.max_batches - start))
            for start in range(plan.skip, plan.skip + plan.max_batches, size)]


def _run_epoch(session, plan) -> EpochResult:
    kit: RayKit = session.kit
    ray, recorder, config = kit.ray, session.recorder, session.config
    _load_servers(session, kit)
    chunks = _chunks(plan, config.devices)
    next_chunk = {position: 0 for position in range(config.devices) if position not in kit.dropped}
    running: dict = {}  # object ref -> (position, started at)
    restarting: dict = {}  # position -> ref of its info() call after a death
    lost_at: dict = {}  # position -> when it died (a restart that takes too long drops it)
    finished_batches = 0

    def submit(position: int) -> None:
        index = next_chunk[position]
        if index < len(chunks):
            next_chunk[position] = index + 1
            first, count = chunks[index]
            running[kit.workers[position].run.remote(plan.epoch, first, count)] = (position, time.time())

    for position in list(next_chunk):
        submit(position)
    while running or restarting:
        ready, _ = ray.wait(list(running) + list(restarting.values()), num_returns=1, timeout=POLL_S)
        for ref in ready:
            if ref in running:
                position, _ = running.pop(ref)
                try:
                    reply = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - a dead worker: its chunk's items in flight are lost
                    _check_servers(session, kit)  # a dead stage server fails its workers' chunks too
                    if not _is_actor_error(error):
                        raise WorkerError(f"Ray worker {position} failed: {error}") from error
                    kit.workers_lost += 1
                    kit.events.append({"event": "lost", "position": position, "time_s": time.time() - kit.t0,
                                       "pid": kit.infos[position]["pid"]})
                    recorder.log({"event": "worker_lost", "position": position})
                    restarting[position] = kit.workers[position].info.remote()
                    lost_at[position] = time.time()
                    kit.write_workers()
                    continue
                for loss in reply["losses"]:
                    recorder.item_done(recorder.finished, loss)
                for update in reply["updates"]:  # a copies trainer's, applied in the worker
                    recorder.committed(*update)
                kit.averaging_rounds += reply["averaging_rounds"]
                finished_batches += len(reply["losses"])
                kit.traffic[position] = {key: reply[key] for key in ("pulls", "pull_bytes", "pushes", "push_bytes")}
                kit.peak_inflight = max(kit.peak_inflight, reply["peak_inflight"] or 0)
                kit.window_size = reply["window_size"]
                _refresh_mirror(session, kit)  # what a checkpoint taken now saves (updates: after the loop)
                submit(position)
            else:
                position = next(p for p, r in restarting.items() if r == ref)
                del restarting[position]
                try:
                    kit.infos[position] = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - still restarting: ask again (_watch_workers gives up)
                    if not _is_actor_error(error):
                        raise
                    restarting[position] = kit.workers[position].info.remote()
                    continue
                kit.workers_restarted += 1
                kit.events.append({"event": "restarted", "position": position, "time_s": time.time() - kit.t0,
                                   "pid": kit.infos[position]["pid"]})
                recorder.log({"event": "worker_restarted", "position": position, "pid": kit.infos[position]["pid"]})
                kit.write_workers()
                submit(position)
        _watch_workers(kit, running, restarting, lost_at, config.watchdog_s)
        _collect_updates(session, kit)
        recorder.tick()  # the run's periodic evaluation and checkpoints (on_tick)
    _collect_updates(session, kit)
    _refresh_mirror(session, kit)
    if not any(position not in kit.dropped for position in range(config.devices)):
        raise StallError(f"every Ray worker was lost or dropped (lost {kit.workers_lost}, dropped {len(kit.dropped)})")
    rounds, kit.averaging_rounds = kit.averaging_rounds, 0
    return EpochResult(batches=finished_batches, peak_inflight=kit.peak_inflight, window_size=kit.window_size,
                       averaging_rounds=rounds)


def _watch_workers(kit: RayKit, running: dict, restarting: dict, lost_at: dict, watchdog_s: float) -> None:
    """A worker whose chunk takes longer than 8 x `--watchdog`, that does not answer the heartbeat
    within `--watchdog` (stopped, its host cut off: it is killed), or that died and is not restarted
    within `--watchdog`, is dropped, not waited for."""
    now = time.time()
    for position in list(restarting):
        if now - lost_at[position] > watchdog_s:
            del restarting[position]
            _drop(kit, position, now)
    for ref, (position, started) in list(running.items()):
        if now - started > max(watchdog_s, 1.0) * CHUNKS_PER_EPOCH:
            del running[ref]
            _drop(kit, position, now)
            continue
        beat, since = kit.beats.get(position, (None, 0.0))
        if beat is None:
            if now - since >= BEAT_S:
                kit.beats[position] = (kit.workers[position].info.remote(), now)
        elif kit.ray.wait([beat], timeout=0)[0]:  # answered (a dead worker's chunk says so itself)
            kit.beats[position] = (None, now)
        elif now - since > watchdog_s:  # no answer: stopped, or its host is cut off
            del running[ref], kit.beats[position]
            kit.ray.kill(kit.workers[position], no_restart=True)
            _drop(kit, position, now)


def _drop(kit: RayKit, position: int, now: float) -> None:
    """Worker `position` gets no more work; its model copy (a copies trainer's) leaves the average."""
    kit.dropped.add(position)
    kit.events.append({"event": "dropped", "position": position, "time_s": now - kit.t0})
    kit.write_workers()
    for server in kit.servers:
        server.forget.remote(position)


def _summary(session) -> dict:
    kit: RayKit = session.kit
    traffic = [kit.traffic.get(position, {}) for position in range(len(kit.workers))]
    counted = {}
    if kit.copies:  # updates went to the workers' copies: count their records (the servers' versions count averages)
        per_stage = collections.Counter(update.stage for update in session.recorder.updates)
        counted = {"updates_per_stage": {name: per_stage[stage] for stage, name in enumerate(session.model.stage_names)}}
    if session.keeps_read_params and not kit.copies:  # dc on the servers: what they kept, what they missed
        counted["dc_reads"] = _from_servers(session, kit, "read_stats")
    return {**counted, "backend": "ray", "devices": len(kit.workers), "workers": kit.infos, "workers_lost": kit.workers_lost,
            "workers_restarted": kit.workers_restarted, "workers_dropped": sorted(kit.dropped),
            "stage_servers": kit.server_infos,
            "pulls_per_worker": [t.get("pulls", 0) for t in traffic],
            "pull_bytes_per_worker": [t.get("pull_bytes", 0) for t in traffic],
            "push_bytes_per_worker": [t.get("push_bytes", 0) for t in traffic],
            "bytes_moved_per_sample": sum(t.get("pull_bytes", 0) + t.get("push_bytes", 0) for t in traffic)
            / max(session.recorder.samples, 1)}


def _finish_kit(kit: RayKit) -> None:
    for actor in kit.workers + kit.servers:
        try:
            kit.ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if kit.started_ray:
        kit.ray.shutdown()


def _finish(session) -> None:
    if isinstance(session.kit, RayKit):
        _finish_kit(session.kit)


def ray_spec(spec):
    """`spec` with its epochs run by Ray worker actors against stage servers."""
    return dataclasses.replace(spec, run_epoch=_run_epoch,
                               prepare=lambda session: _prepare(session, spec.copies), units=lambda config, devices: ((), ()),
                               multi_device=True, exact_position=False, staleness_bound=lambda config: None,
                               summary=_summary, finish=_finish)


