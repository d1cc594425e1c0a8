"""A staged model: an ordered list of named, pure-functional Flax stages plus a loss.

A stage is the unit of compilation and of update (DESIGN.md). Stages never hold state of their own:
`Stage.apply(params, state, x, train)` is a pure function returning `(y, new_state)`, so the same
stage can be jit-compiled as a forward unit, differentiated per stage, or chained into a
whole-model function for the synchronous reference.

`state` is a stage's non-trained mutable state: the running statistics of its batch-norm layers
(Flax's `batch_stats` collection), `{}` for stateless stages. In training mode a batch-norm layer
normalises with the batch's statistics and returns running averages moved towards them by
`BN_MOMENTUM`; in evaluation mode it uses the running averages. How the asynchronous trainers merge
state written by concurrent forward passes is `StagedModel.merge_state` (see there).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
State = Any

BN_MOMENTUM = 0.9  # running average <- BN_MOMENTUM * running average + (1 - BN_MOMENTUM) * batch statistic


def batch_norm(train: bool, scale_init=nn.initializers.ones) -> nn.BatchNorm:
    """The one batch-norm configuration every model uses (its momentum is what `merge_state` assumes)."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5, scale_init=scale_init)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One named layer or block of a model.

    The module's `__call__(x)` may take a keyword `train: bool` (modules with batch norm do).
    """

    name: str
    module: nn.Module

    @property
    def takes_train(self) -> bool:
        return "train" in inspect.signature(type(self.module).__call__).parameters

    def _kwargs(self, train: bool) -> dict:
        return {"train": train} if self.takes_train else {}

    def init(self, rng: jax.Array, x: jax.Array) -> tuple[Params, State]:
        variables = self.module.init(rng, x, **self._kwargs(False))
        return variables["params"], variables.get("batch_stats", {})

    def apply(self, params: Params, state: State, x: jax.Array, train: bool) -> tuple[jax.Array, State]:
        """`(y, new_state)`; `new_state is state` unless training a stage with batch norm."""
        variables = {"params": params, **({"batch_stats": state} if state else {})}
        if train and state:
            y, mutated = self.module.apply(variables, x, mutable=["batch_stats"], **self._kwargs(True))
            return y, mutated["batch_stats"]
        return self.module.apply(variables, x, **self._kwargs(train)), state


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()


@dataclasses.dataclass(frozen=True)
class StagedModel:
    """An ordered tuple of stages; the last one produces class logits.

    Attributes:
      name: registry name of the model.
      stages: the stages, input to output.
      input_shape: shape of one example (no batch dimension), e.g. (28, 28, 1) or (max_len,).
      num_classes: number of output classes.
      input_dtype: dtype of the inputs (float32 images, int32 token ids).
    """

    name: str
    stages: tuple[Stage, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    input_dtype: Any = jnp.float32

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def dummy_input(self, batch_size: int) -> jax.Array:
        return jnp.zeros((batch_size, *self.input_shape), self.input_dtype)

    def init(self, rng: jax.Array, batch_size: int = 2) -> tuple[list[Params], list[State]]:
        """Initialises every stage by running a dummy batch through the stages in order.

        Returns:
          `(params, states)`: one parameter pytree and one state pytree (`{}` if none) per stage.
        """
        x = self.dummy_input(batch_size)
        params, states = [], []
        for stage, stage_rng in zip(self.stages, jax.random.split(rng, len(self.stages))):
            stage_params, stage_state = stage.init(stage_rng, x)
            params.append(stage_params)
            states.append(stage_state)
            x, _ = stage.apply(stage_params, stage_state, x, train=False)
        return params, states

    def apply(self, params: Sequence[Params], states: Sequence[State], x: jax.Array,
              train: bool = False) -> tuple[jax.Array, list[State]]:
        """The whole model as one function: `(logits, new_states)` for a batch."""
        new_states = []
        for stage, stage_params, stage_state in zip(self.stages, params, states):
            x, stage_state = stage.apply(stage_params, stage_state, x, train)
            new_states.append(stage_state)
        return x, new_states

    def loss(self, params: Sequence[Params], states: Sequence[State], x: jax.Array,
             labels: jax.Array) -> tuple[jax.Array, list[State]]:
        """Training-mode loss and the new states (use with `has_aux=True`)."""
        logits, new_states = self.apply(params, states, x, train=True)
        return cross_entropy(logits, labels), new_states

    @staticmethod
    def merge_state(current: State, read: State, new: State) -> State:
        """Applies a forward pass's running-statistics update to the state that is current now.

        A forward pass read `read` and computed `new = m * read + (1 - m) * batch_stat`. Other passes
        may have moved the state to `current` meanwhile; replacing it by `new` would drop their
        updates. Instead the same step is applied to `current`:
        `m * current + (1 - m) * batch_stat = new + m * (current - read)`, so no update is lost and
        with `current is read` (one pass at a time) the result is exactly `new`.
        """
        return jax.tree_util.tree_map(lambda c, r, n: n + BN_MOMENTUM * (c - r), current, read, new)
