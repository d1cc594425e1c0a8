"""A staged model: an ordered list of named, pure-functional Flax stages plus a loss.

A stage is the unit of compilation and of update (DESIGN.md). Stages never hold state of their own:
`Stage.apply(params, x)` is a pure function, so the same stage can be jit-compiled as a forward unit,
differentiated per stage, or chained into a whole-model function for the synchronous reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any


@dataclasses.dataclass(frozen=True)
class Stage:
    """One named layer or block of a model."""

    name: str
    module: nn.Module

    def init(self, rng: jax.Array, x: jax.Array) -> Params:
        return self.module.init(rng, x)["params"]

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, x)


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()


@dataclasses.dataclass(frozen=True)
class StagedModel:
    """An ordered tuple of stages; the last one produces class logits.

    Attributes:
      name: registry name of the model.
      stages: the stages, input to output.
      input_shape: shape of one example (no batch dimension), e.g. (28, 28, 1).
      num_classes: number of output classes.
    """

    name: str
    stages: tuple[Stage, ...]
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def init(self, rng: jax.Array, batch_size: int = 1) -> list[Params]:
        """Initialises every stage by running a dummy batch through the stages in order.

        Returns:
          A list with one parameter pytree per stage.
        """
        x = jnp.zeros((batch_size, *self.input_shape), jnp.float32)
        params = []
        for stage, stage_rng in zip(self.stages, jax.random.split(rng, len(self.stages))):
            stage_params = stage.init(stage_rng, x)
            params.append(stage_params)
            x = stage.apply(stage_params, x)
        return params

    def apply(self, params: Sequence[Params], x: jax.Array) -> jax.Array:
        """The whole model as one function: logits for a batch."""
        for stage, stage_params in zip(self.stages, params):
            x = stage.apply(stage_params, x)
        return x

    def loss(self, params: Sequence[Params], x: jax.Array, labels: jax.Array) -> jax.Array:
        return cross_entropy(self.apply(params, x), labels)
