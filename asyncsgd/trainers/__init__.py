"""Trainers: schedules of workers over the shared units and store (the only place threads start)."""

from __future__ import annotations

from typing import Optional

from asyncsgd.trainers import ddp, hogwild, lapsgd, layerwise, pdasgd, sync
from asyncsgd.trainers.session import EpochPlan, Session, TrainerFn

TRAINERS: dict[str, TrainerFn] = {
    "sync": sync.run_epoch,
    "layerwise": layerwise.run_epoch,
    "pdasgd": pdasgd.run_pdasgd,
    "dasgd": pdasgd.run_dasgd,
    "hogwild": hogwild.run_epoch,
    "ddp": ddp.run_epoch,
    "lapsgd": lapsgd.run_lapsgd,
    "lppsgd": lapsgd.run_lppsgd,
}

# The compiled units each trainer calls (see `Units.warmup`): only these are compiled for a run.
UNITS_NEEDED: dict[str, tuple[str, ...]] = {
    "sync": ("train_step",),
    "layerwise": ("stages",),
    "pdasgd": ("stages",),
    "dasgd": ("stages_split",),
    "hogwild": ("model_grad",),
    "ddp": ("ddp_step",),
    "lapsgd": ("model_grad", "update", "averaging"),
    "lppsgd": ("model_grad", "update", "averaging", "partial_grad"),
}


def units_needed(trainer: str, devices: int = 1) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The unit groups to compile `(on every device, on the home device only)` for a run."""
    every = UNITS_NEEDED[trainer]
    if devices > 1 and trainer in ("pdasgd", "dasgd"):
        # Other devices run forward and backward units; their gradients are applied at home.
        return ("stages_split",), (every[0], "update")
    if trainer == "ddp":
        return (), every
    return every, ()


def get_trainer(name: str) -> TrainerFn:
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; choose one of {', '.join(TRAINERS)}")
    return TRAINERS[name]


def staleness_bound(trainer: str, max_inflight: int, workers: int, devices: int = 1,
                    window: str = "global") -> Optional[int]:
    """The largest staleness a trainer's window allows (0 for the synchronous trainers; for lapsgd and
    lppsgd, in gradient updates to one device's copy). None: no bound (several devices sharing one
    store with per-device windows: a slow item's staleness grows with how far the others get)."""
    scope_devices = devices if window == "global" else 1
    if trainer in ("lapsgd", "lppsgd"):
        return 2 * (hogwild.window_size(workers, max_inflight, scope_devices) - 1)
    if devices > 1 and window == "device" and trainer in ("pdasgd", "dasgd", "hogwild"):
        return None
    if trainer in ("pdasgd", "dasgd"):
        return pdasgd.staleness_bound(max_inflight, devices)
    if trainer == "hogwild":
        return 2 * (hogwild.window_size(workers, max_inflight, devices) - 1)
    return 0


__all__ = ["EpochPlan", "Session", "TRAINERS", "UNITS_NEEDED", "get_trainer", "staleness_bound", "units_needed"]
