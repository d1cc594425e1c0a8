"""Staged models by name."""

from __future__ import annotations

import functools

from asyncsgd.models.cnn import cnn
from asyncsgd.models.lstm import lstm
from asyncsgd.models.mlp import mlp
from asyncsgd.models.resnet import NORMS, resnet
from asyncsgd.models.staged import BN_MOMENTUM, Stage, StagedModel, cross_entropy

_REGISTRY = {"mlp": mlp, "cnn": cnn, "lstm": lstm,
             **{name: functools.partial(resnet, name) for name in ("resnet18", "resnet34", "resnet50")}}
MODEL_NAMES = tuple(_REGISTRY)


def get_model(name: str, input_shape=(28, 28, 1), num_classes: int = 10, norm: str = "batch",
              vocab_size: int = 0) -> StagedModel:
    """Builds the staged model `name` for inputs of `input_shape` and `num_classes` classes.

    Args:
      norm: normalisation of the ResNets ("batch" or "group"); the other models have none.
      vocab_size: vocabulary of the `lstm` (tokens); required for it.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}")
    if name == "lstm":
        if vocab_size < 2:
            raise ValueError("the lstm model needs a token dataset (imdb or synthetic_text), not images")
        return lstm(input_shape=input_shape, num_classes=num_classes, vocab_size=vocab_size)
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} takes images (H, W, C), not inputs of shape {tuple(input_shape)}")
    if name.startswith("resnet"):
        return _REGISTRY[name](input_shape=input_shape, num_classes=num_classes, norm=norm)
    return _REGISTRY[name](input_shape=input_shape, num_classes=num_classes)


__all__ = ["BN_MOMENTUM", "MODEL_NAMES", "NORMS", "Stage", "StagedModel", "cross_entropy", "get_model",
           "lstm", "mlp", "cnn", "resnet"]
