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


__all__ = ["EpochPlan", "Session", "TRAINERS", "get_trainer", "staleness_bound"]
