"""asyncsgd: asynchronous SGD with decoupled forward and backward passes and layer-wise updates.

The public API; see README.md and docs/architecture.md for the architecture.
"""

from asyncsgd.clock import Clock, WallClock
from asyncsgd.config import TrainConfig, validate
from asyncsgd.data import Dataset, load_dataset, synthetic
from asyncsgd.errors import (CheckpointError, ConfigError, DataError, DivergedError, OutputExists, StallError,
                             WorkerError)
from asyncsgd.evaluation import evaluate
from asyncsgd.models import Stage, StagedModel, get_model
from asyncsgd.run import train
from asyncsgd.store import ParamStore, Slot
from asyncsgd.trainers import TRAINERS, EpochPlan, EpochResult, TrainerSpec, register
from asyncsgd.units import Units
from asyncsgd.workers import Channel, Crew, Window

__all__ = [
    "Channel", "CheckpointError", "Clock", "ConfigError", "Crew", "DataError", "Dataset", "DivergedError",
    "EpochPlan", "EpochResult", "OutputExists", "ParamStore", "Slot", "Stage", "StagedModel", "StallError",
    "TRAINERS", "TrainConfig", "TrainerSpec", "Units", "WallClock", "Window", "WorkerError", "evaluate", "get_model",
    "load_dataset", "register", "synthetic", "train", "validate",
]
