"""Configuration validation and the learning-rate schedule."""

import dataclasses

import numpy as np
import pytest

from asyncsgd.config import ConfigError, TrainConfig, validate
from asyncsgd.optim import learning_rate_schedule


@pytest.mark.parametrize("field, value, fragment", [
    ("trainer", "bogus", "--trainer: unknown value 'bogus'"),
    ("epochs", 0, "--epochs must be >= 1"),
    ("lr", 0.0, "--lr must be a finite number > 0"),
    ("momentum", 1.0, "--momentum must be in [0, 1)"),
    ("warmup_steps", -1, "--warmup-steps must be >= 0"),
    ("max_inflight", -3, "--max-inflight"),
    ("workers", 0, "--workers must be in [1, 64]"),
    ("residuals", "both", "--residuals: unknown value"),
])
def test_invalid_values_name_the_flag(field, value, fragment):
    with pytest.raises(ConfigError) as info:
        validate(dataclasses.replace(TrainConfig(), **{field: value}))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_defaults_are_valid():
    assert validate(TrainConfig()) == TrainConfig()


def test_warmup_then_cosine_schedule():
    config = TrainConfig(lr=0.1, warmup_steps=10, schedule="cosine")
    schedule = learning_rate_schedule(config, total_steps=110)
    values = np.array([float(schedule(step)) for step in (0, 5, 10, 60, 110)])
    np.testing.assert_allclose(values, [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-6)


def test_constant_schedule_without_warmup():
    schedule = learning_rate_schedule(TrainConfig(lr=0.03), total_steps=100)
    assert float(schedule(0)) == pytest.approx(0.03) and float(schedule(99)) == pytest.approx(0.03)
