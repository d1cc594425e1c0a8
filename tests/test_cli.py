"""The command line end to end, in subprocesses: outputs, one-line errors and exit codes, Ctrl+C."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import interrupt_run

pytestmark = pytest.mark.timeout(180)

SUMMARY_KEYS = {"trainer", "model", "dataset", "seed", "epochs_completed", "steps", "samples", "wall_time_s",
                "compile_time_s", "samples_per_s", "test_accuracy", "test_loss", "train_loss", "staleness",
                "peak_rss_mb", "mfu"}


def cli(*args, env=None, timeout=150):
    return subprocess.run([sys.executable, "-m", "asyncsgd", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def quick(out, *extra):
    return ("train", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--epochs", "2",
            "--no-progress", "--out", str(out), *extra)


def test_train_writes_config_metrics_updates_and_summary(tmp_path):
    out = tmp_path / "run"
    result = cli(*quick(out, "--trainer", "pdasgd", "--log-every", "5"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "complete" and summary["trainer"] == "pdasgd"
    assert summary["learned_nothing"] is False and "learned nothing" not in result.stderr
    assert summary["epochs_completed"] == 2 and summary["steps"] == 2 * (2048 // 32)
    assert summary["samples"] == summary["steps"] * 32
    assert summary["test_accuracy"] > 0.8
    assert set(summary["staleness"]) == {"dense1", "dense2", "head"}
    for stats in summary["staleness"].values():
        assert {"mean", "p95", "max"} <= set(stats) and stats["max"] <= summary["staleness_bound"]
    assert summary["updates_per_stage"] == {"dense1": 128, "dense2": 128, "head": 128}
    assert json.loads((out / "config.json").read_text())["trainer"] == "pdasgd"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = {r["event"] for r in records}
    assert events == {"train", "eval", "staleness"}
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == list(range(5, 129, 5))
    assert all("queue_depth" in r for r in train_records)
    # The memory series: a resident size at every logged step, and each epoch's largest beside its evaluation.
    assert all(r["rss_mb"] > 50 for r in train_records)
    epochs = [r for r in records if r["event"] == "eval"]
    assert all(r["epoch_peak_rss_mb"] >= r["rss_mb"] > 50 for r in epochs)
    assert [r["epoch"] for r in records if r["event"] == "eval"] == [0, 1]
    lines = (out / "updates.csv").read_text().splitlines()
    assert lines[0].startswith("stage,version_read,version_commit,staleness") and len(lines) == 1 + 3 * 128


def test_a_run_that_learns_nothing_finishes_with_a_warning(tmp_path):
    """A run that ends no better than a guess with a finite loss (here: a rate too small to move the
    weights; measured: 8.4% and training loss 2.51 for 10 classes) completes, says so on stderr and in
    summary.json (exit 0: it is a result, not an error)."""
    out = tmp_path / "still"
    result = cli("train", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--epochs", "1",
                 "--lr", "1e-9", "--seed", "0", "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["learned_nothing"] is True
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: the run learned nothing")]
    assert len(warning) == 1 and "try first --lr 5e-10 (half)" in warning[0]


def test_learned_nothing_is_chance_accuracy_with_a_uniform_guess_loss():
    import math

    from asyncsgd.outputs import learned_nothing
    assert learned_nothing(0.10, math.log(10), 10) and learned_nothing(0.12, 0.95 * math.log(10), 10)
    assert not learned_nothing(0.13, math.log(10), 10)  # 3 points above chance
    assert not learned_nothing(0.10, 0.9 * math.log(10), 10)  # the loss moved
    assert learned_nothing(0.51, math.log(2), 2) and not learned_nothing(0.53, math.log(2), 2)
    assert not learned_nothing(None, math.log(10), 10) and not learned_nothing(0.1, float("nan"), 10)


@pytest.mark.parametrize("args, fragment", [
    (("--backward-threads", "0"), "--backward-threads must be >= 1"),
    (("--forward-threads", "-2"), "--forward-threads must be >= 1"),
    (("--max-inflight", "-1"), "--max-inflight"),
    (("--lr", "-0.1"), "--lr must be a finite number > 0"),
    (("--lr", "nan"), "--lr must be a finite number > 0"),
    (("--trainer", "nope"), "invalid choice: 'nope'"),
    (("--batch-size", "100000"), "larger than the training set"),
    (("--epochs", "zero"), "invalid int value"),
    (("--dc-lambda", "nan"), "--dc-lambda must be a finite number >= 0"),
])
def test_bad_values_give_one_line_and_exit_2(tmp_path, args, fragment):
    result = cli(*quick(tmp_path / "run", *args))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncsgd: error:") and fragment in lines[0], result.stderr


def test_finished_run_is_not_overwritten_without_flag(tmp_path):
    out = tmp_path / "run"
    assert cli(*quick(out, "--max-steps", "3")).returncode == 0
    before = (out / "summary.json").read_text()
    result = cli(*quick(out, "--max-steps", "5"))
    assert result.returncode == 2 and "already holds a finished run" in result.stderr
    assert (out / "summary.json").read_text() == before
    assert cli(*quick(out, "--max-steps", "5", "--overwrite")).returncode == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


def test_missing_dataset_offline_is_one_clear_line(tmp_path):
    result = cli("train", "--dataset", "mnist", "--model", "mlp", "--no-progress", "--out", str(tmp_path / "r"),
                 env={"ASYNCSGD_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"), "ASYNCSGD_DATA": ""})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ossci-datasets" in lines[0] and str(tmp_path / "cache") in lines[0]


@pytest.mark.parametrize("trainer, signum", [("pdasgd", signal.SIGINT), ("sync", signal.SIGINT),
                                             ("pdasgd", signal.SIGTERM)])
def test_ctrl_c_stops_within_5s_writes_outputs_and_exits_130(tmp_path, trainer, signum):
    out = tmp_path / "run"
    proc, took_s = interrupt_run(quick(out, "--trainer", trainer, "--epochs", "500", "--log-every", "1"), out, signum,
                                 train_records=3)
    assert took_s < 5
    assert proc.returncode == 130, proc.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= 3
    # An interrupted run is not "finished": the same --out may be reused without --overwrite.
    assert cli(*quick(out, "--max-steps", "2")).returncode == 0


def test_resnet18_on_a_generated_cifar10_archive_end_to_end(tmp_path):
    import numpy as np

    from asyncsgd.data import write_cifar_archive
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 40)
    test = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 12)
    write_cifar_archive(str(tmp_path / "cifar-10-python.tar.gz"), "cifar10", train, test)
    out = tmp_path / "run"
    result = cli("train", "--model", "resnet18", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                 "--trainer", "pdasgd", "--batch-size", "8", "--max-steps", "3", "--no-progress", "--out", str(out),
                 env={"ASYNCSGD_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=170)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 3 and summary["model"] == "resnet18"
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["max_trace_count"] == 1
    assert set(summary["updates_per_stage"].values()) == {3}
    # Batch norm: every stage but the head took one statistics step per forward pass.
    assert summary["state_updates_per_stage"] == {name: 3 for name in summary["updates_per_stage"] if name != "head"}


def test_cifar_offline_and_absent_is_one_clear_line(tmp_path):
    result = cli("train", "--model", "resnet18", "--dataset", "cifar10", "--no-progress", "--out", str(tmp_path / "r"),
                 env={"ASYNCSGD_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"), "ASYNCSGD_DATA": ""})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cs.toronto.edu" in lines[0] and str(tmp_path / "cache") in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (("--model", "lstm", "--dataset", "fashion_mnist"), "the lstm needs a text dataset"),
    (("--model", "resnet18", "--dataset", "imdb"), "imdb is text; use --model lstm"),
    (("--model", "resnet18", "--norm", "layer"), "invalid choice: 'layer'"),
    (("--vocab-size", "2"), "--vocab-size must be >= 3"),
])
def test_model_and_dataset_mismatches_are_one_line_errors(tmp_path, args, fragment):
    result = cli("train", "--no-progress", "--out", str(tmp_path / "r"), *args)
    assert result.returncode == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_non_finite_loss_stops_the_run_naming_step_and_stages(tmp_path):
    out = tmp_path / "run"
    result = cli(*quick(out, "--trainer", "pdasgd", "--lr", "1e30"))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite training loss" in lines[0], result.stderr
    assert "stages with non-finite parameters: dense1" in lines[0] and "try first --lr 5e+29 (half)" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["step"] == summary["steps"] + 1
    assert summary["steps"] < 2 * (2048 // 32)  # stopped early, not run to the end on NaN


def test_compare_keeps_going_past_a_diverged_trainer(tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--epochs", "1",
                 "--trainers", "hogwild,sync", "--lr", "1e30", "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["trainer"] for r in rows] == ["hogwild", "sync"] and {r["status"] for r in rows} == {"diverged"}
    assert (out / "comparison.md").read_text().count("diverged at step") == 2


def test_config_to_argv_round_trips_every_field(tmp_path):
    import dataclasses

    from asyncsgd.cli import _config_from, build_parser, config_to_argv
    from asyncsgd.config import TrainConfig
    changed = TrainConfig(
        trainer="lppsgd", model="resnet18", dataset="mnist", epochs=3, max_steps=7, batch_size=12, optimizer="adam", lr=0.3,
        momentum=0.5, nesterov=True, weight_decay=1e-4, schedule="cosine", warmup_steps=4, seed=9, data_dir="/d",
        out=str(tmp_path), train_subset=100, augment=False, cifar100_labels="coarse", vocab_size=99, min_count=3,
        max_len=17, norm="group", forward_threads=2, backward_threads=3, max_inflight=2, workers=3,
        residuals="recompute", conv_threads=1, devices=2, window="device", delay="exp:mean=0.5", averaging_period=3,
        averaging_warmup=5, target_accuracy=0.5, stop_at_target=False, eval_every_steps=11, stage_sync=False,
        checkpoint_every="30s", keep_checkpoints=3, eval_every=2, log_every=3, eval_batch_size=77, watchdog_s=9.0,
        progress=False, overwrite=True, clock="simulated", profile="h100", sim_tie_seed=5, placement="split",
            staleness_correction="dc,scale", dc_lambda=0.1, backend="ray", ray_address="auto")
    untouched = {f.name for f in dataclasses.fields(TrainConfig)
                 if getattr(changed, f.name) == getattr(TrainConfig(), f.name)}
    assert not untouched, f"give these fields non-default values: {untouched}"
    args = build_parser().parse_args(config_to_argv(changed))
    assert _config_from(args) == changed
