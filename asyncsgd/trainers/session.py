"""What every trainer works on (`Session`), and the one place an epoch's threads are set up (`Epoch`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

from asyncsgd.clock import WALL, Clock
from asyncsgd.data.dataset import Dataset, prefetch_worker
from asyncsgd.delays import DelaySpec, DeviceDelay
from asyncsgd.metrics import Recorder
from asyncsgd.models import onednn
from asyncsgd.models.staged import StagedModel
from asyncsgd.staleness import PREDICTS, needs_read_params, parse_corrections
from asyncsgd.store import ParamStore
from asyncsgd.trainers.base import EpochPlan, EpochResult
from asyncsgd.trainers.placement import DeviceView
from asyncsgd.units import Units
from asyncsgd.workers import Channel, Crew, Tickets

PREFETCH_DEPTH = 4  # batches ready on the device ahead of the consumers


@dataclasses.dataclass(frozen=True)
class Session:
    """The compiled units, the store, the data and the recorder of one run (built by
    `asyncsgd.assemble.build_session`; nothing writes into it afterwards).

    `devices` are the run's JAX devices (`devices[0]` is home, where `store` lives); `views[d]` is device
    d's view of the store. `kit`, `replicas` and `model_view` come from the trainer's `prepare` (see
    `trainers.base.Prepared`): `replicas` are per-device model copies (`replicas[0]` is `store`), and
    `model_view` returns the model to evaluate when it is not the store's snapshot.
    """

    config: Any  # TrainConfig
    model: StagedModel
    units: Units
    store: ParamStore
    dataset: Dataset
    recorder: Recorder
    devices: tuple = ()
    delay: DelaySpec = DelaySpec()
    clock: Clock = WALL
    views: tuple = ()
    kit: Any = None
    replicas: tuple = ()
    model_view: Optional[Callable[[], tuple[list, list]]] = None
    conv_threads: int = 0  # each oneDNN convolution's threads while an epoch runs (`trainers.conv_threads`)

    def __post_init__(self) -> None:
        if not self.views and self.devices:
            views = tuple(DeviceView(self.store, list(self.devices), index, self.clock, self.predicts)
                          for index in range(len(self.devices)))
            object.__setattr__(self, "views", views)

    @property
    def stores(self) -> list[ParamStore]:
        """Every model copy: the store, or the per-device replicas where there are several."""
        return list(self.replicas) or [self.store]

    def view(self) -> tuple[list, list]:
        """The model to evaluate now, `(params, states)` on the home device, taken without pausing
        the workers (a consistent cut of the store, or the average of the device copies)."""
        if self.model_view is not None:
            return self.model_view()
        snapshot = self.store.snapshot()
        return ([s.params for s in snapshot], [s.state for s in snapshot])

    @functools.cached_property
    def keeps_read_params(self) -> bool:
        """Whether updates need the parameters their gradient was computed at (a `dc` correction):
        then the trainers keep a reference to them from the read until the commit. (Asked by every
        pass: parsed once per session.)"""
        return needs_read_params(self.config.staleness_correction)

    @functools.cached_property
    def predicts(self) -> bool:
        """Whether forward passes read each stage's predicted parameters (a `predict` correction)."""
        return PREDICTS in parse_corrections(self.config.staleness_correction)

    def updates_per_stage(self) -> list[int]:
        """Committed updates per stage (summed over the device copies where there are several)."""
        return [sum(versions) for versions in zip(*(store.versions() for store in self.stores))]


class Epoch:
    """One call of a trainer: a crew with the prefetch worker already spawned, the channel of batches
    it feeds, and the bookkeeping every trainer returns (`run()` -> `EpochResult`).

    Args:
      consumers: how many workers take batches (for the channel's depth).
      placement: where the prefetch worker puts each batch (a device or a sharding; default: the
        default device, from which each device's workers copy what they take).
    """

    def __init__(self, session: Session, plan: EpochPlan, placement=None):
        config = session.config
        self.session, self.plan = session, plan
        self.crew = Crew(f"{config.trainer}-epoch{plan.epoch}", watchdog_s=config.watchdog_s, clock=session.clock)
        self.batches = Channel("batches", PREFETCH_DEPTH * max(1, len(session.devices)))
        self.window: Optional[Tickets] = None
        self._delays: list[DeviceDelay] = []
        self.crew.spawn("prefetch", prefetch_worker, session.dataset, config.batch_size, config.seed, plan.epoch,
                        plan.first_seq, plan.max_batches, self.batches, config.augment, placement, plan.skip,
                        plan.shard, closes=[self.batches])

    def delay(self, worker, device: int, index: int = 0) -> DeviceDelay:
        """The delays of one worker (its own seeded generator; sleeps pass on the run's clock and end
        when the crew stops)."""
        delay = DeviceDelay(self.session.delay, device, self.session.config.seed, index,
                            stop=worker.crew.stop_event, clock=self.session.clock)
        self._delays.append(delay)
        return delay

    def tickets(self, per_device: int, scope: Optional[str] = None) -> Tickets:
        """The run-ahead window of a trainer whose devices may each have `per_device` items in flight
        (`scope`, default `config.window`: one window of N x per_device items over the run, or one of
        per_device each)."""
        devices = max(1, len(self.session.devices))
        scope = (scope or self.session.config.window) if devices > 1 else "global"
        size = per_device * devices if scope == "global" else per_device
        self.window = Tickets(size, self.plan.first_seq, devices, scope, clock=self.session.clock)
        return self.window

    def run(self, averaging_rounds: Callable[[], int] = lambda: 0) -> EpochResult:
        """Runs the crew to its end (ticking the recorder with the crew's queue depth) and says what it did.

        Args:
          averaging_rounds: read after the crew has finished (LAP-SGD's averaging worker's count).
        """
        recorder = self.session.recorder
        before = recorder.finished
        try:
            with onednn.threads_set(self.session.conv_threads):
                self.crew.run(tick=lambda: recorder.tick(self.crew.queue_depth()), wake=recorder.progress)
        except BaseException as exc:  # an interrupted or failed epoch still reports what it did
            exc.epoch_result = self.result(recorder.finished - before, averaging_rounds())
            raise
        return self.result(recorder.finished - before, averaging_rounds())

    def result(self, batches: int, averaging_rounds: int = 0) -> EpochResult:
        slept = [0.0] * max(1, len(self.session.devices))
        for delay in self._delays:
            slept[delay.device] += delay.slept_s
        window = self.window
        return EpochResult(batches=batches, averaging_rounds=averaging_rounds, delay_slept_s=tuple(slept),
                           peak_inflight=window.peak_held if window is not None else None,
                           window_size=window.size if window is not None else None)
