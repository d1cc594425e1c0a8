"""ResNet-18/34/50 in their CIFAR form (He et al. 2016; 3x3 stem, no max-pool), as staged models.

Stages: `stem` (conv3x3-norm-relu), one stage per residual block (`layer{g}.{b}`: group g of
blocks, block b; ResNet-18 has 8, ResNet-34 and ResNet-50 16), and `head` (global average pool and
the classifier). A stage per block is the finest split that keeps each unit one residual function;
it gives PD-ASGD as many independently updated parts as the paper's layer-wise setting has blocks.

Normalisation (`norm`):
  batch: batch norm, as in the paper. Its running statistics are per-stage mutable state kept in
    the store beside the parameters (`StagedModel.merge_state`): each forward pass of an
    asynchronous trainer normalises with its own batch's statistics and commits its running-average
    step to the store immediately, merged into whatever is current so concurrent passes lose no
    update; evaluation uses the store's running averages. Under asynchrony the statistics a backward
    pass differentiates through are those of the batch it belongs to (they are part of the stashed
    residuals, or recomputed from the stashed input), so gradients stay consistent per item.
  group: GroupNorm (32 groups, fewer when the width does not allow): no state at all, so nothing
    about it can go stale; usually a little lower accuracy than batch norm at batch 128 (Wu & He
    2018), but identical in training and evaluation.
Convolutions use `asyncsgd.models.conv.Conv` (fast weight gradient on the CPU).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from asyncsgd.models.conv import Conv
from asyncsgd.models.staged import Stage, StagedModel, batch_norm

NORMS = ("batch", "group")
_he = nn.initializers.he_normal()


def _norm(kind: str, train: bool, features: int, zero_init: bool = False) -> nn.Module:
    """A norm layer; `zero_init` starts its scale at 0 so each residual branch starts as identity."""
    if kind == "batch":
        return batch_norm(train, scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)
    if kind == "group":
        groups = math.gcd(32, features)
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5,
                            scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


class Stem(nn.Module):
    features: int
    norm: str

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        y = Conv(self.features, (3, 3), use_bias=False, kernel_init=_he)(x_BxHxWxC)
        return nn.relu(_norm(self.norm, train, self.features)(y))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    features: int
    stride: int
    norm: str
    expansion = 1

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        strides = (self.stride, self.stride)
        y = Conv(self.features, (3, 3), strides=strides, use_bias=False, kernel_init=_he)(x_BxHxWxC)
        y = nn.relu(_norm(self.norm, train, self.features)(y))
        y = Conv(self.features, (3, 3), use_bias=False, kernel_init=_he)(y)
        y = _norm(self.norm, train, self.features, zero_init=True)(y)
        return nn.relu(y + _shortcut(x_BxHxWxC, self.features, self.stride, self.norm, train))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50)."""

    features: int
    stride: int
    norm: str
    expansion = 4

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        out = self.features * self.expansion
        y = Conv(self.features, (1, 1), use_bias=False, kernel_init=_he)(x_BxHxWxC)
        y = nn.relu(_norm(self.norm, train, self.features)(y))
        y = Conv(self.features, (3, 3), strides=(self.stride, self.stride), use_bias=False, kernel_init=_he)(y)
        y = nn.relu(_norm(self.norm, train, self.features)(y))
        y = Conv(out, (1, 1), use_bias=False, kernel_init=_he)(y)
        y = _norm(self.norm, train, out, zero_init=True)(y)
        return nn.relu(y + _shortcut(x_BxHxWxC, out, self.stride, self.norm, train))


def _shortcut(x_BxHxWxC: jax.Array, features: int, stride: int, norm: str, train: bool) -> jax.Array:
    """Identity, or a strided 1x1 projection with its norm when the shape changes."""
    if stride == 1 and x_BxHxWxC.shape[-1] == features:
        return x_BxHxWxC
    y = Conv(features, (1, 1), strides=(stride, stride), use_bias=False, kernel_init=_he,
             name="shortcut_conv")(x_BxHxWxC)
    return _norm(norm, train, features)(y)


class Head(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(jnp.mean(x_BxHxWxC, axis=(1, 2)))


_DEPTHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3))}


def resnet(name: str, input_shape=(32, 32, 3), num_classes: int = 10, norm: str = "batch",
           width: int = 64) -> StagedModel:
    """`resnet18`, `resnet34` or `resnet50` (CIFAR form); `width` is the stem's channels (64 as published)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    block, depths = _DEPTHS[name]
    stages = [Stage("stem", Stem(width, norm))]
    for group, count in enumerate(depths):
        features = width * 2 ** group
        for index in range(count):
            stride = 2 if group > 0 and index == 0 else 1
            stages.append(Stage(f"layer{group + 1}.{index}", block(features, stride, norm)))
    stages.append(Stage("head", Head(num_classes)))
    return StagedModel(name, tuple(stages), tuple(input_shape), num_classes)
