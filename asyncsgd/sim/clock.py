"""`SimClock`: a deterministic, discrete-event clock that runs the real trainer threads one at a time.

The trainers' worker threads, channels, windows, store and delays run unchanged; what changes is the
clock they were handed (`asyncsgd.clock` is the seam). Every thread of a crew is a *party* of the
clock. Exactly one party runs at a time (the turnstile); it runs real Python and real JAX units until
it next asks the clock for something:

* `compute(device, unit)`: the device's compute stream (one unit at a time) runs `unit`; the party
  resumes when it is done, at max(now, stream free) + the unit's seconds from the device model;
* `transfer(device, nbytes)` / `allreduce(devices, nbytes)`: the same on the sending device's link
  (a stream of its own, beside the compute stream);
* `sleep(seconds)`: resumes `seconds` later (random delays, stalls);
* `wait(condition or event, timeout)`: resumes when another party `notify`s it, or at the timeout.

Then the clock hands the turnstile to the party whose next event is earliest (ties: a fixed order,
the order the parties were enrolled in, i.e. device and worker; or a seeded shuffle of it with
`tie_seed`, to replay other interleavings), and sets virtual time to that event. One thread at a time
and a fixed order make a run a function of (configuration, seed, profile, tie_seed): the same updates,
the same staleness, the same virtual times, run after run.

What the model leaves out: host time (Python, locks, data preparation, evaluation) costs nothing;
units on one device never overlap; memory bandwidth, kernel overlap and contention between links are
not modelled (see docs/simulated-clock.md for how each omission favours which trainer).

When a crew stops early (an error, Ctrl+C, a target reached), `release()` lets every party run free
(no turnstile) so that the threads can end; the run's result is then whatever it was when it stopped.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Optional, Sequence

import jax

from asyncsgd.errors import StallError
from asyncsgd.sim.costs import DeviceModel
from asyncsgd.sim.profiles import Profile

REAL_STALL_S = 300.0  # a party waiting this long in real time for its turn means a bug: fail, never hang
_FREE_POLL_S = 0.01


class _Party:
    """One thread's place in the schedule."""

    __slots__ = ("name", "key", "wake", "waiting_on", "notified", "go", "ident", "unsettled")

    def __init__(self, name: str, key: tuple):
        self.name = name
        self.key = key
        self.wake: float = 0.0          # virtual time of its next event
        self.waiting_on: Any = None     # the condition or event it waits on (notify wakes it)
        self.notified = False
        self.go = threading.Event()     # set by the clock when it is this party's turn
        self.ident: Optional[int] = None
        self.unsettled: Any = None      # arrays it last asked to settle (waited for at its next settle)


class SimClock:
    """Virtual time on a device model (see the module docstring).

    Args:
      profile: the simulated device and link.
      tie_seed: None for the fixed tie-break order; an int for a seeded shuffle of it.
    """

    name = "simulated"
    scales_compute = True   # a straggler's factor scales its unit costs (no sleeps)
    tick_every_s = 0.0      # the coordinator ticks whenever it wakes (after every finished batch)

    def __init__(self, profile: Profile, tie_seed: Optional[int] = None):
        self.profile = profile
        self.tie_seed = tie_seed
        self.model: Optional[DeviceModel] = None
        self._rng = random.Random(tie_seed) if tie_seed is not None else None
        self._lock = threading.Lock()
        self._now = 0.0
        self._parties: list[_Party] = []
        self._by_ident: dict[int, _Party] = {}
        self._running: Optional[_Party] = None
        self._free = False
        self._enrolled = 0
        self._last_switch = time.monotonic()
        self.compute_free: dict[int, float] = {}
        self.link_free: dict[int, float] = {}
        self.busy_s: dict[int, float] = {}

    def bind(self, model: DeviceModel) -> None:
        """Installs the device model (built by the session once the units are compiled)."""
        self.model = model

    # -- the Clock interface ----------------------------------------------------------------------
    def now(self) -> float:
        return self._now

    def real_now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        if seconds <= 0 or stop.is_set() or self._free:
            return
        me = self._me("sleep")
        me.wake = self._now + seconds
        self._switch(me)

    def wait(self, waitable: Any, timeout: float) -> bool:
        me = self._by_ident.get(threading.get_ident())
        if me is None or self._free:  # not a party (or stopping): a real, short wait
            return bool(waitable.wait(min(timeout, _FREE_POLL_S) if self._free else timeout))
        if isinstance(waitable, threading.Event) and waitable.is_set():
            return True
        me.wake, me.waiting_on, me.notified = self._now + timeout, waitable, False
        condition = isinstance(waitable, threading.Condition)
        if condition:
            waitable.release()  # as Condition.wait does: others may now enter while we wait
        try:
            self._switch(me)
        finally:
            if condition:
                waitable.acquire()
        return me.notified or (isinstance(waitable, threading.Event) and waitable.is_set())

    def notify(self, waitable: Any) -> None:
        """Wakes (at the current virtual time) every party waiting on `waitable`."""
        if isinstance(waitable, threading.Condition):
            waitable.notify_all()  # harmless: parties wait on their turn, not on the condition
        with self._lock:
            for party in self._parties:
                if party.waiting_on is waitable:
                    party.wake, party.waiting_on, party.notified = self._now, None, True

    # -- the device model -------------------------------------------------------------------------
    def compute(self, device: int, unit: str, scale: float = 1.0) -> None:
        """Runs `unit` on `device`'s compute stream; returns when it is done (virtual time)."""
        self.compute_all((device,), unit, scale)

    def compute_all(self, devices: Sequence[int], unit: str, scale: float = 1.0) -> None:
        """Runs `scale` of `unit`'s work (its launch in full) on each of `devices` at once; returns when
        the slowest is done."""
        if self._free:
            return
        me = self._me("compute")
        end = self._now
        for device in devices:
            seconds = self.model.seconds(device, unit, scale)
            start = max(self._now, self.compute_free.get(device, 0.0))
            self.compute_free[device] = start + seconds
            self.busy_s[device] = self.busy_s.get(device, 0.0) + seconds
            end = max(end, start + seconds)
        me.wake = end
        self._switch(me)

    def transfer(self, device: int, nbytes: float) -> None:
        """Sends `nbytes` over `device`'s link; returns when they have arrived."""
        if self._free or nbytes <= 0:
            return
        me = self._me("transfer")
        start = max(self._now, self.link_free.get(device, 0.0))
        self.link_free[device] = me.wake = start + self.model.transfer_seconds(nbytes)
        self._switch(me)

    def allreduce(self, devices: Sequence[int], nbytes: float) -> None:
        """A ring all-reduce of `nbytes` over `devices`' links; returns when every device has the sum."""
        if self._free or len(devices) <= 1:
            return
        me = self._me("allreduce")
        start = max([self._now] + [self.link_free.get(d, 0.0) for d in devices])
        end = start + self.model.allreduce_seconds(nbytes, len(devices))
        for device in devices:
            self.link_free[device] = end
        me.wake = end
        self._switch(me)

    def settle(self, tree: Any) -> None:
        """Waits for the arrays the calling party settled *last time*, not for `tree`: the turnstile
        orders the threads and the device model times them, and JAX's data dependencies order the
        values, so a party need not wait for its newest arrays. They then compute (for real) while the
        next party takes its turn, which keeps a simulated run's real time near a wall-clock run's; and a
        party is never more than one settle ahead of its own work (bounded memory)."""
        me = self._by_ident.get(threading.get_ident())
        if me is None or self._free:
            jax.block_until_ready(tree)  # blocks: not a party (or stopping): as on the wall clock
            return
        earlier, me.unsettled = me.unsettled, tree
        if earlier is not None:
            jax.block_until_ready(earlier)  # blocks: at most one settle ahead

    # -- parties ----------------------------------------------------------------------------------
    def enter(self, name: str) -> None:
        """The calling thread (a crew's coordinator) becomes the running party; call before `enroll`."""
        with self._lock:
            if not self._parties:
                self._free = False
                self._running = None
            if self._running is not None:
                raise RuntimeError(f"simulated clock: {name} entered while {self._running.name} runs")
            party = self._new_party(name)
            party.ident = threading.get_ident()
            self._by_ident[party.ident] = party
            party.wake = self._now
            self._running = party
            self._last_switch = time.monotonic()

    def enroll(self, name: str) -> _Party:
        """A new party, ready at the current time (a worker about to start); it runs once `attach`ed."""
        with self._lock:
            party = self._new_party(name)
            party.wake = self._now
            return party

    def attach(self, party: _Party) -> None:
        """Called first thing by the enrolled party's own thread: binds it and waits for its turn."""
        party.ident = threading.get_ident()
        with self._lock:
            self._by_ident[party.ident] = party
        self._park(party)

    def leave(self) -> None:
        """The calling party is done: it leaves the schedule and hands the turnstile on."""
        with self._lock:
            me = self._by_ident.pop(threading.get_ident(), None)
            if me is None:
                return
            self._parties.remove(me)
            if self._running is me:
                self._running = None
                self._hand_on()

    def release(self) -> None:
        """Stops the turnstile: every party runs free (a crew stopping early)."""
        with self._lock:
            self._free = True
            for party in self._parties:
                party.go.set()

    @property
    def simulated(self) -> bool:
        return True

    # -- internals --------------------------------------------------------------------------------
    def _new_party(self, name: str) -> _Party:
        order = self._enrolled
        self._enrolled += 1
        key = (self._rng.random(), order) if self._rng is not None else (0.0, order)
        party = _Party(name, key)
        self._parties.append(party)
        return party

    def _me(self, what: str) -> _Party:
        me = self._by_ident.get(threading.get_ident())
        if me is None:
            raise RuntimeError(f"simulated clock: {what} from {threading.current_thread().name}, which is not a "
                               "party of the clock (only a crew's threads may pass virtual time)")
        return me

    def _hand_on(self) -> Optional[_Party]:
        """Under the lock: gives the turnstile to the earliest party; returns it (None: nobody left)."""
        if not self._parties:
            return None
        nxt = min(self._parties, key=lambda party: (party.wake, party.key))
        self._now = max(self._now, nxt.wake)
        nxt.waiting_on = None
        self._running = nxt
        self._last_switch = time.monotonic()
        nxt.go.set()
        return nxt

    def _switch(self, me: _Party) -> None:
        """`me` (running) has set its next event; the earliest party runs next (maybe `me` again)."""
        with self._lock:
            if self._free:
                return
            nxt = self._hand_on()
        if nxt is not me:
            self._park(me)
        else:
            me.go.clear()

    def _park(self, me: _Party) -> None:
        """Waits (real time) until it is `me`'s turn or the clock runs free."""
        while not me.go.wait(1.0):
            if self._free:
                return
            if time.monotonic() - self._last_switch > REAL_STALL_S:
                self.release()
                raise StallError(f"simulated clock: {me.name} waited {REAL_STALL_S:.0f} s (real time) for its turn; "
                                 f"{self._running.name if self._running else 'nobody'} held it")
        me.go.clear()
