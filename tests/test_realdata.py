"""Real Fashion-MNIST: the synchronous reference and PD-ASGD learn within a few hundred steps."""

import pytest
from conftest import has_fashion_mnist

from asyncsgd.config import TrainConfig
from asyncsgd.run import train

pytestmark = [pytest.mark.realdata, pytest.mark.timeout(300),
              pytest.mark.skipif(not has_fashion_mnist(), reason="Fashion-MNIST not installed")]


@pytest.fixture(scope="module")
def fashion():
    from asyncsgd.data import load_dataset
    return load_dataset("fashion_mnist", download=False)


@pytest.mark.parametrize("trainer", ["sync", "pdasgd"])
def test_learns_fashion_mnist_in_300_steps(tmp_path, fashion, trainer):
    config = TrainConfig(trainer=trainer, model="mlp", dataset="fashion_mnist", epochs=1, max_steps=300,
                         batch_size=128, lr=0.02, progress=False, out=str(tmp_path / trainer))
    summary = train(config, fashion)
    assert summary["steps"] == 300 and summary["status"] == "complete"
    assert summary["test_accuracy"] > 0.78, summary["test_accuracy"]  # chance is 0.10
    if trainer == "pdasgd":
        assert 0 < max(s["max"] for s in summary["staleness"].values()) <= summary["staleness_bound"]


def test_default_flags_stay_finite_on_4_devices_where_no_correction_diverges(tmp_path, fashion):
    """The issue's failure, replayed deterministically on 4 simulated devices (the schedule is a function
    of the config, so the comparison is exact): PD-ASGD with default flags trains the MLP for 200 steps,
    and the same run without a staleness correction diverges (a test that could not fail otherwise)."""
    import dataclasses

    from asyncsgd.errors import DivergedError
    config = TrainConfig(trainer="pdasgd", model="mlp", dataset="fashion_mnist", devices=4, max_steps=200,
                         clock="simulated", progress=False, out=str(tmp_path / "default"))
    assert config.staleness_correction == "scale,momentum,predict" and config.lr == 0.05
    summary = train(config, fashion)
    assert summary["status"] == "complete" and summary["steps"] == 200
    assert summary["test_accuracy"] > 0.6 and max(s["max"] for s in summary["staleness"].values()) >= 16
    with pytest.raises(DivergedError):
        train(dataclasses.replace(config, staleness_correction="none", out=str(tmp_path / "none")), fashion)
