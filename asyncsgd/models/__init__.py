"""Staged models by name."""

from __future__ import annotations

from asyncsgd.models.cnn import cnn
from asyncsgd.models.mlp import mlp
from asyncsgd.models.staged import Stage, StagedModel, cross_entropy

_REGISTRY = {"mlp": mlp, "cnn": cnn}


def get_model(name: str, input_shape=(28, 28, 1), num_classes: int = 10) -> StagedModel:
    """Builds the staged model `name` for inputs of `input_shape` and `num_classes` classes."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](input_shape=input_shape, num_classes=num_classes)


__all__ = ["Stage", "StagedModel", "cross_entropy", "get_model", "mlp", "cnn"]
