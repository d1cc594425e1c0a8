"""The simulated clock: the scheduler's virtual time against hand computations, every trainer
deterministic under it, replayed interleavings keep the invariants, devices without hardware, the
analytic cases, resuming, profiles, and the CLI and plots labelling simulated time."""

import csv
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import replace, train_steps

from asyncsgd import trainers
from asyncsgd.compare import format_comparison
from asyncsgd.config import validate
from asyncsgd.data import steps_per_epoch
from asyncsgd.errors import ConfigError
from asyncsgd.plots import plot_accuracy
from asyncsgd.run import train
from asyncsgd.sim import DeviceModel, Profile, SimClock, load_profile, profile_from_json
from asyncsgd.sweep import aggregate, format_table
from asyncsgd.workers import Channel, Crew

pytestmark = pytest.mark.timeout(300)

UNIT_S = {"unit": 1.0}
NAN = float("nan")


def _clock(bandwidth=1e9, latency=1e-3, units=None, straggler=None):
    clock = SimClock(Profile("test", peak_flops=1e12, efficiency=1.0, launch_s=0.0, bandwidth_bytes_per_s=bandwidth,
                             latency_s=latency, units=dict(units or UNIT_S)))
    clock.bind(DeviceModel(clock.profile, lambda name: NAN, straggler))
    return clock


# -- the scheduler ----------------------------------------------------------------------------------
def test_one_thread_at_a_time_and_each_device_one_unit_at_a_time():
    clock = _clock()
    crew = Crew("sched", watchdog_s=1e6, clock=clock)
    times = {}
    running, most = [0], [0]
    guard = threading.Lock()

    def body(worker, device):
        for _ in range(3):
            with guard:
                running[0] += 1
                most[0] = max(most[0], running[0])
            threading.Event().wait(0.002)  # real time while holding the turn: nobody else may run
            with guard:
                running[0] -= 1
            clock.compute(device, "unit")
            times.setdefault(worker.name, []).append(clock.now())

    for name, device in (("a", 0), ("b", 0), ("c", 1)):
        crew.spawn(name, body, device)
    crew.run()
    assert most[0] == 1
    # Device 0 runs a's and b's units one after another, in the order they were issued; c has device 1.
    assert times == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0], "c": [1.0, 2.0, 3.0]}
    assert clock.busy_s == {0: 6.0, 1: 3.0}


def test_a_crew_ends_when_its_last_worker_does_not_at_the_next_poll():
    # The coordinator polls every 50 ms of the run's clock; a finishing worker wakes it, so a crew's
    # (an epoch's) virtual time is its work alone (it used to end at the coordinator's next poll).
    clock = _clock(units={"unit": 0.001})
    crew = Crew("end", watchdog_s=1e6, clock=clock)
    crew.spawn("a", lambda worker: [clock.compute(0, "unit") for _ in range(3)])
    crew.run()
    assert clock.now() == pytest.approx(0.003, abs=1e-12)


def test_a_party_settles_its_previous_arrays_not_its_newest():
    # A simulated party need not wait for its newest arrays (the turnstile orders it), but it is never
    # more than one settle ahead of its own work: memory stays bounded.
    import jax.numpy as jnp
    clock = _clock()
    crew = Crew("settle", watchdog_s=1e6, clock=clock)
    seen = {}

    def body(worker):
        a = jnp.ones((600, 600)) @ jnp.ones((600, 600))
        clock.settle(a)
        b = a @ a
        clock.settle(b)
        seen["a ready after the next settle"] = a.is_ready()
        seen["values"] = float(b[0, 0])

    crew.spawn("a", body)
    crew.run()
    assert seen == {"a ready after the next settle": True, "values": 600.0 * 600 * 600}


def test_transfers_allreduce_sleep_and_notify_in_virtual_time():
    clock = _clock(bandwidth=1e9, latency=1e-3)
    crew = Crew("links", watchdog_s=1e6, clock=clock)
    channel = Channel("hand-off", 1)
    seen = {}

    def producer(worker):
        clock.transfer(0, 1e6)                    # 1e-3 + 1e6 / 1e9 = 2e-3
        clock.allreduce(range(4), 1e6)            # 2 * 3/4 * 1e-3 + 2 * 3 * 1e-3 = 7.5e-3
        seen["after links"] = clock.now()
        worker.sleep(2.0)
        worker.put(channel, "item")
        seen["put"] = clock.now()

    def consumer(worker):
        seen["got"] = (worker.get(channel), clock.now())

    crew.spawn("producer", producer)
    crew.spawn("consumer", consumer)
    crew.run()
    assert seen["after links"] == pytest.approx(9.5e-3, abs=1e-12)
    assert seen["put"] == pytest.approx(2.0095, abs=1e-9)
    assert seen["got"] == ("item", pytest.approx(2.0095, abs=1e-9))  # woken by the put, not by a poll


def test_a_worker_error_stops_a_simulated_crew_and_names_the_worker():
    clock = _clock()
    crew = Crew("fails", watchdog_s=1e6, clock=clock)

    def bad(worker):
        clock.compute(0, "unit")
        raise FloatingPointError("boom")

    def good(worker):
        for _ in range(100):
            clock.compute(1, "unit")

    crew.spawn("bad", bad)
    crew.spawn("good", good)
    with pytest.raises(Exception, match="worker bad failed .*boom"):
        crew.run()
    assert not crew.alive()


# -- whole runs -------------------------------------------------------------------------------------
WALL_FIELDS = {"wall_time_s", "compile_time_s", "eval_time_s", "peak_rss_mb", "run_peak_rss_mb", "checkpoint",
               "config"}


def _run(config, tiny_data, out):
    summary = train(replace(config, out=str(out)), tiny_data)
    with open(out / "updates.csv", newline="") as handle:
        updates = list(csv.reader(handle))
    return summary, updates


@pytest.mark.parametrize("trainer, devices", [("sync", 1), ("layerwise", 1), ("pdasgd", 3), ("dasgd", 2),
                                               ("hogwild", 3), ("ddp", 4), ("lapsgd", 3), ("lppsgd", 2)])
def test_a_simulated_run_is_a_function_of_config_seed_and_profile(tiny_config, tiny_data, tmp_path, trainer,
                                                                  devices):
    config = replace(tiny_config, trainer=trainer, devices=devices, clock="simulated", profile="a100", lr=0.02,
                     forward_threads=2, backward_threads=3, workers=2, max_inflight=2, batch_size=16,
                     eval_every_steps=8, delay="exp:mean=0.0001", max_steps=16)
    first, updates_first = _run(config, tiny_data, tmp_path / "a")
    second, updates_second = _run(config, tiny_data, tmp_path / "b")
    assert first["status"] == "complete" and first["clock"] == "simulated" and first["simulated_time_s"] > 0
    assert updates_first == updates_second and len(updates_first) > 1
    assert {k: v for k, v in first.items() if k not in WALL_FIELDS} == \
        {k: v for k, v in second.items() if k not in WALL_FIELDS}
    assert first["profile"]["name"] == "a100" and len(first["busy_fraction"]) == devices
    assert all(0 < busy <= 1 for busy in first["busy_fraction"])
    assert first["samples_per_s"] == pytest.approx(first["samples"] / first["simulated_time_s"])
    evals = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["time_s"] for r in evals if r["event"] == "eval"][-1] == pytest.approx(first["simulated_time_s"])
    # The tables say which clock they show.
    assert "SIMULATED time on profile a100" in format_comparison([first])
    line = aggregate([dict(first, label="x", out=str(tmp_path / "a"))])[0]
    assert line["wall_time_s"] == first["simulated_time_s"] and "SIMULATED train s" in format_table([line])


@pytest.mark.parametrize("trainer", ["pdasgd", "hogwild"])
def test_replayed_interleavings_keep_the_invariants(tiny_config, tiny_data, trainer):
    config = replace(tiny_config, trainer=trainer, devices=2, clock="simulated", forward_threads=2,
                     backward_threads=3, workers=3, max_inflight=2, batch_size=8, lr=0.02)
    steps = steps_per_epoch(len(tiny_data.train_y), 8) // 2
    logs = {}
    for seed in (1, 1, 2):
        session, _ = train_steps(replace(config, sim_tie_seed=seed), tiny_data, steps)
        store, recorder = session.store, session.recorder
        assert recorder.steps == steps
        for stage in range(len(store)):  # no lost update: every version committed once
            assert sorted(u.version_commit for u in recorder.updates if u.stage == stage) == list(range(steps))
        bound = trainers.get(trainer).staleness_bound(config)
        assert max(u.staleness for u in recorder.updates) <= bound
        log = [(u.stage, u.version_read, u.version_commit, u.worker, u.t_read, u.t_commit) for u in recorder.updates]
        if seed in logs:
            assert log == logs[seed]  # the same seed replays the same interleaving
        logs[seed] = log
    assert len({tuple(log) for log in logs.values()}) > 1  # other seeds, other interleavings


def test_sixteen_simulated_devices_need_no_real_ones(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="pdasgd", devices=16, clock="simulated", window="device",
                     max_inflight=1, batch_size=8, lr=0.01)
    session, result = train_steps(config, tiny_data, 48)
    assert len(session.devices) == 16 and len(set(session.devices)) == 1  # one real device (conftest has 4)
    assert session.recorder.steps == 48 == result.batches
    assert sum(view.pulls for view in session.views[1:]) > 0 and session.views[0].pulls == 0
    assert len({u.worker.split("@")[1] for u in session.recorder.updates}) > 8  # most devices worked
    assert session.units.max_trace_count() == 1


# -- analytic cases ---------------------------------------------------------------------------------
def test_sync_and_layerwise_take_the_sum_of_their_units(tiny_config, tiny_data):
    for trainer, units in (("sync", ["train_step"]), ("layerwise", None)):
        config = replace(tiny_config, trainer=trainer, clock="simulated")
        session, _ = train_steps(config, tiny_data, 10)
        model = session.clock.model
        names = units or ([f"forward/{n}" for n in session.model.stage_names] + ["loss_grad"]
                          + [f"backward_update/{n}" for n in session.model.stage_names])
        per_step = sum(model.unit_seconds(name) for name in names)
        assert session.clock.now() == pytest.approx(10 * per_step, rel=0.02)
        # and the unit cost is the FLOP formula of the a100 profile
        flops = session.units.unit_flops(names[0])
        assert model.unit_seconds(names[0]) == pytest.approx(flops / (156e12 * 0.15) + 1e-5)


def test_ddp_waits_for_a_straggler_and_the_ring_allreduce(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="ddp", devices=4, clock="simulated", batch_size=16,
                     delay="straggler:device=2,factor=3")
    session, _ = train_steps(config, tiny_data, 8)
    model, profile = session.clock.model, session.clock.profile
    grads = sum(leaf.size * 4 for leaf in __import__("jax").tree_util.tree_leaves(session.store.params()))
    work = model.unit_seconds("train_step") - profile.launch_s  # each device does a quarter; launches in full
    step = 3 * (work / 4 + profile.launch_s) + (2 * 3 / 4 * grads / profile.bandwidth_bytes_per_s
                                                + 2 * 3 * profile.latency_s)
    assert session.clock.now() == pytest.approx(8 * step, rel=0.02)
    busy = session.clock.busy_s
    assert busy[2] == pytest.approx(3 * busy[0])  # the straggler's units take 3x


def test_free_links_make_pulls_cost_nothing(tiny_config, tiny_data, tmp_path):
    free = tmp_path / "free.json"
    free.write_text(json.dumps({"name": "free", "device": {"peak_flops": 1e12, "efficiency": 0.5, "launch_s": 0},
                                "link": {"bandwidth_bytes_per_s": 1e30, "latency_s": 0}}))
    config = replace(tiny_config, trainer="hogwild", devices=1, workers=1, clock="simulated", profile=str(free))
    one, _ = train_steps(config, tiny_data, 12)
    per_step = one.clock.model.unit_seconds("model_grad") + one.clock.model.unit_seconds("model_update")
    assert one.clock.now() == pytest.approx(12 * per_step, rel=0.02)


# -- resume -----------------------------------------------------------------------------------------
def test_resuming_a_simulated_run_gives_the_uninterrupted_result(tiny_config, tiny_data, tmp_path):
    per_epoch = steps_per_epoch(len(tiny_data.train_y), 16)
    config = replace(tiny_config, trainer="pdasgd", clock="simulated", epochs=2, checkpoint_every=str(per_epoch),
                     keep_checkpoints=5, forward_threads=1, backward_threads=2, max_inflight=2, lr=0.02)
    whole = train(replace(config, out=str(tmp_path / "whole")), tiny_data)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / f"step-{per_epoch:08d}",
                    resumed_dir / "checkpoints" / f"step-{per_epoch:08d}")
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    (resumed_dir / "config.json").write_text(json.dumps({**saved, "out": str(resumed_dir)}))
    resumed = train(replace(config, out=str(resumed_dir)), tiny_data, resume=True)
    assert resumed["resumed_from_step"] == per_epoch and resumed["steps"] == whole["steps"] == 2 * per_epoch
    assert resumed["test_loss"] == whole["test_loss"] and resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["updates_per_stage"] == whole["updates_per_stage"]

    def rows(path):
        with open(path, newline="") as handle:
            return [row[:5] for row in csv.reader(handle)][1:]  # stage, versions, staleness, worker
    second_epoch = rows(tmp_path / "whole" / "updates.csv")[-len(rows(resumed_dir / "updates.csv")):]
    assert rows(resumed_dir / "updates.csv") == second_epoch and second_epoch


# -- profiles, configuration, CLI, plots -------------------------------------------------------------
def test_profiles_load_and_bad_ones_are_one_line_errors(tmp_path, tiny_config):
    assert load_profile("a100").peak_flops == 156e12 and load_profile("h100").bandwidth_bytes_per_s == 450e9
    good = {"name": "x", "device": {"peak_flops": 1e12, "efficiency": 0.5, "launch_s": 0},
            "link": {"bandwidth_bytes_per_s": 1e9, "latency_s": 1e-6}, "units": {"dense1/forward": 0.001}}
    assert profile_from_json(good).units == {"dense1/forward": 0.001}
    for broken, message in (({**good, "device": {"peak_flops": 1e12, "launch_s": 0}}, "device.efficiency is missing"),
                            ({**good, "link": {"bandwidth_bytes_per_s": -1, "latency_s": 0}},
                             "link.bandwidth_bytes_per_s must be > 0"),
                            ({**good, "units": {"a": "fast"}}, r"units\['a'\] must be a finite number")):
        with pytest.raises(ConfigError, match=message):
            profile_from_json(broken, "p.json")
    with pytest.raises(ConfigError, match="not a built-in profile"):
        validate(replace(tiny_config, clock="simulated", profile="v100"))
    with pytest.raises(ConfigError, match="--profile and --sim-tie-seed need --clock simulated"):
        validate(replace(tiny_config, profile="a100"))


def test_the_cli_runs_a_simulated_train_and_the_plot_says_so(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one real device: 6 simulated ones
    result = subprocess.run([sys.executable, "-m", "asyncsgd", "train", "--clock", "simulated", "--profile", "h100",
                             "--trainer", "pdasgd", "--devices", "6", "--model", "mlp", "--dataset", "synthetic",
                             "--train-subset", "256", "--batch-size", "16", "--epochs", "1", "--no-progress",
                             "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clock"] == "simulated" and summary["profile"]["name"] == "h100" and summary["devices"] == 6
    figure = plot_accuracy({"pdasgd": str(out)}, None)
    assert figure.axes[0].get_xlabel() == "SIMULATED training time (s), profile h100"


def test_a_measured_profile_and_its_validation(tiny_config, tmp_path):
    from asyncsgd.bench import format_validation, measure_profile, validate_profile
    config = replace(tiny_config, model="mlp", dataset="synthetic", batch_size=16)
    path = str(tmp_path / "here.json")
    profile = measure_profile(config, path, repeats=2)
    assert load_profile(path).units == profile.units
    assert {"dense1/forward", "dense1/backward_update", "loss_grad", "train_step"} <= set(profile.units)
    assert all(seconds > 0 for seconds in profile.units.values())
    result = validate_profile(config, path, ["sync", "pdasgd"], steps=4, rounds=1)
    assert [r["trainer"] for r in result["rows"]] == ["sync", "pdasgd"]
    assert all(r["measured_samples_per_s"] > 0 and r["predicted_samples_per_s"] > 0 for r in result["rows"])
    assert sorted(result["predicted_ranking"].replace("=", ">").split(" > ")) == ["pdasgd", "sync"]
    assert "| sync |" in format_validation(result) and np.isfinite(result["rows"][0]["error"])


@pytest.mark.parametrize("clock", ["wall", "simulated"])
def test_split_placement_runs_forward_on_the_first_device_and_backward_on_the_others(tiny_config, tiny_data, clock):
    config = replace(tiny_config, trainer="pdasgd", devices=3, placement="split", clock=clock, forward_threads=1,
                     backward_threads=2, max_inflight=1, batch_size=8, lr=0.02)
    steps = steps_per_epoch(len(tiny_data.train_y), 8) // 2
    session, result = train_steps(config, tiny_data, steps)
    store, recorder = session.store, session.recorder
    assert recorder.steps == steps and store.versions() == [steps] * len(store)  # nothing lost
    assert {u.worker.split("@")[1] for u in recorder.updates} == {"1", "2"}  # backward only off the first device
    assert max(u.staleness for u in recorder.updates) <= trainers.get("pdasgd").staleness_bound(config)
    assert result.window_size == 3 * (config.max_inflight + 1)
    if clock == "simulated":
        assert session.clock.link_free[0] > 0 and session.clock.busy_s[0] > 0  # residuals crossed device 0's link
    with pytest.raises(ConfigError, match="needs --devices 2 or more"):
        validate(replace(config, devices=1))
    with pytest.raises(ConfigError, match="hogwild runs only replicated; split runs pdasgd, dasgd"):
        validate(replace(config, trainer="hogwild"))
