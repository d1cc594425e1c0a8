"""The run's clock: the one seam through which every reading of time and every wait passes.

Trainers, workers, channels, the run-ahead window, the watchdog, the delays, the recorder's
timestamps and the time to target all ask the `Clock` handed down from the run instead of calling
`time` themselves. `WallClock` is real time. A different clock (a simulated one: virtual time on a
device model) replaces this one object and nothing else.

Besides time, a clock is where a run's threads take turns and where device work is charged: a
simulated clock (`asyncsgd.sim.SimClock`) runs one thread at a time and advances virtual time by
what each unit, transfer and all-reduce costs on its device model. On `WallClock` those calls do
nothing: the work itself takes the time.

Benchmarks that time the machine itself (`bench`, `measure_peak_flops`) and compilation read real
time directly: they measure the hardware, not a run.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional, Protocol, Sequence, Union

import jax

Waitable = Union[threading.Event, threading.Condition]


class Clock(Protocol):
    """What a run needs of time.

    Time:
      `now()`: seconds on the run's clock (monotonic; only differences mean anything).
      `real_now()`: real seconds (what `wall_time_s` reports, whatever the clock).
      `sleep(seconds, stop)`: pass `seconds` of run time; returns early once `stop` is set.
      `wait(waitable, timeout)`: `waitable.wait(timeout)` for an Event or a held Condition, in run time;
        True when it was set / notified.
      `notify(waitable)`: wakes the threads waiting on `waitable` (for a Condition, hold it).
    Turns (a crew's threads; no-ops on the wall clock):
      `enter(name)`, `enroll(name) -> token`, `attach(token)`, `leave()`, `release()`.
    Device work (no-ops on the wall clock, where the work itself takes the time):
      `compute(device, unit)`, `compute_all(devices, unit, scale)`, `transfer(device, nbytes)`,
      `allreduce(devices, nbytes)`; `settle(tree)`: where a worker keeps its real pace, wait until `tree`
      is computed (the wall clock); the simulated clock, which paces the threads itself, waits only for
      what the same thread settled the time before.
    Attributes: `name`, `simulated`, `scales_compute` (a straggler's factor scales unit costs instead of
    sleeping), `tick_every_s` (how often a crew's coordinator ticks).
    """

    name: str
    simulated: bool
    scales_compute: bool
    tick_every_s: float

    def now(self) -> float: ...

    def real_now(self) -> float: ...

    def sleep(self, seconds: float, stop: threading.Event) -> None: ...

    def wait(self, waitable: Waitable, timeout: float) -> bool: ...

    def notify(self, waitable: Waitable) -> None: ...

    def enter(self, name: str) -> None: ...

    def enroll(self, name: str) -> Any: ...

    def attach(self, token: Any) -> None: ...

    def leave(self) -> None: ...

    def release(self) -> None: ...

    def compute(self, device: int, unit: str, scale: float = 1.0) -> None: ...

    def compute_all(self, devices: Sequence[int], unit: str, scale: float = 1.0) -> None: ...

    def transfer(self, device: int, nbytes: float) -> None: ...

    def allreduce(self, devices: Sequence[int], nbytes: float) -> None: ...

    def settle(self, tree: Any) -> None: ...


class WallClock:
    """Real time: `time.perf_counter`, sleeps on the stop event (no CPU burnt, the GIL released)."""

    name = "wall"
    simulated = False
    scales_compute = False
    tick_every_s = 0.25

    def now(self) -> float:
        return time.perf_counter()

    real_now = now

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        if seconds > 0:
            stop.wait(seconds)

    def wait(self, waitable: Waitable, timeout: float) -> bool:
        return bool(waitable.wait(timeout))

    def notify(self, waitable: Waitable) -> None:
        if isinstance(waitable, threading.Condition):
            waitable.notify_all()

    # Turns and device work: real threads run concurrently and real work takes real time.
    def enter(self, name: str) -> None:
        return None

    def enroll(self, name: str) -> Optional[Any]:
        return None

    def attach(self, token: Any) -> None:
        return None

    def leave(self) -> None:
        return None

    def release(self) -> None:
        return None

    def compute(self, device: int, unit: str, scale: float = 1.0) -> None:
        return None

    def compute_all(self, devices: Sequence[int], unit: str, scale: float = 1.0) -> None:
        return None

    def transfer(self, device: int, nbytes: float) -> None:
        return None

    def allreduce(self, devices: Sequence[int], nbytes: float) -> None:
        return None

    def settle(self, tree: Any) -> None:
        jax.block_until_ready(tree)  # blocks: a worker's real pace (and the freshness of its next read)


WALL = WallClock()
