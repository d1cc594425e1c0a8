"""asyncsgd: asynchronous SGD with decoupled forward and backward passes and layer-wise updates.

The public API; see README.md for the architecture.
"""

from asyncsgd.config import ConfigError, TrainConfig, validate
from asyncsgd.data import Dataset, load_dataset, synthetic
from asyncsgd.models import Stage, StagedModel, get_model
from asyncsgd.run import evaluate, train
from asyncsgd.store import ParamStore, Slot
from asyncsgd.trainers import TRAINERS, get_trainer, staleness_bound
from asyncsgd.units import Units
from asyncsgd.workers import Channel, Crew, StallError, Window, WorkerError

__all__ = [
    "Channel", "ConfigError", "Crew", "Dataset", "ParamStore", "Slot", "Stage", "StagedModel", "StallError",
    "TRAINERS", "TrainConfig", "Units", "Window", "WorkerError", "evaluate", "get_model", "get_trainer",
    "load_dataset", "staleness_bound", "synthetic", "train", "validate",
]
