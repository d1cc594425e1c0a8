"""The experiments' harness: runs over seeds, aggregation, tables, results files and plots."""

import json
import os

import pytest

from asyncsgd.config import TrainConfig
from asyncsgd.sweep import Arm, aggregate, experiment_parser, finish, format_table, run_arms

pytestmark = pytest.mark.timeout(300)


def test_arms_over_seeds_aggregate_into_one_line_each(tmp_path, tiny_data):
    base = TrainConfig(model="mlp", dataset="synthetic", batch_size=32, lr=0.02, epochs=2, progress=False)
    arms = [Arm("sync", TrainConfig(**{**base.to_dict(), "trainer": "sync"}), {"kind": "reference"}),
            Arm("pdasgd 1:2", TrainConfig(**{**base.to_dict(), "trainer": "pdasgd"}), {"kind": "async"})]
    rows = run_arms(arms, 2, str(tmp_path / "out"), dataset=tiny_data)
    assert [(r["label"], r["seed"]) for r in rows] == [("sync", 0), ("sync", 1), ("pdasgd 1:2", 0), ("pdasgd 1:2", 1)]
    assert len({r["out"] for r in rows}) == 4 and all(os.path.exists(r["out"]) for r in rows)
    lines = aggregate(rows)
    assert [line["label"] for line in lines] == ["sync", "pdasgd 1:2"]
    for line in lines:
        runs = [r for r in rows if r["label"] == line["label"]]
        accuracies = [r["test_accuracy"] for r in runs]
        assert line["seeds"] == 2 and min(accuracies) <= line["test_accuracy"] <= max(accuracies)
        assert line["test_accuracy_spread"] == pytest.approx((max(accuracies) - min(accuracies)) / 2)
        assert len(line["epoch_accuracy"]) == 2  # one evaluation per epoch
        assert line["epoch_accuracy"][-1] == pytest.approx(line["test_accuracy"])
        assert line["kind"] == runs[0]["kind"]
    assert lines[0]["staleness_max"] == 0 and lines[1]["staleness_max"] > 0
    table = format_table(lines, ["kind"])
    assert table.splitlines()[0].startswith("| arm | kind | final test acc | acc e1 | acc e2 |")
    assert "| pdasgd 1:2 | async |" in table


def test_finish_writes_results_and_plots(tmp_path, tiny_data):
    args = experiment_parser("doc", "x").parse_args(["--seeds", "1", "--out", str(tmp_path / "x")])
    base = TrainConfig(model="mlp", dataset="synthetic", batch_size=32, progress=False, target_accuracy=0.5,
                       stop_at_target=False)
    rows = run_arms([Arm("hogwild", TrainConfig(**{**base.to_dict(), "trainer": "hogwild"}))], 1, args.out,
                    dataset=tiny_data)
    table = finish(args, rows, "title", target=0.5, extra=lambda lines: "EXTRA SECTION")
    assert "time to target s" in table and table.rstrip().endswith("EXTRA SECTION")
    saved = json.loads((tmp_path / "x" / "results.json").read_text())
    assert saved["lines"][0]["label"] == "hogwild" and len(saved["runs"]) == 1
    for name in ("results.md", "accuracy_vs_time.png", "accuracy_vs_steps.png", "staleness.png"):
        assert (tmp_path / "x" / name).stat().st_size > 0
    # Not stopped at the target: the run went to its end and still recorded when it got there.
    assert rows[0]["time_to_target_s"] is not None and rows[0]["steps"] == rows[0]["config"]["epochs"] * (
        len(tiny_data.train_y) // 32)


def test_isolated_runs_get_their_own_process(tmp_path):
    config = TrainConfig(trainer="pdasgd", model="mlp", dataset="synthetic", batch_size=32, max_steps=5,
                         progress=False, residuals="recompute")
    rows = run_arms([Arm("alone", config)], 1, str(tmp_path), isolate=True)
    row = rows[0]
    assert row["status"] == "complete" and row["steps"] == 5 and row["isolated"]
    assert row["config"]["residuals"] == "recompute"  # the flags reproduced the configuration
    assert aggregate(rows)[0]["peak_rss_mb"] == row["peak_rss_mb"]
