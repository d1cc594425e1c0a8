"""The device model: how long a unit call or a transfer takes on a simulated device.

A unit's seconds come from the profile's measured `units` when it names the unit, otherwise from its
FLOPs (XLA's cost analysis of the compiled unit at the run's shapes) / (peak x efficiency) + launch.
A straggler (`--delay straggler:device=K,factor=F`) multiplies device K's unit costs by F. Transfers
cost latency + bytes / bandwidth; a ring all-reduce of N devices costs
2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from asyncsgd.sim.profiles import Profile


def profile_key(unit: str) -> str:
    """The key of a unit in a profile's `units` map: per-stage units as `"<stage>/<kind>"`
    (`"forward/dense1"` -> `"dense1/forward"`), whole-model units by their name."""
    kind, sep, stage = unit.partition("/")
    return f"{stage}/{kind}" if sep else unit


class DeviceModel:
    """Seconds of unit calls and transfers under a profile.

    Args:
      profile: the device and link figures.
      flops: `unit name -> FLOPs` (lazily: called once per unit name, then cached).
      straggler: `(device, factor)` or None.
    """

    def __init__(self, profile: Profile, flops: Callable[[str], float], straggler: Optional[tuple[int, float]] = None):
        self.profile = profile
        self._flops = flops
        self._work: dict[str, tuple[float, float]] = {}
        self.straggler = straggler

    def _work_and_launch(self, unit: str) -> tuple[float, float]:
        """`(seconds of work, seconds of launch)` of one call of `unit` at full speed (a measured unit is
        all work)."""
        if unit not in self._work:
            measured = self.profile.units.get(profile_key(unit))
            if measured is not None:
                self._work[unit] = (measured, 0.0)
            else:
                flops = self._flops(unit)
                if not math.isfinite(flops):
                    raise ValueError(f"simulated clock: no FLOP count for unit {unit!r} (and the profile does "
                                     "not name it)")
                profile = self.profile
                self._work[unit] = (flops / (profile.peak_flops * profile.efficiency), profile.launch_s)
        return self._work[unit]

    def unit_seconds(self, unit: str) -> float:
        """Seconds of one call of `unit` on a device at full speed."""
        return sum(self._work_and_launch(unit))

    def seconds(self, device: int, unit: str, share: float = 1.0) -> float:
        """Seconds of `unit` on `device` doing `share` of its work (ddp: 1/N of the batch; the launch is
        paid in full); a straggler's are multiplied by its factor."""
        work, launch = self._work_and_launch(unit)
        seconds = work * share + launch
        if self.straggler is not None and self.straggler[0] == device:
            return seconds * self.straggler[1]
        return seconds

    def transfer_seconds(self, nbytes: float) -> float:
        return self.profile.latency_s + nbytes / self.profile.bandwidth_bytes_per_s

    def allreduce_seconds(self, nbytes: float, devices: int) -> float:
        if devices <= 1:
            return 0.0
        profile = self.profile
        return (2 * (devices - 1) / devices * nbytes / profile.bandwidth_bytes_per_s
                + 2 * (devices - 1) * profile.latency_s)
