"""The benchmark: every trainer timed in interleaved rounds, ratios to sync, one FLOP count for all."""

import pytest

from asyncsgd.bench import bench, format_bench
from asyncsgd.config import TrainConfig

pytestmark = pytest.mark.timeout(240)


def test_bench_rows_ratios_and_table(tmp_path):
    base = TrainConfig(model="mlp", dataset="synthetic", batch_size=32, progress=False)
    result = bench(base, ["sync", "pdasgd"], steps=4, rounds=2, out=str(tmp_path))
    rows = {row["trainer"]: row for row in result["rows"]}
    assert set(rows) == {"sync", "pdasgd"}
    assert rows["sync"]["ratio_to_sync"] == 1.0
    assert rows["pdasgd"]["ratio_to_sync"] == rows["pdasgd"]["samples_per_s"] / rows["sync"]["samples_per_s"]
    assert all(len(row["samples_per_s_rounds"]) == 2 and row["max_trace_count"] == 1 for row in rows.values())
    assert rows["sync"]["staleness_max"] == 0 and rows["pdasgd"]["staleness_max"] <= 2 * base.max_inflight
    assert rows["sync"]["flops_per_step"] == rows["pdasgd"]["flops_per_step"] > 0
    assert (tmp_path / "bench.json").exists()
    assert (tmp_path / "bench.md").read_text().strip() == format_bench(result)


def test_model_table_sizes_and_times_a_model(tmp_path):
    from asyncsgd.bench import model_table
    base = TrainConfig(batch_size=16, progress=False)
    result = model_table(base, ["mlp"], repeats=1, out=str(tmp_path))
    (row,) = result["rows"]
    assert row["params"] == 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10 and row["stages"] == 3
    # A training step of the MLP: 2 FLOPs per weight forward, 2 for the weight gradient, 2 for the
    # input gradient of every layer but the first (784x512 of the 536k weights): about 2.4M per example.
    weights = row["params"]
    assert 2 * 2 * weights < row["flops_per_example"] < 2 * 3 * weights
    assert row["forward_s"] > 0 and row["backward_update_s"] > 0 and row["sync_step_s"] > 0
    assert "| mlp | 28x28x1 (fashion_mnist) | 3 | 0.54 |" in (tmp_path / "models.md").read_text()
    assert (tmp_path / "models.json").exists()
