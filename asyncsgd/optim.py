"""The optimiser: one optax transformation, applied independently to each stage.

Every trainer uses the same per-stage transformation, so a stage's optimiser state (momentum, Adam
moments, schedule step count) lives in that stage's store slot and advances once per committed update.
All supported rules are element-wise, so applying them per stage is the same math as applying them to
the whole model; that is what makes `layerwise` equal to `sync`.

The transformation always takes two extra arguments (`staleness`, `params_read`: see
`asyncsgd/staleness.py`); only a staleness correction reads them.
"""

from __future__ import annotations

import optax

from asyncsgd import trainers
from asyncsgd.config import TrainConfig
from asyncsgd.staleness import (ADAM_B1, delay_compensation, parse_corrections, scale_by_staleness, staleness_adam,
                                staleness_momentum, weight_prediction)


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up over `warmup_steps` updates of a stage (unset: the trainer's default,
    `trainers.default_warmup_steps`, resolved here, where the value is used; `train()` resolves it
    first only so that config.json records it), then constant or cosine decay to zero.

    Warm-up matters for the asynchronous trainers: the first `max_inflight + 1` items all read the
    initial parameters, so their (large, early) gradients land with staleness at once, and momentum
    compounds them (D-ASGD diverged on Fashion-MNIST at lr 0.05, momentum 0.9 without it).
    """
    warmup = min(trainers.resolve_defaults(config).warmup_steps, max(total_steps - 1, 0))
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, decay_steps=max(total_steps - warmup, 1))
    else:
        main = optax.constant_schedule(config.lr)
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(0.0, config.lr, transition_steps=warmup)
    return optax.join_schedules([ramp, main], boundaries=[warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """SGD (with optional momentum / Nesterov) or Adam, with decoupled-from-loss L2 weight decay and
    the run's staleness correction.

    Order: delay compensation acts on the raw gradient (it corrects the gradient itself), weight
    decay is added, `scale` divides the whole step's direction, then the rule; `momentum` replaces
    the rule's momentum with the staleness-adapted one; `predict` comes last, where the update is
    final (it changes none, and keeps the parameters forward passes should read). With `none` the
    state is the rule's own, as before corrections existed (old checkpoints load).
    """
    schedule = learning_rate_schedule(config, total_steps)
    correction = parse_corrections(config.staleness_correction)
    if config.optimizer == "adam" and "momentum" in correction:
        rule = optax.chain(staleness_adam(ADAM_B1), optax.scale_by_learning_rate(schedule))
    elif config.optimizer == "adam":
        rule = optax.adam(schedule, b1=ADAM_B1)
    elif "momentum" in correction:
        rule = optax.chain(staleness_momentum(config.momentum, config.nesterov),
                           optax.scale_by_learning_rate(schedule))
    else:
        rule = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
    parts = []
    if "dc" in correction:
        parts.append(delay_compensation(config.dc_lambda))
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    if "scale" in correction:
        parts.append(scale_by_staleness())
    after = [weight_prediction()] if "predict" in correction else []  # sees the final update
    if not parts and not after:
        return optax.with_extra_args_support(rule)
    return optax.chain(*parts, rule, *after)
