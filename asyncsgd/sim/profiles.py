"""Device profiles for the simulated clock: what one accelerator computes per second and what its link
moves, from public hardware figures (built-ins) or measured on this machine (`asyncsgd profile`).

A profile file is JSON:

    {"name": "a100",
     "device": {"peak_flops": 156e12, "efficiency": 0.15, "launch_s": 1e-5},
     "link": {"bandwidth_bytes_per_s": 300e9, "latency_s": 5e-6},
     "units": {"dense1/forward": 0.0004, ...}}          (optional: measured seconds per unit)

A unit's cost is its FLOPs (XLA's cost analysis of that compiled unit at the run's batch size) /
(peak_flops x efficiency) + launch_s, unless `units` names it, in which case the measured seconds
replace the formula. A transfer costs latency_s + bytes / bandwidth_bytes_per_s.

The built-in figures (fp32 training, which is what the units compute; on Ampere and Hopper fp32
matrix products run on the tensor cores as TF32, as PyTorch's cuDNN convolutions do by default):

| profile | peak_flops | source | efficiency | link |
|---|---|---|---|---|
| a100 | 156e12 (TF32 dense; bf16 dense 312e12, fp32 19.5e12) | NVIDIA A100 datasheet | 0.15 | NVLink 3: 600 GB/s both ways, 300e9 B/s per direction |
| h100 | 494.7e12 (TF32 dense; bf16 dense 989.4e12, fp32 66.9e12) | NVIDIA H100 SXM datasheet | 0.15 | NVLink 4: 900 GB/s both ways, 450e9 B/s per direction |

Efficiency 0.15: NVIDIA's published ResNet-50 training throughput on one A100 80GB in TF32 is 938
images/s (DeepLearningExamples, PyTorch ResNet-50 v1.5, 21.03 container); at about 24.6 GFLOP per
image per training step (3 x 8.2 GFLOP forward at 224x224) that is 23 TFLOP/s, 15% of the TF32 peak.
No comparable published figure for H100 was at hand, so it keeps 0.15 (an assumption, stated in the
profile). launch_s 1e-5: a CUDA kernel launch costs about 5 us and one unit is a compiled XLA program of
a few kernels. latency_s 5e-6: an NVLink peer-to-peer copy's start-up with its driver call. These
numbers are fixed from the sources above and were not tuned to any result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

from asyncsgd.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Profile:
    """One simulated accelerator and its link.

    Attributes:
      name: shown in outputs and plots.
      peak_flops: FLOP/s the device model divides by (with `efficiency`).
      efficiency: the fraction of the peak a training unit reaches.
      launch_s: fixed cost per unit call.
      bandwidth_bytes_per_s, latency_s: the link each device sends over.
      units: measured seconds per unit (`"<stage>/<kind>"`, or a whole-model unit's name) that replace
        the FLOP formula.
      note: where the figures come from.
    """

    name: str
    peak_flops: float
    efficiency: float
    launch_s: float
    bandwidth_bytes_per_s: float
    latency_s: float
    units: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        payload = {"name": self.name,
                   "device": {"peak_flops": self.peak_flops, "efficiency": self.efficiency, "launch_s": self.launch_s},
                   "link": {"bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "latency_s": self.latency_s}}
        if self.units:
            payload["units"] = dict(self.units)
        if self.note:
            payload["note"] = self.note
        return payload


BUILT_IN = {
    "a100": Profile("a100", peak_flops=156e12, efficiency=0.15, launch_s=1e-5, bandwidth_bytes_per_s=300e9,
                    latency_s=5e-6, note="NVIDIA A100 SXM 80GB: TF32 dense peak, NVLink 3 per direction; efficiency "
                    "from NVIDIA's ResNet-50 TF32 training throughput (938 img/s)"),
    "h100": Profile("h100", peak_flops=494.7e12, efficiency=0.15, launch_s=1e-5, bandwidth_bytes_per_s=450e9,
                    latency_s=5e-6, note="NVIDIA H100 SXM: TF32 dense peak, NVLink 4 per direction; efficiency "
                    "assumed equal to the A100's (no published TF32 training figure at hand)"),
}


def _number(value, what: str, source: str, low: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"--profile {source}: {what} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ConfigError(f"--profile {source}: {what} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def profile_from_json(payload: dict, source: str = "<json>") -> Profile:
    """A `Profile` from the JSON layout in the module docstring; `ConfigError` naming a bad field."""
    if not isinstance(payload, dict):
        raise ConfigError(f"--profile {source}: expected a JSON object")
    device, link = payload.get("device"), payload.get("link")
    if not isinstance(device, dict) or not isinstance(link, dict):
        raise ConfigError(f"--profile {source}: needs \"device\" and \"link\" objects")
    units = payload.get("units", {})
    if not isinstance(units, dict):
        raise ConfigError(f"--profile {source}: \"units\" must map unit names to seconds")
    for key in ("peak_flops", "efficiency", "launch_s"):
        if key not in device:
            raise ConfigError(f"--profile {source}: device.{key} is missing")
    for key in ("bandwidth_bytes_per_s", "latency_s"):
        if key not in link:
            raise ConfigError(f"--profile {source}: link.{key} is missing")
    efficiency = _number(device["efficiency"], "device.efficiency", source)
    if efficiency > 1:
        raise ConfigError(f"--profile {source}: device.efficiency must be <= 1, got {efficiency}")
    return Profile(
        name=str(payload.get("name", os.path.splitext(os.path.basename(source))[0])),
        peak_flops=_number(device["peak_flops"], "device.peak_flops", source),
        efficiency=efficiency,
        launch_s=_number(device["launch_s"], "device.launch_s", source, strict=False),
        bandwidth_bytes_per_s=_number(link["bandwidth_bytes_per_s"], "link.bandwidth_bytes_per_s", source),
        latency_s=_number(link["latency_s"], "link.latency_s", source, strict=False),
        units={str(k): _number(v, f"units[{k!r}]", source, strict=False) for k, v in units.items()},
        note=str(payload.get("note", "")))


def load_profile(spec: Optional[str]) -> Profile:
    """`--profile NAME|PATH`: a built-in name or a JSON file; `ConfigError` with one line otherwise."""
    spec = spec or "a100"
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if not os.path.exists(spec):
        raise ConfigError(f"--profile {spec!r}: not a built-in profile ({', '.join(BUILT_IN)}) nor an existing file")
    try:
        with open(spec, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--profile {spec}: unreadable JSON ({exc.__class__.__name__}: {exc})") from None
    return profile_from_json(payload, spec)
