"""Thread plumbing: one worker skeleton for every thread, bounded channels, and a watchdog.

A `Crew` owns a stop event and a set of workers. Each worker is a function `body(worker, *args)` run
in its own daemon thread; a `Worker` handle gives it `get`/`put` on bounded `Channel`s that wake up on
the stop event, a `doing` label used in error messages, and `beat()` to report progress.

The coordinating (main) thread calls `Crew.run()`, which
  * re-raises the first worker exception as `WorkerError`, naming the worker and what it was doing,
    after stopping and joining every thread;
  * raises `StallError` when no worker has made progress for `watchdog_s` seconds, naming the workers
    that were not merely waiting on a channel;
  * on Ctrl+C stops and joins every worker, then raises KeyboardInterrupt. While a crew runs in the
    main thread, the first SIGINT only sets the stop event (a KeyboardInterrupt raised at an arbitrary
    point, say while threads are being started, could leave a daemon thread inside an XLA call at
    interpreter exit, which aborts the process); a second SIGINT goes to the previous handler;
  * calls `tick()` periodically (progress bars, queue-depth sampling).
No thread outlives `run()`: it only returns after every worker has been joined.

Every reading of time and every wait goes through the crew's `Clock` (`asyncsgd.clock`): the
watchdog, channel and window waits, the periodic tick. The coordinator and every worker are the
clock's parties (`enter`, `enroll`, `attach`, `leave`), so a simulated clock can run them one at a
time; on the wall clock those calls do nothing. Joining threads at the end is real time.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

from asyncsgd.clock import WALL, Clock
from asyncsgd.errors import StallError, WorkerError

_POLL_S = 0.05
_END = object()  # end-of-stream marker inside a channel


_CURRENT = threading.local()  # the `Worker` a crew thread runs as (`current_worker`)


def current_worker() -> Optional["Worker"]:
    """The crew worker the calling thread runs as, or None outside a crew (code below a worker body
    that blocks on something other than a channel checks its stop event through it: a Ray reply)."""
    return getattr(_CURRENT, "worker", None)


class Stopped(Exception):
    """Raised inside a worker when the crew's stop event is set while it waits."""


class EndOfStream(Exception):
    """Raised by `Channel.get` once every producer has closed the channel and it is drained."""


class Channel:
    """A bounded FIFO between workers, closed by its producers.

    Args:
      name: shown in stall reports ("waiting on channel <name>").
      maxsize: capacity (>= 1); a full channel blocks its producers (back-pressure).
      producers: how many producers must `close()` before consumers see the end of the stream.
    """

    def __init__(self, name: str, maxsize: int, producers: int = 1):
        if maxsize < 1:
            raise ValueError(f"channel {name!r}: maxsize must be >= 1, got {maxsize}")
        self.name = name
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._changed = threading.Condition()
        self._open_producers = producers

    def qsize(self) -> int:
        return len(self._items)

    def take(self, clock: Clock, check: Callable[[], None]) -> Any:
        """The next item, waiting (on `clock`) while the channel is empty; `check()` between waits
        raises to give up (a stopping crew). The end-of-stream marker stays for the other consumers."""
        with self._changed:
            while not self._items:
                check()
                clock.wait(self._changed, _POLL_S)
            item = self._items[0]
            if item is not _END:
                self._items.popleft()
                clock.notify(self._changed)
            return item

    def offer(self, item: Any, clock: Clock, check: Callable[[], None], force: bool = False) -> None:
        """Appends `item`, waiting while the channel is full (unless `force`: the end marker)."""
        with self._changed:
            while not force and len(self._items) >= self.maxsize:
                check()
                clock.wait(self._changed, _POLL_S)
            self._items.append(item)
            clock.notify(self._changed)

    def producer_done(self) -> bool:
        """Counts one producer out; True for the last one."""
        with self._changed:
            self._open_producers -= 1
            return self._open_producers == 0


class Worker:
    """The handle a worker body gets: channel I/O that respects the stop event, and progress beats."""

    def __init__(self, crew: "Crew", name: str):
        self.crew = crew
        self.name = name
        self.doing = "starting"
        self.waiting_on: Optional[str] = None
        self.last_beat = crew.clock.now()
        self.token: Any = None  # its place with the clock (set when the crew runs)

    @property
    def stopping(self) -> bool:
        return self.crew.stop_event.is_set()

    def beat(self, doing: Optional[str] = None) -> None:
        """Reports progress (and optionally what the worker is about to do)."""
        self.last_beat = self.crew.clock.now()
        self.crew.last_progress = self.last_beat
        if doing is not None:
            self.doing = doing

    def check(self) -> None:
        if self.stopping:
            raise Stopped()

    def get(self, channel: Channel) -> Any:
        """Takes the next item; raises `EndOfStream` at the end, `Stopped` if the crew stops."""
        self.waiting_on = f"channel {channel.name} (get)"
        try:
            item = channel.take(self.crew.clock, self.check)
        finally:
            self.waiting_on = None
        if item is _END:
            raise EndOfStream()
        return item

    def put(self, channel: Channel, item: Any) -> None:
        """Adds an item, blocking while the channel is full; raises `Stopped` if the crew stops."""
        self.waiting_on = f"channel {channel.name} (put)"
        try:
            channel.offer(item, self.crew.clock, self.check)
        finally:
            self.waiting_on = None

    def close(self, channel: Channel) -> None:
        """Says this producer is done with `channel`; the last producer ends the stream."""
        if channel.producer_done():
            channel.offer(_END, self.crew.clock, self.check, force=True)

    def wait(self, event: threading.Event, what: str) -> None:
        """Waits for `event`; raises `Stopped` if the crew stops first."""
        self.waiting_on = what
        try:
            while not self.crew.clock.wait(event, _POLL_S):
                self.check()
        finally:
            self.waiting_on = None

    def sleep(self, seconds: float) -> None:
        """Passes `seconds` on the crew's clock; ends early when the crew stops."""
        self.crew.clock.sleep(seconds, self.crew.stop_event)


class Crew:
    """A group of worker threads with one stop event, error hand-off and a watchdog.

    Args:
      name: used in thread names and messages.
      watchdog_s: raise `StallError` after this many seconds without any worker's `beat()`.
      join_timeout_s: how long a stop waits for the threads to finish (real time).
      clock: the run's clock (default: wall time).
    """

    def __init__(self, name: str, watchdog_s: float = 120.0, join_timeout_s: float = 10.0,
                 clock: Clock = WALL):
        self.name = name
        self.clock = clock
        self.watchdog_s = watchdog_s
        self.join_timeout_s = join_timeout_s
        self.stop_event = threading.Event()
        self.last_progress = clock.now()
        self._threads: list[threading.Thread] = []
        self._tracked: list[Channel] = []
        self._finished = 0  # workers whose body has returned or raised (counted before they leave the clock)
        self._workers: list[Worker] = []
        self._error: Optional[tuple[Worker, BaseException]] = None
        self._error_lock = threading.Lock()
        self._interrupted = False
        self._pause: Optional[threading.Event] = None  # what the coordinator waits on between its polls

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers)

    def spawn(self, name: str, body: Callable[..., None], *args: Any, closes: Sequence[Channel] = ()) -> Worker:
        """Registers a worker; it starts when `run()` is called.

        Args:
          name: the worker's name in messages.
          body: `body(worker, *args)`; returning (or hitting the end of its input stream) finishes it.
          closes: channels this worker produces into; they are closed for it when it finishes.
        """
        worker = Worker(self, name)

        def main() -> None:
            _CURRENT.worker = worker
            try:
                self.clock.attach(worker.token)  # waits for its first turn (a simulated clock)
                try:
                    body(worker, *args)
                except EndOfStream:
                    pass
                for channel in closes:
                    worker.close(channel)
                worker.doing = "finished"
            except Stopped:
                worker.doing = "stopped"
            except BaseException as exc:  # handed to the coordinator, never swallowed
                with self._error_lock:
                    if self._error is None:
                        self._error = (worker, exc)
                self.stop_event.set()
            finally:
                with self._error_lock:
                    self._finished += 1
                self._rouse()
                self.clock.leave()

        thread = threading.Thread(target=main, name=f"{self.name}/{name}", daemon=True)
        self._threads.append(thread)
        self._workers.append(worker)
        return worker

    def track(self, channel: Channel) -> Channel:
        """Counts `channel` in `queue_depth()` (the hand-off queues a run reports); returns it."""
        self._tracked.append(channel)
        return channel

    def queue_depth(self) -> Optional[int]:
        """Items waiting in the tracked channels now (None when the crew tracks none)."""
        return sum(channel.qsize() for channel in self._tracked) if self._tracked else None

    def _rouse(self) -> None:
        """Wakes the coordinator now (a worker has finished or failed) rather than at its next poll: a
        crew's end is noticed at once, not up to `_POLL_S` later (50 ms at the end of every epoch)."""
        pause = self._pause
        if pause is not None:
            pause.set()
            self.clock.notify(pause)

    def alive(self) -> list[str]:
        return [t.name for t in self._threads if t.is_alive()]

    def _join(self, raise_if_alive: bool = True) -> None:
        """Stops and joins every started thread; a Ctrl+C meanwhile is held until they are joined.

        With `raise_if_alive=False` (an error is already on its way out) threads still alive after
        `join_timeout_s` are left as they are instead of raising about them.
        """
        self.stop_event.set()
        self.clock.release()  # a simulated clock stops taking turns: every thread runs to its end
        timeout_s = self.join_timeout_s
        deadline = time.monotonic() + timeout_s
        interrupted = False
        for thread in self._threads:
            while thread.ident is not None and thread.is_alive() and time.monotonic() < deadline:
                try:
                    thread.join(max(0.0, deadline - time.monotonic()))
                except KeyboardInterrupt:
                    interrupted = True
        left = self.alive()
        if left and raise_if_alive:
            raise WorkerError(f"{self.name}: threads still alive {timeout_s:.0f}s after stop: {', '.join(left)}")
        if interrupted:
            raise KeyboardInterrupt()

    @contextlib.contextmanager
    def _deferred_interrupts(self):
        """In the main thread: the first SIGINT sets the stop event; a second one acts as before."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            yield
            return

        def on_sigint(signum, frame):
            if self._interrupted:
                previous(signum, frame)
                return
            self._interrupted = True
            self.stop_event.set()

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _raise_worker_error(self) -> None:
        worker, exc = self._error
        raise WorkerError(f"worker {worker.name} failed while {worker.doing}: "
                          f"{type(exc).__name__}: {exc}") from exc

    def _check_stall(self) -> None:
        now = self.clock.now()
        idle_s = now - self.last_progress
        if idle_s < self.watchdog_s:
            return
        stuck = [f"{w.name} stuck while {w.doing} for {now - w.last_beat:.1f}s" for w, t in
                 zip(self._workers, self._threads) if t.is_alive() and w.waiting_on is None]
        waiting = [f"{w.name} waiting on {w.waiting_on}" for w, t in zip(self._workers, self._threads)
                   if t.is_alive() and w.waiting_on is not None]
        raise StallError(f"{self.name}: no progress for {idle_s:.1f}s; "
                         + "; ".join(stuck + waiting or ["no live workers"]))

    def run(self, tick: Optional[Callable[[], None]] = None, tick_every_s: Optional[float] = None,
            wake: Optional[threading.Event] = None) -> None:
        """Starts every worker and coordinates until all have finished (see the module docstring).

        Args:
          tick: called periodically and once at the end (progress, periodic evaluation, checkpoints).
          tick_every_s: how often (default: the clock's `tick_every_s`).
          wake: an event that others `clock.notify` when the coordinator should look (a finished batch).
        """
        clock = self.clock
        tick_every_s = clock.tick_every_s if tick_every_s is None else tick_every_s
        # The pause between polls: set (and the coordinator woken) by `_rouse`, notified on the run's
        # clock by whoever else wakes the coordinator (`wake`: a finished batch).
        pause = self._pause = wake if wake is not None else threading.Event()
        self.last_progress = clock.now()
        for worker in self._workers:
            worker.last_beat = self.last_progress
        next_tick = 0.0
        with self._deferred_interrupts():
            clock.enter(f"{self.name}/coordinator")
            try:
                for worker in self._workers:
                    worker.token = clock.enroll(f"{self.name}/{worker.name}")
                for thread in self._threads:
                    thread.start()
                while self._error is None and not self._interrupted and self._finished < len(self._threads):
                    self._check_stall()
                    if tick is not None and clock.now() >= next_tick:
                        tick()
                        next_tick = clock.now() + tick_every_s
                    if clock.wait(pause, _POLL_S):
                        pause.clear()
            except BaseException:
                try:
                    self._join(raise_if_alive=False)  # the error on its way out is the news
                finally:
                    clock.leave()
                raise
            clock.leave()
            self._join()
        if self._error is not None:
            self._raise_worker_error()
        if self._interrupted:
            raise KeyboardInterrupt()
        if tick is not None:
            tick()


class Window:
    """Bounds run-ahead: item `seq` may start only once *every* item up to `seq - size` has finished.

    Sequence numbers are handed out in order by the data stream, so every wait points at smaller
    numbers and waits cannot form a cycle. With `size == 1` items run strictly one after another.
    (A wait on item `seq - size` alone would not do: items finish out of order, and an older straggler
    could then commit arbitrarily late.)
    """

    def __init__(self, size: int, first_seq: int = 0, clock: Clock = WALL):
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self.clock = clock
        self._done_through = first_seq - 1  # every item <= this has finished
        self._finished: set[int] = set()    # finished items above the low-water mark
        self._changed = threading.Condition()
        self.held = 0       # items acquired and not yet released
        self.peak_held = 0  # the most ever held at once (residual memory is bounded by it)

    def acquire(self, worker: Worker, seq: int) -> None:
        """Blocks `worker` until every item up to `seq - size` has been released."""
        older = seq - self.size
        if self._done_through >= older:
            self._hold()
            return
        worker.waiting_on = f"window (items up to {older} to finish)"
        try:
            with self._changed:
                while self._done_through < older:
                    worker.check()
                    self.clock.wait(self._changed, _POLL_S)
            self._hold()
        finally:
            worker.waiting_on = None

    def _hold(self) -> None:
        with self._changed:
            self.held += 1
            self.peak_held = max(self.peak_held, self.held)

    def release(self, seq: int) -> None:
        with self._changed:
            self.held -= 1
            self._finished.add(seq)
            while self._done_through + 1 in self._finished:
                self._done_through += 1
                self._finished.discard(self._done_through)
            self.clock.notify(self._changed)


class Tickets:
    """The run-ahead bound of a multi-device trainer: one `Window` over the whole run, or one per device.

    `scope="global"`: a batch may start only once every batch up to `seq - size` has finished,
    whichever device ran it: staleness has a hard bound, but a straggler's oldest item holds every
    device back once the others are `size` items ahead. `scope="device"`: each device bounds only its
    own run-ahead (over the batches in the order it took them), so a slow device slows no other one;
    staleness is then bounded only by how far the other devices get while a slow item is in flight.

    Args:
      size: the window size per scope (items).
      first_seq: the first batch seq of the epoch (global scope).
      devices: how many devices take batches.
      clock: the run's clock (the windows' waits).
    """

    def __init__(self, size: int, first_seq: int, devices: int, scope: str = "global", clock: Clock = WALL):
        if scope not in ("global", "device"):
            raise ValueError(f"scope must be 'global' or 'device', got {scope!r}")
        self.scope = scope
        count = 1 if scope == "global" else devices
        self._windows = [Window(size, first_seq=first_seq if scope == "global" else 0, clock=clock)
                         for _ in range(count)]
        self._next = [0] * count
        self._lock = threading.Lock()

    def acquire(self, worker: Worker, device: int, seq: int) -> tuple[int, int]:
        """Blocks until batch `seq`, taken by a worker of `device`, may start; returns its ticket."""
        if self.scope == "global":
            ticket = (0, seq)
        else:
            with self._lock:
                ticket = (device, self._next[device])
                self._next[device] += 1
        self._windows[ticket[0]].acquire(worker, ticket[1])
        return ticket

    def release(self, ticket: tuple[int, int]) -> None:
        self._windows[ticket[0]].release(ticket[1])

    @property
    def size(self) -> int:
        """Items each scope's window holds."""
        return self._windows[0].size

    @property
    def peak_held(self) -> int:
        """The most items any one scope held at once."""
        return max(window.peak_held for window in self._windows)
