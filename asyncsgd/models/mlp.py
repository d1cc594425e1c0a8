"""A Fashion-MNIST sized multi-layer perceptron, one stage per dense layer."""

from __future__ import annotations

import flax.linen as nn
import jax

from asyncsgd.models.staged import Stage, StagedModel


class Dense(nn.Module):
    """Flatten (if needed), dense layer, optional ReLU."""

    features: int
    relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.features)(x)
        return nn.relu(x) if self.relu else x


def mlp(input_shape=(28, 28, 1), num_classes: int = 10, hidden=(512, 256)) -> StagedModel:
    """784-512-256-10 by default: stages `dense1`, `dense2`, `head`."""
    stages = [Stage(f"dense{i + 1}", Dense(width)) for i, width in enumerate(hidden)]
    stages.append(Stage("head", Dense(num_classes, relu=False)))
    return StagedModel("mlp", tuple(stages), tuple(input_shape), num_classes)
