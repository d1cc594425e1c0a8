"""The optimiser: one optax transformation, applied independently to each stage.

Every trainer uses the same per-stage transformation, so a stage's optimiser state (momentum, Adam
moments, schedule step count) lives in that stage's store slot and advances once per committed update.
All supported rules are element-wise, so applying them per stage is the same math as applying them to
the whole model; that is what makes `layerwise` equal to `sync`.
"""

from __future__ import annotations

import optax

from asyncsgd.config import TrainConfig


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Constant, or cosine decay to zero over `total_steps` updates of a stage."""
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, decay_steps=max(total_steps, 1))
    return optax.constant_schedule(config.lr)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD (with optional momentum / Nesterov) or Adam, with decoupled-from-loss L2 weight decay."""
    schedule = learning_rate_schedule(config, total_steps)
    if config.optimizer == "adam":
        rule = optax.adam(schedule)
    else:
        rule = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
    if config.weight_decay > 0:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), rule)
    return rule
