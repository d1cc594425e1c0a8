"""An LSTM text classifier for IMDb as a staged model.

Stages: `embed` (token embedding), `lstm1` (and `lstm2` with two layers; each returns the whole
sequence of hidden states), `head` (the last time step's hidden state, then the classifier).
Inputs are int32 token ids, left-padded with the padding id 0 (`asyncsgd.data.imdb`), so the last
time step is always the end of the review; the LSTM runs through the padding at the start, which
costs a little compute and no accuracy in practice (the state it carries is learned to be ignored).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from asyncsgd.models.staged import Stage, StagedModel


class Embed(nn.Module):
    vocab_size: int
    features: int

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        return nn.Embed(self.vocab_size, self.features)(tokens_BxT)


class LSTMLayer(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return nn.RNN(nn.OptimizedLSTMCell(self.features))(x_BxTxD)


class LastStepHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(h_BxTxD[:, -1])


def lstm(input_shape=(256,), num_classes: int = 2, vocab_size: int = 20000, embed_dim: int = 128,
         hidden: int = 128, layers: int = 1) -> StagedModel:
    """`input_shape` is `(max_len,)`; `vocab_size` counts the padding and out-of-vocabulary ids."""
    if len(input_shape) != 1:
        raise ValueError(f"the lstm model takes token sequences (max_len,), not inputs of shape {tuple(input_shape)}")
    stages = [Stage("embed", Embed(vocab_size, embed_dim))]
    stages += [Stage(f"lstm{i + 1}", LSTMLayer(hidden)) for i in range(layers)]
    stages.append(Stage("head", LastStepHead(num_classes)))
    return StagedModel("lstm", tuple(stages), tuple(input_shape), num_classes, input_dtype=jnp.int32)
