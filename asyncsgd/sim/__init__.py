"""The simulated clock: the same trainers, on N simulated accelerators, in deterministic virtual time.

`SimClock` (clock.py) runs a run's threads one at a time in virtual time; `DeviceModel` (costs.py)
says how long each unit, transfer and all-reduce takes; `Profile` (profiles.py) holds the device and
link figures (built-in `a100`, `h100`, or a JSON file, e.g. one measured by `asyncsgd profile`).
"""

from asyncsgd.sim.clock import SimClock
from asyncsgd.sim.costs import DeviceModel, profile_key
from asyncsgd.sim.profiles import BUILT_IN, Profile, load_profile, profile_from_json

__all__ = ["BUILT_IN", "DeviceModel", "Profile", "SimClock", "load_profile", "profile_from_json", "profile_key"]
