"""The delay model: extra latency, seeded and applied the same way by every trainer.

A spec is one string (the `--delay` flag):

  none                               no extra latency (the default)
  straggler:device=0,factor=4        device 0 computes `factor` times slower: after each of its compute
                                     steps it sleeps (factor - 1) x the step's measured compute time
  exp:mean=0.02                      after each pushed update, a random pause, exponential with this
                                     mean in seconds (communication latency), drawn per device
  lognormal:mean=0.02,sigma=1        the same, log-normal with this mean (seconds) and shape sigma
  periodic:every=50,stall=1.0        every `every`-th update a device pushes, it stalls `stall` seconds
                                     (optionally `device=D` to stall one device only)

Where the delays apply, identically for every trainer:
  - compute (straggler): after a worker's compute step on the slow device: a forward pass or a backward
    pass (pdasgd, dasgd), a full or partial gradient step (hogwild, lapsgd, lppsgd), a whole step (ddp);
  - push (exp, lognormal, periodic): once per batch a device finishes, when its update is pushed: after a
    backward pass, a gradient step's commit, or (ddp) the all-reduce step.
A synchronous trainer (ddp) waits for the slowest device: each step sleeps the largest of the
devices' delays. Delays sleep on the workers' stop event, so they release the GIL, burn no CPU and
end at once when the run stops. Every worker draws from its own generator seeded by (seed, device,
worker), so a run's delays repeat exactly.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Optional

import numpy as np

from asyncsgd.clock import WALL, Clock
from asyncsgd.errors import ConfigError

KINDS = {
    "none": {},
    "straggler": {"device": int, "factor": float},
    "exp": {"mean": float},
    "lognormal": {"mean": float, "sigma": float},
    "periodic": {"every": int, "stall": float, "device": int},
}
_REQUIRED = {"straggler": ("device", "factor"), "exp": ("mean",), "lognormal": ("mean", "sigma"),
             "periodic": ("every", "stall")}
EXAMPLES = ("none, straggler:device=0,factor=4, exp:mean=0.02, lognormal:mean=0.02,sigma=1, "
            "periodic:every=50,stall=1.0")


@dataclasses.dataclass(frozen=True)
class DelaySpec:
    """A parsed `--delay` spec (see the module docstring)."""

    kind: str = "none"
    device: Optional[int] = None
    factor: float = 1.0
    mean: float = 0.0
    sigma: float = 1.0
    every: int = 0
    stall: float = 0.0

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        fields = {"straggler": ("device", "factor"), "exp": ("mean",), "lognormal": ("mean", "sigma"),
                  "periodic": ("every", "stall", "device")}[self.kind]
        parts = [f"{name}={getattr(self, name)}" for name in fields if getattr(self, name) is not None]
        return f"{self.kind}:{','.join(parts)}"


def _fail(spec: str, why: str) -> None:
    raise ConfigError(f"--delay {spec!r}: {why}; examples: {EXAMPLES}")


def parse_delay(spec: str, devices: int = 1) -> DelaySpec:
    """Parses a `--delay` spec; raises `ConfigError` naming what is wrong.

    Args:
      spec: the spec string.
      devices: the run's device count (a device index must be below it).
    """
    if not isinstance(spec, str) or not spec.strip():
        _fail(str(spec), "empty spec")
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        _fail(spec, f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "none":
        if rest:
            _fail(spec, "'none' takes no parameters")
        return DelaySpec()
    values: dict = {}
    for item in filter(None, rest.split(",")):
        name, eq, raw = item.partition("=")
        name = name.strip()
        if not eq:
            _fail(spec, f"expected name=value, got {item!r}")
        if name not in KINDS[kind]:
            _fail(spec, f"{kind} has no parameter {name!r} (it takes {', '.join(KINDS[kind])})")
        if name in values:
            _fail(spec, f"parameter {name!r} given twice")
        try:
            value = KINDS[kind][name](raw.strip())
        except ValueError:
            _fail(spec, f"{name}={raw.strip()!r} is not a {KINDS[kind][name].__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            _fail(spec, f"{name} must be finite")
        values[name] = value
    missing = [name for name in _REQUIRED[kind] if name not in values]
    if missing:
        _fail(spec, f"{kind} needs {', '.join(missing)}")
    if "device" in values and not 0 <= values["device"] < devices:
        _fail(spec, f"device={values['device']} is not one of the run's {devices} device(s) (0..{devices - 1})")
    if kind == "straggler" and values["factor"] < 1:
        _fail(spec, f"factor must be >= 1, got {values['factor']}")
    if kind in ("exp", "lognormal") and values["mean"] <= 0:
        _fail(spec, f"mean must be > 0 seconds, got {values['mean']}")
    if kind == "lognormal" and values["sigma"] <= 0:
        _fail(spec, f"sigma must be > 0, got {values['sigma']}")
    if kind == "periodic" and (values["every"] < 1 or values["stall"] < 0):
        _fail(spec, f"every must be >= 1 and stall >= 0, got every={values['every']}, stall={values['stall']}")
    return DelaySpec(kind=kind, **values)


class DeviceDelay:
    """The delays of one worker on one device (not shared between threads).

    Args:
      spec: the parsed spec.
      device: the device index the worker runs on.
      seed: the run's seed; `(seed, device, worker)` seeds the generator.
      worker: the worker's index on its device.
      stop: the event that ends a sleep early (the crew's stop event).
      clock: the run's clock (sleeps pass its time).
    """

    def __init__(self, spec: DelaySpec, device: int, seed: int, worker: int = 0,
                 stop: Optional[threading.Event] = None, clock: Clock = WALL):
        self.spec = spec
        self.clock = clock
        self.device = device
        self.stop = stop or threading.Event()
        self.rng = np.random.default_rng([seed, device, worker, 0x0de1a7])
        self.pushes = 0
        self.slept_s = 0.0

    @property
    def active(self) -> bool:
        return self.spec.kind != "none"

    def _applies_here(self) -> bool:
        return self.spec.device is None or self.spec.device == self.device

    def compute_extra(self, elapsed_s: float) -> float:
        """Seconds to add after a compute step that took `elapsed_s`."""
        if self.spec.kind == "straggler" and self._applies_here() and not self.clock.scales_compute:
            return (self.spec.factor - 1.0) * elapsed_s  # (a simulated clock scales the device's costs instead)
        return 0.0

    def push_extra(self) -> float:
        """Seconds to add when this worker pushes an update (draws the next random delay)."""
        self.pushes += 1
        kind = self.spec.kind
        if kind == "exp":
            return float(self.rng.exponential(self.spec.mean))
        if kind == "lognormal":
            sigma = self.spec.sigma  # mean of exp(N(mu, sigma^2)) is exp(mu + sigma^2 / 2)
            return float(self.rng.lognormal(math.log(self.spec.mean) - sigma ** 2 / 2, sigma))
        if kind == "periodic" and self._applies_here() and self.pushes % self.spec.every == 0:
            return self.spec.stall
        return 0.0

    def sleep(self, seconds: float) -> None:
        """Sleeps without burning CPU; returns early when the run stops."""
        if seconds > 0:
            self.slept_s += seconds
            self.clock.sleep(seconds, self.stop)

    def after_compute(self, elapsed_s: float) -> None:
        self.sleep(self.compute_extra(elapsed_s))

    def after_push(self) -> None:
        self.sleep(self.push_extra())
