"""Trainers: schedules of workers over the shared units and store (the only place threads start)."""

from __future__ import annotations

from asyncsgd.trainers import hogwild, layerwise, pdasgd, sync
from asyncsgd.trainers.session import EpochPlan, Session, TrainerFn

TRAINERS: dict[str, TrainerFn] = {
    "sync": sync.run_epoch,
    "layerwise": layerwise.run_epoch,
    "pdasgd": pdasgd.run_pdasgd,
    "dasgd": pdasgd.run_dasgd,
    "hogwild": hogwild.run_epoch,
}

# The compiled units each trainer calls (see `Units.warmup`): only these are compiled for a run.
UNITS_NEEDED: dict[str, tuple[str, ...]] = {
    "sync": ("train_step",),
    "layerwise": ("stages",),
    "pdasgd": ("stages",),
    "dasgd": ("stages_split",),
    "hogwild": ("model_grad",),
}


def get_trainer(name: str) -> TrainerFn:
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; choose one of {', '.join(TRAINERS)}")
    return TRAINERS[name]


def staleness_bound(trainer: str, max_inflight: int, workers: int) -> int:
    """The largest staleness a trainer's window allows (0 for the synchronous trainers)."""
    if trainer in ("pdasgd", "dasgd"):
        return pdasgd.staleness_bound(max_inflight)
    if trainer == "hogwild":
        return 2 * (hogwild.window_size(workers, max_inflight) - 1)
    return 0


__all__ = ["EpochPlan", "Session", "TRAINERS", "UNITS_NEEDED", "get_trainer", "staleness_bound"]
