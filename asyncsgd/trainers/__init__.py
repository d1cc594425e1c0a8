"""Trainers: schedules of workers over the shared units and store (the only place threads start).

This module is the registry: one `TrainerSpec` per trainer, collected from the trainer modules. The
rest of the program (configuration, CLI, run loop, checkpoints, summary) asks the registry and names
no trainer. Adding a trainer: write `asyncsgd/trainers/<name>.py` with its epoch function and a
`SPEC = TrainerSpec(...)`, then add it to `_BUILT_IN` below (see README, "Adding a trainer");
`register(spec)` adds one at run time (a research prototype, a test).
"""

from __future__ import annotations

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


__all__ = ["Epoch", "EpochPlan", "EpochResult", "Prepared", "Session", "TRAINERS", "TrainerSpec", "check",
           "default_comparison", "fixed_units", "get", "multi_device_names", "names", "register", "unregister"]
