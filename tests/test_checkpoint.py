"""Checkpoints of live runs: atomic writes, restore, kill -9 and resume, Ctrl+C with a checkpoint, and
the errors of a bad resume."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import pytest
from conftest import interrupt_run, replace

from asyncsgd import checkpoint
from asyncsgd import trainers
from asyncsgd.assemble import build_session
from asyncsgd.trainers import EpochPlan

pytestmark = pytest.mark.timeout(300)


def cli(*args, timeout=200):
    return subprocess.run([sys.executable, "-m", "asyncsgd", *args], capture_output=True, text=True, timeout=timeout)


def run_args(out, *extra):
    return ["train", "--model", "mlp", "--dataset", "synthetic", "--train-subset", "1024", "--batch-size", "16",
            "--lr", "0.02", "--no-progress", "--out", str(out), *extra]


def session_after(config, data, steps):
    session, _ = build_session(config, data.normalized())
    if steps:
        trainers.get(config.trainer).run_epoch(session, EpochPlan(0, 0, steps))
        session.recorder.tick()
    return session


@pytest.mark.parametrize("trainer,devices", [("pdasgd", 1), ("lapsgd", 2), ("ddp", 2)])
def test_save_then_restore_gives_the_same_stores(tiny_config, tiny_data, tmp_path, trainer, devices):
    config = replace(tiny_config, trainer=trainer, devices=devices, model="cnn")
    trained = session_after(config, tiny_data, 12)
    position = trained.recorder.state()
    assert position["steps"] == 12
    path = checkpoint.save(str(tmp_path), trained, position, {"next_step": None})
    fresh = session_after(config, tiny_data, 0)
    meta = checkpoint.restore(path, fresh)
    assert meta["steps"] == 12
    for a, b in zip(trained.replicas or [trained.store], fresh.replicas or [fresh.store]):
        assert a.versions() == b.versions() and a.versions()[0] > 0
        chex.assert_trees_all_equal(jax.device_get(a.params()), jax.device_get(b.params()))
        chex.assert_trees_all_equal(jax.device_get(a.opt_states()), jax.device_get(b.opt_states()))
        # restored where the run keeps them (replicated for ddp, per device for LAP-SGD copies)
        assert ({d for leaf in jax.tree_util.tree_leaves(a.params()) for d in leaf.devices()}
                == {d for leaf in jax.tree_util.tree_leaves(b.params()) for d in leaf.devices()})


def test_checkpoints_are_atomic_and_pruned(tiny_config, tiny_data, tmp_path):
    session = session_after(replace(tiny_config, trainer="pdasgd"), tiny_data, 3)  # position as given
    for steps in (1, 2, 3):
        checkpoint.save(str(tmp_path), session, {**session.recorder.state(), "steps": steps}, {}, keep=2)
    os.makedirs(tmp_path / "checkpoints" / ".tmp-00000009-1")  # a save cut short by a crash
    (tmp_path / "checkpoints" / "step-00000010").mkdir()       # a directory without meta.json
    names = [os.path.basename(p) for p in checkpoint.checkpoints(str(tmp_path))]
    assert names == ["step-00000002", "step-00000003"]
    assert checkpoint.latest(str(tmp_path)).endswith("step-00000003")


def test_a_corrupt_checkpoint_is_a_clear_error(tiny_config, tiny_data, tmp_path):
    session = session_after(tiny_config, tiny_data, 2)
    path = checkpoint.save(str(tmp_path), session, session.recorder.state(), {})
    with open(os.path.join(path, "trees.msgpack"), "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
        checkpoint.restore(path, session_after(tiny_config, tiny_data, 0))
    other = session_after(replace(tiny_config, model="cnn"), tiny_data, 0)
    good = checkpoint.save(str(tmp_path / "b"), session, session.recorder.state(), {})
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
        checkpoint.restore(good, other)


def _wait_for_checkpoint(proc, out, deadline_s=120):
    deadline = time.monotonic() + deadline_s
    while checkpoint.latest(str(out)) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)


@pytest.mark.parametrize("trainer", ["sync", "pdasgd"])
def test_killed_with_sigkill_then_resumed_finishes_in_line(tmp_path, trainer):
    out = tmp_path / "run"
    args = run_args(out, "--trainer", trainer, "--epochs", "6", "--checkpoint-every", "40")
    proc = subprocess.Popen([sys.executable, "-m", "asyncsgd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(proc, out)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    partial = json.loads((out / "summary.json").read_text())
    assert partial["status"] == "running"  # clearly not a finished run
    meta = checkpoint.read_meta(checkpoint.latest(str(out)))
    assert meta["steps"] >= 40

    resumed = cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    total = 6 * (1024 // 16)
    assert summary["status"] == "complete" and summary["steps"] == total
    assert summary["resumed_from_step"] == meta["steps"] > 0
    assert summary["updates_per_stage"]["head"] >= total  # replays at most add, never lose, updates

    straight = cli(*run_args(tmp_path / "straight", "--trainer", trainer, "--epochs", "6"))
    assert straight.returncode == 0, straight.stderr
    reference = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert abs(summary["test_accuracy"] - reference["test_accuracy"]) < 0.05
    if trainer == "sync":  # the synchronous run resumes exactly where it stopped: the same result
        assert summary["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-6)


def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    proc, took_s = interrupt_run(run_args(out, "--trainer", "pdasgd", "--epochs", "400", "--log-every", "1"), out,
                                 signal.SIGINT, train_records=5)
    assert took_s < 5
    assert proc.returncode == 130, proc.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint"]
    meta = checkpoint.read_meta(checkpoint.latest(str(out)))
    assert 0 < meta["steps"] <= summary["steps"]
    # Resuming with a changed learning rate is refused; the checkpoint and outputs stay as they were.
    refused = cli("train", "--resume", str(out), "--lr", "0.5")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"asyncsgd: error: --resume {out}: --lr 0.5 differs from the saved run's 0.02; "
        "a resumed run keeps its configuration"]
    assert checkpoint.read_meta(checkpoint.latest(str(out)))["steps"] == meta["steps"]
    # A shorter run is not a change of what is computed per step, but the total: also refused.
    assert cli("train", "--resume", str(out), "--epochs", "1").returncode == 2


@pytest.mark.parametrize("setup,message", [
    ("empty", "no readable config.json"),
    ("no-checkpoint", "no checkpoint in"),
])
def test_bad_resume_targets(tmp_path, setup, message):
    out = tmp_path / "run"
    out.mkdir()
    if setup == "no-checkpoint":
        assert cli(*run_args(out, "--max-steps", "2")).returncode == 0
        (out / "summary.json").unlink()  # not finished, but never checkpointed
    result = cli("train", "--resume", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_resuming_a_finished_run_is_refused(tmp_path):
    out = tmp_path / "run"
    assert cli(*run_args(out, "--max-steps", "3", "--checkpoint-every", "1")).returncode == 0
    result = cli("train", "--resume", str(out))
    assert result.returncode == 2 and "already complete" in result.stderr


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", "0s"])
def test_bad_checkpoint_every(tmp_path, value):
    result = cli(*run_args(tmp_path / "run", "--max-steps", "2", "--checkpoint-every", value))
    assert result.returncode == 2 and "--checkpoint-every" in result.stderr
