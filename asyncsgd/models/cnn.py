"""A small residual CNN for 28x28 inputs: a stem, three residual blocks (32/64/128 channels), a head.

Each block is one stage. Convolutions use `asyncsgd.models.conv.Conv`, whose weight gradient avoids
XLA's slow CPU path (see that module). There is no normalisation layer (batch-norm state under asynchrony is its own
design question, see issue 5); instead the last convolution of each residual branch starts small so
the blocks start close to the identity and train stably without it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from asyncsgd.models.conv import Conv
from asyncsgd.models.staged import Stage, StagedModel

_he = nn.initializers.he_normal()
_small = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")


class Stem(nn.Module):
    features: int = 32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        return nn.relu(Conv(self.features, (3, 3), kernel_init=_he)(x_BxHxWxC))


class ResidualBlock(nn.Module):
    """conv3x3 - relu - conv3x3 plus a shortcut (1x1 projection when the shape changes), then relu."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        strides = (self.stride, self.stride)
        y = nn.relu(Conv(self.features, (3, 3), strides=strides, kernel_init=_he)(x_BxHxWxC))
        y = Conv(self.features, (3, 3), kernel_init=_small)(y)
        shortcut = x_BxHxWxC
        if self.stride != 1 or x_BxHxWxC.shape[-1] != self.features:
            shortcut = Conv(self.features, (1, 1), strides=strides, use_bias=False,
                               kernel_init=_he)(x_BxHxWxC)
        return nn.relu(y + shortcut)


class PoolHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(jnp.mean(x_BxHxWxC, axis=(1, 2)))


def cnn(input_shape=(28, 28, 1), num_classes: int = 10, widths=(32, 64, 128)) -> StagedModel:
    """Stages `stem`, `block1` (stride 1), `block2`, `block3` (stride 2 each), `head`."""
    stages = [Stage("stem", Stem(widths[0]))]
    for i, width in enumerate(widths):
        stages.append(Stage(f"block{i + 1}", ResidualBlock(width, stride=1 if i == 0 else 2)))
    stages.append(Stage("head", PoolHead(num_classes)))
    return StagedModel("cnn", tuple(stages), tuple(input_shape), num_classes)
