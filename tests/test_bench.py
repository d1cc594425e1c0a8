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


def test_bench_records_each_trainers_convolution_threads():
    # The whole-pass trainers' rule (`trainers.conv_threads`) or the flag given, per row and in the table.
    from asyncsgd import trainers
    base = TrainConfig(model="cnn", dataset="synthetic", batch_size=8, progress=False)
    result = bench(base, ["sync", "hogwild"], steps=1, rounds=1)
    rows = {row["trainer"]: row for row in result["rows"]}
    hogwild = trainers.conv_threads(TrainConfig(trainer="hogwild"))
    assert rows["sync"]["conv_threads"] == 0 and rows["hogwild"]["conv_threads"] == hogwild
    assert f"| hogwild |  | {hogwild or 'all'} |" in format_bench(result)
    given = bench(TrainConfig(model="cnn", dataset="synthetic", batch_size=8, progress=False, conv_threads=3),
                  ["hogwild"], steps=1, rounds=1)
    assert given["rows"][0]["conv_threads"] == 3


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


def test_bench_memory_runs_both_residual_modes_and_tracks_rss(tmp_path):
    base = TrainConfig(model="mlp", dataset="synthetic", batch_size=32, progress=False)
    result = bench(base, ["sync", "pdasgd"], steps=3, rounds=2, memory=True, out=str(tmp_path))
    keys = [(row["trainer"], row["residuals"]) for row in result["rows"]]
    assert keys == [("sync", ""), ("pdasgd", "stash"), ("pdasgd", "recompute")]
    for row in result["rows"]:
        assert len(row["rss_mb_rounds"]) == 2 and all(rss > 0 for rss in row["rss_mb_rounds"])
        assert row["rss_growth_mb"] == row["rss_mb_rounds"][1] - row["rss_mb_rounds"][0]
    stash, recompute = result["rows"][1:]
    assert stash["residual_mb_per_item"] > recompute["residual_mb_per_item"] > 0  # stash keeps more


def test_unit_times_carry_flops_and_mfu(tmp_path):
    base = TrainConfig(model="mlp", dataset="synthetic", batch_size=32, progress=False)
    result = bench(base, ["sync"], steps=2, rounds=1, with_units=True)
    by_stage = {row["stage"]: row for row in result["units"]}
    # dense1 forward: 2 FLOPs per weight per example (XLA also counts the bias add and the ReLU)
    assert 2 * 32 * 784 * 512 <= by_stage["dense1"]["forward_flops"] < 1.01 * 2 * 32 * 784 * 512
    for row in result["units"]:
        for kind in ("forward", "backward_update"):
            if row[f"{kind}_s"] == row[f"{kind}_s"]:  # the whole-step row has no forward time
                assert row[f"{kind}_flops_per_s"] == row[f"{kind}_flops"] / row[f"{kind}_s"]
                assert row[f"{kind}_mfu"] == row[f"{kind}_flops_per_s"] / result["peak_flops"]
    assert "GFLOP/s (MFU)" in format_bench(result)


def test_torch_peer_runs_in_the_same_rounds():
    pytest.importorskip("torch", reason="the PyTorch peer needs the [peer] extra (pip install -e '.[peer]')")
    base = TrainConfig(model="mlp", dataset="synthetic", batch_size=32, progress=False)
    result = bench(base, ["sync"], steps=3, rounds=2, peer="torch")
    sync, peer = result["rows"]
    assert peer["trainer"] == "torch (peer)" and len(peer["samples_per_s_rounds"]) == 2
    assert peer["ratio_to_peer"] == 1.0 and sync["ratio_to_peer"] == sync["samples_per_s"] / peer["samples_per_s"]
    assert result["peer"]["framework"] == "torch" and "peer: torch" in format_bench(result)


@pytest.mark.parametrize("model, shape", [("mlp", (28, 28, 1)), ("cnn", (28, 28, 1)), ("resnet18", (32, 32, 3))])
def test_torch_peer_is_the_same_model(model, shape):
    torch = pytest.importorskip("torch", reason="the PyTorch peer needs the [peer] extra")
    import jax
    import numpy as np
    from asyncsgd.models import get_model
    from asyncsgd.peer import _build
    params, _ = get_model(model, input_shape=shape, num_classes=10).init(jax.random.PRNGKey(0))
    ours = sorted(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    theirs = sorted(p.numel() for p in _build(model, shape, 10).parameters())
    assert ours == theirs  # the same layers: every weight, bias and norm parameter, size for size
    assert torch.get_num_threads() >= 1


def test_peer_without_torch_is_a_one_line_error(monkeypatch, capfd):
    import sys
    from asyncsgd.cli import main
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as without the extra
    assert main(["bench", "--model", "mlp", "--dataset", "synthetic", "--trainers", "sync", "--peer", "torch"]) == 2
    assert "--peer torch needs PyTorch: pip install -e '.[peer]'" in capfd.readouterr().err
    monkeypatch.delitem(sys.modules, "torch")
    assert main(["bench", "--model", "lstm", "--dataset", "synthetic_text", "--trainers", "sync", "--peer",
                 "torch"]) == 2
    assert "--peer torch mirrors the models mlp, cnn, resnet18, not 'lstm'" in capfd.readouterr().err
