"""What every trainer works on, and the one place an epoch's threads are set up."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from asyncsgd.config import TrainConfig
from asyncsgd.data.dataset import Dataset, prefetch_worker
from asyncsgd.delays import DelaySpec, DeviceDelay
from asyncsgd.metrics import Recorder
from asyncsgd.models.staged import StagedModel
from asyncsgd.store import ParamStore
from asyncsgd.trainers.placement import DeviceView
from asyncsgd.units import Units
from asyncsgd.workers import Channel, Crew, Tickets

PREFETCH_DEPTH = 4  # batches ready on the device ahead of the consumers


@dataclasses.dataclass
class Session:
    """The compiled units, the store, the data and the recorder of one run.

    `devices` are the run's JAX devices (`devices[0]` is home, where `store` lives); `views[d]` is device
    d's view of the store. `replicas` (LAP-SGD, LPP-SGD) are the per-device model copies, `replicas[0]`
    being `store`; `model_view` then returns their average instead of the store's snapshot.
    """

    config: TrainConfig
    model: StagedModel
    units: Units
    store: ParamStore
    dataset: Dataset
    recorder: Recorder
    devices: list = dataclasses.field(default_factory=list)
    delay: DelaySpec = DelaySpec()
    views: list = dataclasses.field(default_factory=list)
    replicas: list = dataclasses.field(default_factory=list)
    model_view: Optional[Callable[[], tuple[list, list]]] = None
    averaging_rounds: int = 0
    window: Optional[Tickets] = None  # the run-ahead window of the epoch running (or run) last
    delays: list = dataclasses.field(default_factory=list)  # every worker's DeviceDelay (their sleeps)

    def __post_init__(self) -> None:
        if not self.views and self.devices:
            self.views = [DeviceView(self.store, self.devices, index) for index in range(len(self.devices))]

    def view(self) -> tuple[list, list]:
        """The model to evaluate now, `(params, states)` on the home device, taken without pausing
        the workers (a consistent cut of the store, or the average of the device copies)."""
        if self.model_view is not None:
            return self.model_view()
        snapshot = self.store.snapshot()
        return ([s.params for s in snapshot], [s.state for s in snapshot])

    def updates_per_stage(self) -> list[int]:
        """Committed updates per stage (summed over the device copies where there are several)."""
        stores = self.replicas or [self.store]
        return [sum(versions) for versions in zip(*(store.versions() for store in stores))]

    def worker_delay(self, worker, device: int, index: int = 0) -> DeviceDelay:
        """The delays of one worker (its own seeded generator; sleeps end when the crew stops)."""
        delay = DeviceDelay(self.delay, device, self.config.seed, index, stop=worker.crew.stop_event)
        self.delays.append(delay)
        return delay

    def delay_slept_s(self) -> list[float]:
        """Seconds slept for `--delay`, per device, so far."""
        slept = [0.0] * max(1, len(self.devices))
        for delay in list(self.delays):
            slept[delay.device] += delay.slept_s
        return slept


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Which batches one call of a trainer consumes."""

    epoch: int
    first_seq: int
    max_batches: Optional[int] = None
    skip: int = 0  # batches of the epoch already done (a resumed run starts after them)


def epoch_crew(session: Session, plan: EpochPlan, consumers: int, placement=None) -> tuple[Crew, Channel]:
    """A crew with the prefetch worker already spawned, and the channel of batches it feeds.

    Args:
      placement: where the prefetch worker puts each batch (a device or a sharding; default: the
        default device, from which each device's workers copy what they take).
    """
    config = session.config
    crew = Crew(f"{config.trainer}-epoch{plan.epoch}", watchdog_s=config.watchdog_s)
    batches = Channel("batches", PREFETCH_DEPTH * max(1, len(session.devices)))
    crew.spawn("prefetch", prefetch_worker, session.dataset, config.batch_size, config.seed, plan.epoch,
               plan.first_seq, plan.max_batches, batches, config.augment, placement, plan.skip, closes=[batches])
    return crew, batches


def make_tickets(session: Session, per_device: int, plan: EpochPlan) -> Tickets:
    """The run-ahead window of a trainer whose devices may each have `per_device` items in flight
    (`config.window`: one window of N x per_device items over the run, or one of per_device each)."""
    devices = max(1, len(session.devices))
    scope = session.config.window if devices > 1 else "global"
    size = per_device * devices if scope == "global" else per_device
    session.window = Tickets(size, plan.first_seq, devices, scope)
    return session.window


TrainerFn = Callable[[Session, EpochPlan], None]
