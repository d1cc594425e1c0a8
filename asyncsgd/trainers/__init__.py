"""Trainers: schedules of workers over the shared units and store (the only place threads start).

This module is the registry: one `TrainerSpec` per trainer, collected from the trainer modules. The
rest of the program (configuration, CLI, run loop, checkpoints, summary) asks the registry and names
no trainer. Adding a trainer: write `asyncsgd/trainers/<name>.py` with its epoch function and a
`SPEC = TrainerSpec(...)`, then add it to `_BUILT_IN` below (see README, "Adding a trainer");
`register(spec)` adds one at run time (a research prototype, a test).
"""

from __future__ import annotations

import dataclasses

from asyncsgd.errors import ConfigError
from asyncsgd.trainers import ddp, hogwild, lapsgd, layerwise, pdasgd, sync
from asyncsgd.trainers.base import EpochPlan, EpochResult, Prepared, TrainerSpec, fixed_units
from asyncsgd.trainers.session import Epoch, Session

_BUILT_IN = (sync.SPEC, layerwise.SPEC, pdasgd.SPEC, pdasgd.DASGD_SPEC, hogwild.SPEC, ddp.SPEC, lapsgd.SPEC,
             lapsgd.LPPSGD_SPEC)

TRAINERS: dict[str, TrainerSpec] = {spec.name: spec for spec in _BUILT_IN}


def register(spec: TrainerSpec, replace: bool = False) -> TrainerSpec:
    """Adds `spec` to the registry (an existing name only with `replace`); returns it."""
    if spec.name in TRAINERS and not replace:
        raise ValueError(f"a trainer named {spec.name!r} is already registered")
    TRAINERS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes a trainer added with `register` (built-in ones stay)."""
    if any(spec.name == name for spec in _BUILT_IN):
        raise ValueError(f"{name!r} is built in")
    TRAINERS.pop(name, None)


def get(name: str) -> TrainerSpec:
    """The spec of trainer `name`; `ConfigError` naming the choices if there is none."""
    if name not in TRAINERS:
        raise ConfigError(f"--trainer: unknown value {name!r}; choose one of {', '.join(TRAINERS)}")
    return TRAINERS[name]


def names() -> tuple[str, ...]:
    return tuple(TRAINERS)


def multi_device_names() -> tuple[str, ...]:
    return tuple(name for name, spec in TRAINERS.items() if spec.multi_device)


def default_comparison() -> list[str]:
    """The trainers `compare` and `bench` run when none are named."""
    return [name for name, spec in TRAINERS.items() if spec.compared_by_default]


def check(config) -> None:
    """The trainer-specific checks of `config` (after the generic ones in `asyncsgd.config.validate`)."""
    spec = get(config.trainer)
    if config.devices > 1 and not spec.multi_device:
        raise ConfigError(f"--trainer {config.trainer} runs on one device; --devices {config.devices} needs one "
                          f"of {', '.join(multi_device_names())}")
    if config.placement not in spec.placements:
        able = [name for name, other in TRAINERS.items() if config.placement in other.placements]
        raise ConfigError(f"--placement {config.placement}: {config.trainer} runs only "
                          f"{' or '.join(spec.placements)}; {config.placement} runs {', '.join(able)}")
    spec.check(config)


# `--warmup-steps` left unset: updates of each stage warmed up per device (see `default_warmup_steps`).
WARMUP_PER_DEVICE = 25


def default_warmup_steps(config) -> int:
    """The warm-up a run gets when `--warmup-steps` is not given: 25 x N updates of each stage for a
    trainer with stale updates on one shared store (its staleness bound is not 0 and it trains no
    copies: pdasgd, dasgd, hogwild) on N > 1 devices (100 on 4), else none.

    The first window of items (N x (max-inflight + 1)) all read the initial parameters, so their large
    early gradients land together, each staler than the last; on the CNN with 4 devices D-ASGD
    diverged from that start in 2 of 5 seeds without a warm-up and in none of 5 with 100 steps (docs/usage.md,
    "How the defaults adapt to devices"). One device, the synchronous trainers (staleness 0: sync,
    layerwise, ddp stay equal to each other) and the copies trainers (LAP-SGD, LPP-SGD: stale only
    through averaging) start at the full rate, as before.
    """
    spec = get(config.trainer)
    stale = spec.staleness_bound(config) != 0 and not spec.copies
    return WARMUP_PER_DEVICE * config.devices if stale and config.devices > 1 else 0


def conv_threads(config) -> int:
    """The OpenMP threads of each oneDNN convolution while `config`'s epochs run: `--conv-threads`, else
    the trainer's rule (`TrainerSpec.conv_threads`; 0: all cores)."""
    return config.conv_threads if config.conv_threads is not None else get(config.trainer).conv_threads(config)


def resolve_defaults(config):
    """`config` with the settings left to the trainer filled in (`warmup_steps`, `conv_threads`);
    unchanged otherwise."""
    filled = {}
    if config.warmup_steps is None:
        filled["warmup_steps"] = default_warmup_steps(config)
    if config.conv_threads is None:
        filled["conv_threads"] = conv_threads(config)
    return dataclasses.replace(config, **filled) if filled else config


__all__ = ["Epoch", "EpochPlan", "EpochResult", "Prepared", "Session", "TRAINERS", "TrainerSpec", "check",
           "conv_threads", "default_comparison", "default_warmup_steps", "fixed_units", "get", "multi_device_names", "names",
           "register", "resolve_defaults", "unregister"]
