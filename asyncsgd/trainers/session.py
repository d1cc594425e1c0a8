"""What every trainer works on, and the one place an epoch's threads are set up."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from asyncsgd.config import TrainConfig
from asyncsgd.data.dataset import Dataset, prefetch_worker
from asyncsgd.metrics import Recorder
from asyncsgd.models.staged import StagedModel
from asyncsgd.store import ParamStore
from asyncsgd.units import Units
from asyncsgd.workers import Channel, Crew

PREFETCH_DEPTH = 4  # batches ready on the device ahead of the consumers


@dataclasses.dataclass
class Session:
    """The compiled units, the store, the data and the recorder of one run."""

    config: TrainConfig
    model: StagedModel
    units: Units
    store: ParamStore
    dataset: Dataset
    recorder: Recorder


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Which batches one call of a trainer consumes."""

    epoch: int
    first_seq: int
    max_batches: Optional[int] = None


def epoch_crew(session: Session, plan: EpochPlan, consumers: int) -> tuple[Crew, Channel]:
    """A crew with the prefetch worker already spawned, and the channel of batches it feeds."""
    config = session.config
    crew = Crew(f"{config.trainer}-epoch{plan.epoch}", watchdog_s=config.watchdog_s)
    batches = Channel("batches", PREFETCH_DEPTH)
    crew.spawn("prefetch", prefetch_worker, session.dataset, config.batch_size, config.seed, plan.epoch,
               plan.first_seq, plan.max_batches, batches, config.augment, closes=[batches])
    return crew, batches


TrainerFn = Callable[[Session, EpochPlan], None]
