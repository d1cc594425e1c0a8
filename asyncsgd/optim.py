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
    """Linear warm-up over `warmup_steps` updates of a stage, then constant or cosine decay to zero.

    Warm-up matters for the asynchronous trainers: the first `max_inflight + 1` items all read the
    initial parameters, so their (large, early) gradients land with staleness at once, and momentum
    compounds them (D-ASGD diverged on Fashion-MNIST at lr 0.05, momentum 0.9 without it).
    """
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, decay_steps=max(total_steps - warmup, 1))
    else:
        main = optax.constant_schedule(config.lr)
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(0.0, config.lr, transition_steps=warmup)
    return optax.join_schedules([ramp, main], boundaries=[warmup])


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
