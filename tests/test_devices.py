"""Many devices: ddp against sync, the multi-device async trainers' invariants, LAP/LPP-SGD averaging,
the delay model, and time to target accuracy. conftest.py gives every test 4 virtual CPU devices."""

import json
import subprocess
import sys
import threading
import time

import chex
import jax
import numpy as np
import pytest
from conftest import replace, run_steps, train_steps

from asyncsgd import trainers
from asyncsgd.assemble import build_session
from asyncsgd.errors import ConfigError
from asyncsgd.evaluation import evaluate
from asyncsgd.data import steps_per_epoch
from asyncsgd.delays import DelaySpec, DeviceDelay, parse_delay
from asyncsgd.run import train
from asyncsgd.store import ParamStore
from asyncsgd.trainers.lapsgd import average_copies, averaging_due, lpp_slices
from asyncsgd.units import tree_nbytes

pytestmark = pytest.mark.timeout(240)


def test_there_are_four_devices():
    assert len(jax.devices()) >= 4  # conftest's XLA_FLAGS; every test below relies on it


# -- ddp -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("devices", [1, 4])
def test_ddp_equals_sync_at_the_same_global_batch(tiny_config, tiny_data, devices):
    config = replace(tiny_config, model="cnn", batch_size=16, momentum=0.9, weight_decay=1e-4)
    sync = run_steps(replace(config, trainer="sync"), tiny_data, 15)
    ddp = run_steps(replace(config, trainer="ddp", devices=devices), tiny_data, 15)
    assert ddp.store.versions() == sync.store.versions() == [15] * len(sync.store)
    chex.assert_trees_all_close(jax.device_get(ddp.store.params()), jax.device_get(sync.store.params()),
                                rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(ddp.recorder.losses, sync.recorder.losses, rtol=2e-4)
    leaf = jax.tree_util.tree_leaves(ddp.store.params())[0]
    assert len(leaf.devices()) == devices  # replicated on every device of the mesh
    assert ddp.units.max_trace_count() == 1


def test_ddp_rejects_a_batch_that_does_not_split(tiny_config):
    with pytest.raises(ConfigError, match="divisible by --devices 3"):
        train(replace(tiny_config, trainer="ddp", devices=3, batch_size=16))


# -- multi-device asynchronous trainers --------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["pdasgd", "dasgd", "hogwild"])
def test_multi_device_async_loses_no_update_and_respects_the_bound(tiny_config, tiny_data, trainer):
    config = replace(tiny_config, trainer=trainer, devices=3, forward_threads=1, backward_threads=2, workers=2,
                     max_inflight=1, batch_size=8, lr=0.02)
    steps = steps_per_epoch(len(tiny_data.train_y), 8)
    session = run_steps(config, tiny_data, steps)
    recorder, store = session.recorder, session.store
    assert recorder.steps == steps
    for stage in range(len(store)):
        commits = [u for u in recorder.updates if u.stage == stage]
        assert len(commits) == steps == store.read(stage).version
        assert sorted(u.version_commit for u in commits) == list(range(steps))
    bound = trainers.get(trainer).staleness_bound(config)
    assert max(u.staleness for u in recorder.updates) <= bound
    # Every device did work, and the non-home devices refreshed their copies.
    assert {u.worker.rsplit("@", 1)[1] for u in recorder.updates} == {"0", "1", "2"}
    assert session.views[0].pulls == 0 and min(v.pulls for v in session.views[1:]) > 0
    assert session.units.max_trace_count() == 1
    # Bytes between devices: home moves none; a pull copies one stage's parameters; with layer-wise
    # commits each update a non-home device made pushed exactly that stage's gradient home.
    stage_bytes = [tree_nbytes(params) for params in store.params()]
    assert session.views[0].pull_bytes == session.views[0].push_bytes == 0
    for device, view in enumerate(session.views[1:], start=1):
        assert view.pulls * min(stage_bytes) <= view.pull_bytes <= view.pulls * max(stage_bytes)
        if trainer == "pdasgd":
            mine = [u for u in recorder.updates if u.worker.endswith(f"@{device}")]
            assert view.push_bytes == sum(stage_bytes[u.stage] for u in mine) > 0


@pytest.mark.parametrize("trainer", ["pdasgd", "hogwild", "ddp", "lapsgd", "lppsgd"])
def test_new_trainers_learn_on_two_devices(tiny_config, tiny_data, trainer):
    config = replace(tiny_config, trainer=trainer, devices=2, lr=0.02, max_inflight=1, averaging_warmup=5,
                     averaging_period=4)
    data = tiny_data.normalized()
    session = run_steps(config, tiny_data, steps_per_epoch(len(tiny_data.train_y), config.batch_size))
    params, states = session.view()
    _, accuracy = evaluate(session.units, params, states, data.test_x, data.test_y, 64)
    assert accuracy > 0.5, accuracy
    losses = session.recorder.losses
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert session.units.max_trace_count() == 1


# -- LAP-SGD / LPP-SGD ------------------------------------------------------------------------------
def test_lpp_slices_cover_the_stages_contiguously():
    assert lpp_slices(5, 2) == [(0, 2), (2, 5)] or lpp_slices(5, 2) == [(0, 3), (3, 5)]
    for stages, workers in [(3, 2), (3, 8), (10, 4), (1, 3)]:
        slices = lpp_slices(stages, workers)
        assert slices[0][0] == 0 and slices[-1][1] == stages
        assert all(a < b for a, b in slices) and all(s[1] == t[0] for s, t in zip(slices, slices[1:]))
        assert len(slices) == min(stages, workers)


def test_averaging_schedule():
    due = [g for g in range(1, 101) if averaging_due(g, warmup=10, period=16)]
    assert due == list(range(1, 11)) + [16, 32, 48, 64, 80, 96]


def test_averaging_moves_each_copy_by_average_minus_snapshot(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="lapsgd", devices=3)
    session, _ = build_session(config, tiny_data.normalized())
    # Give the copies different parameters: copy d's first stage moved by d.
    for d, store in enumerate(session.replicas):
        store.commit(0, lambda p, o, d=d: (jax.tree_util.tree_map(lambda x: x + d, p), o))
    before = [jax.device_get(store.read(0).params) for store in session.replicas]
    versions = [store.versions() for store in session.replicas]
    average_copies(session)
    mean = jax.tree_util.tree_map(lambda *xs: sum(xs) / 3, *before)
    for store in session.replicas:
        chex.assert_trees_all_close(jax.device_get(store.read(0).params), mean, atol=1e-6)
    # Averaging is not a gradient update: versions (and so staleness) are unchanged.
    assert [store.versions() for store in session.replicas] == versions
    chex.assert_trees_all_close(jax.device_get(session.view()[0][0]), mean, atol=1e-6)


def test_averaging_keeps_the_copies_close(tiny_config, tiny_data):
    steps = steps_per_epoch(len(tiny_data.train_y), tiny_config.batch_size)

    def spread(**averaging):
        config = replace(tiny_config, trainer="lapsgd", devices=2, lr=0.02, **averaging)
        session, result = train_steps(config, tiny_data, steps)
        a, b = (jax.device_get(store.params()) for store in session.replicas)
        gap = np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                      jax.tree_util.tree_leaves(b))))
        return gap, result.averaging_rounds

    never, rounds_never = spread(averaging_warmup=0, averaging_period=10 ** 6)
    often, rounds_often = spread(averaging_warmup=10 ** 6, averaging_period=1)
    assert rounds_never == 0 and 1 <= rounds_often <= steps // 2
    # Averaged after every global step, the copies differ by at most about one step of each; never
    # averaged, they drift apart for the whole epoch.
    assert often < 0.25 * never, (often, never)


def test_lppsgd_applies_partial_steps_to_one_slice(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="lppsgd", devices=1, workers=2, max_inflight=0, model="mlp")
    steps = 8
    session = run_steps(config, tiny_data, steps)
    slices = session.kit.slices
    assert len(slices) == 2
    # Each worker alternates full and partial steps: stages outside a slice get fewer updates.
    counts = session.updates_per_stage()
    assert sum(counts) < steps * len(counts)
    assert max(counts) <= steps and min(counts) >= steps // 2


# -- delays ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "straggler:device=0,factor=4", "exp:mean=0.02",
                                  "lognormal:mean=0.02,sigma=1", "periodic:every=50,stall=1.0",
                                  "periodic:every=5,stall=0.5,device=1"])
def test_delay_specs_parse_and_round_trip(spec):
    parsed = parse_delay(spec, devices=4)
    assert parse_delay(str(parsed), devices=4) == parsed
    assert parsed.kind == spec.split(":")[0]


@pytest.mark.parametrize("spec,message", [
    ("", "empty spec"),
    ("slow:factor=2", "unknown kind 'slow'"),
    ("straggler:device=0", "straggler needs factor"),
    ("straggler:device=9,factor=4", "device=9 is not one of the run's 4"),
    ("straggler:device=0,factor=0.5", "factor must be >= 1"),
    ("exp:mean=-1", "mean must be > 0"),
    ("exp:mean=abc", "'abc' is not a float"),
    ("exp:mean=0.1,mean=0.2", "given twice"),
    ("exp:scale=1", "exp has no parameter 'scale'"),
    ("lognormal:mean=0.02,sigma=0", "sigma must be > 0"),
    ("periodic:every=0,stall=1", "every must be >= 1"),
    ("none:x=1", "takes no parameters"),
    ("exp:mean", "expected name=value"),
])
def test_bad_delay_specs_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_delay(spec, devices=4)


def test_delay_draws_follow_the_spec():
    straggler = parse_delay("straggler:device=1,factor=4", devices=2)
    assert DeviceDelay(straggler, device=1, seed=0).compute_extra(0.5) == pytest.approx(1.5)
    assert DeviceDelay(straggler, device=0, seed=0).compute_extra(0.5) == 0.0
    for spec in ("exp:mean=0.02", "lognormal:mean=0.02,sigma=1"):
        delay = DeviceDelay(parse_delay(spec), device=0, seed=3)
        draws = np.array([delay.push_extra() for _ in range(20000)])
        assert draws.min() >= 0 and abs(draws.mean() - 0.02) < 0.002, (spec, draws.mean())
        again = DeviceDelay(parse_delay(spec), device=0, seed=3)
        assert [again.push_extra() for _ in range(5)] == list(draws[:5])  # seeded: repeats exactly
    periodic = DeviceDelay(parse_delay("periodic:every=3,stall=1.5"), device=0, seed=0)
    assert [periodic.push_extra() for _ in range(7)] == [0, 0, 1.5, 0, 0, 1.5, 0]


def test_a_delay_ends_when_the_run_stops():
    stop = threading.Event()
    delay = DeviceDelay(DelaySpec(kind="periodic", every=1, stall=30.0), device=0, seed=0, stop=stop)
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    delay.after_push()
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("trainer", ["ddp", "pdasgd", "lapsgd"])
def test_delays_are_applied_where_the_spec_says(tiny_config, tiny_data, trainer):
    # Not a speed assertion: the delays' own accounting says who slept.
    config = replace(tiny_config, trainer=trainer, devices=2, delay="straggler:device=1,factor=3", max_inflight=1)
    session, result = train_steps(config, tiny_data, 10)
    assert session.recorder.steps == 10 == result.batches
    slept = result.delay_slept_s
    assert slept[0] == 0.0 and slept[1] > 0.0, slept
    _, quiet = train_steps(replace(config, delay="none"), tiny_data, 10)
    assert quiet.delay_slept_s == (0.0, 0.0)


# -- time to target ---------------------------------------------------------------------------------
def test_target_accuracy_stops_the_run_and_records_the_time(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="pdasgd", devices=2, lr=0.01, epochs=5, target_accuracy=0.85,
                     eval_every_steps=2, max_inflight=1)
    summary = train(config, tiny_data)
    total = 5 * steps_per_epoch(len(tiny_data.train_y), config.batch_size)
    assert summary["status"] == "complete"
    assert summary["time_to_target_s"] is not None and 0 < summary["time_to_target_s"] <= summary["wall_time_s"]
    assert summary["steps_to_target"] < total and summary["steps"] < total
    assert summary["test_accuracy"] >= 0.85
    with open(f"{config.out}/metrics.jsonl", encoding="utf-8") as handle:
        evals = [r for r in map(json.loads, handle) if r["event"] == "eval"]
    assert any(r["during_epoch"] for r in evals)
    # stopped at the first eval to reach it (how many came before depends on how fast the workers ran
    # between the coordinator's ticks: without compilation stalls, often none)
    assert evals and evals[-1]["test_accuracy"] >= 0.85
    assert all(r["test_accuracy"] < 0.85 for r in evals[:-1])


def test_unreached_target_runs_to_the_end(tiny_config, tiny_data):
    summary = train(replace(tiny_config, target_accuracy=0.99, eval_every_steps=10, lr=1e-6), tiny_data)
    assert summary["status"] == "complete" and summary["time_to_target_s"] is None
    assert summary["steps"] == steps_per_epoch(len(tiny_data.train_y), tiny_config.batch_size)


# -- command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--delay", "straggler:factor=4"], "straggler needs device"),
    (["--devices", "0"], "--devices must be in [1, 64]"),
    (["--trainer", "sync", "--devices", "2"], "--trainer sync runs on one device"),
    (["--trainer", "ddp", "--devices", "3", "--batch-size", "16"], "divisible by --devices 3"),
    (["--target-accuracy", "1.5"], "--target-accuracy must be in (0, 1]"),
])
def test_cli_bad_device_and_delay_flags(tmp_path, flags, message):
    cmd = [sys.executable, "-m", "asyncsgd", "train", "--model", "mlp", "--dataset", "synthetic", "--max-steps", "2",
           "--out", str(tmp_path / "run"), "--no-progress", *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_cli_creates_the_devices_it_is_asked_for(tmp_path):
    cmd = [sys.executable, "-m", "asyncsgd", "train", "--trainer", "ddp", "--devices", "6", "--model", "mlp",
           "--dataset", "synthetic", "--batch-size", "12", "--max-steps", "3", "--out", str(tmp_path / "run"),
           "--no-progress", "--delay", "exp:mean=0.001"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["devices"] == 6 and summary["steps"] == 3 and summary["delay"] == "exp:mean=0.001"


def test_store_versions_untouched_by_uncounted_commit():
    store = ParamStore(["a"], [np.zeros(2)], [()])
    store.commit_all(lambda p, o, s: (p, o, s, None), count=False)
    assert store.versions() == [0]
    store.commit_all(lambda p, o, s: (p, o, s, None))
    assert store.versions() == [1]


@pytest.mark.parametrize("trainer", ["pdasgd", "hogwild"])
def test_device_windows_let_the_fast_device_run_ahead_of_a_straggler(tiny_config, tiny_data, trainer):
    config = replace(tiny_config, trainer=trainer, devices=2, window="device", max_inflight=1, workers=1,
                     delay="straggler:device=1,factor=30", lr=0.02, batch_size=8)
    steps = steps_per_epoch(len(tiny_data.train_y), 8)
    session, result = train_steps(config, tiny_data, steps)
    store, recorder = session.store, session.recorder
    assert recorder.steps == steps and store.versions() == [steps] * len(store)  # nothing lost
    by_device = [sum(1 for u in recorder.updates if u.stage == 0 and u.worker.endswith(f"@{d}")) for d in (0, 1)]
    # The straggler's items take ~30x longer; with per-device windows nobody waits for them.
    assert by_device[0] > 4 * by_device[1], by_device
    per_device = config.max_inflight + 1 if trainer == "pdasgd" else max(config.workers, config.max_inflight + 1)
    assert result.window_size == per_device and result.peak_inflight <= per_device  # one window per device
    assert trainers.get(trainer).staleness_bound(config) is None


@pytest.mark.parametrize("trainer, devices", [("pdasgd", 1), ("pdasgd", 3), ("dasgd", 2), ("hogwild", 2),
                                              ("lapsgd", 2), ("lppsgd", 2)])
def test_nothing_compiles_once_the_workers_run(tiny_config, tiny_data, trainer, devices):
    # Compiling holds the GIL: a unit compiled inside the workers stalls every thread (DESIGN.md). A
    # unit is compiled for whether its inputs are committed to a device, so the warm-up must see the
    # placements the run will use; this counts XLA compilations from the first batch to the last.
    from jax._src import dispatch, monitoring
    config = replace(tiny_config, trainer=trainer, devices=devices, forward_threads=1, backward_threads=2,
                     workers=2, max_inflight=1, batch_size=8, lr=0.02)
    session, _ = build_session(config, tiny_data.normalized())
    compiled = []

    def listen(event, seconds, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiled.append(seconds)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        trainers.get(trainer).run_epoch(session, trainers.EpochPlan(0, 0, 12))
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert session.recorder.steps == 12
    assert compiled == [], f"{len(compiled)} compilations while the workers ran"
