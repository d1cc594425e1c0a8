"""The worker skeleton: errors reach the coordinator with names, stalls are caught, streams end cleanly."""

import signal
import threading
import time

import pytest

from asyncsgd.clock import WallClock
from asyncsgd.workers import Channel, Crew, StallError, Window, WorkerError

pytestmark = pytest.mark.timeout(60)


def _producer(worker, out, count):
    for n in range(count):
        worker.beat(f"producing {n}")
        worker.put(out, n)


def _consumer(worker, inp, sink):
    while True:
        item = worker.get(inp)
        worker.beat(f"consuming {item}")
        sink.append(item)


def test_stream_with_several_producers_and_consumers_delivers_everything_once():
    crew = Crew("t", watchdog_s=30)
    channel = Channel("numbers", maxsize=2, producers=3)
    sink = []
    for index in range(3):
        crew.spawn(f"p{index}", _producer, channel, 50, closes=[channel])
    for index in range(4):
        crew.spawn(f"c{index}", _consumer, channel, sink)
    crew.run()
    assert sorted(sink) == sorted(list(range(50)) * 3)
    assert crew.alive() == []


class _RecordingClock(WallClock):
    """The wall clock, recording how each of the coordinator's waits ended (True: woken)."""

    def __init__(self):
        self.coordinator_waits = []

    def wait(self, waitable, timeout):
        woken = super().wait(waitable, timeout)
        if threading.current_thread() is threading.main_thread():
            self.coordinator_waits.append(woken)
        return woken


def test_the_coordinator_is_woken_when_the_last_worker_finishes():
    # Without the wake-up the coordinator noticed a finished crew only when its 50 ms poll ran out
    # (measured: up to 50 ms at the end of every epoch, a third of a 30-step bench round).
    clock = _RecordingClock()
    crew = Crew("t", watchdog_s=30, clock=clock)
    crew.spawn("slow", lambda worker: worker.sleep(0.12))  # outlasts two polls
    crew.run()
    assert len(clock.coordinator_waits) >= 2
    assert clock.coordinator_waits[-1] is True
    assert crew.alive() == []


def test_worker_exception_surfaces_with_worker_and_activity_and_stops_everyone():
    crew = Crew("t", watchdog_s=30)
    channel = Channel("numbers", maxsize=1)

    def failing(worker, inp):
        while True:
            item = worker.get(inp)
            worker.beat(f"backward stage block2 (item {item})")
            if item == 3:
                raise ValueError("injected")

    crew.spawn("producer", _producer, channel, 10_000, closes=[channel])
    crew.spawn("backward-0", failing, channel)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"backward-0 failed while backward stage block2 \(item 3\).*injected"):
        crew.run()
    assert time.monotonic() - start < 5
    assert crew.alive() == []


def test_watchdog_names_the_stuck_worker():
    crew = Crew("t", watchdog_s=0.5, join_timeout_s=0.5)
    release = threading.Event()
    channel = Channel("c", maxsize=1)

    def stuck(worker):
        worker.beat("computing forever")
        release.wait(10)  # not a channel wait: the watchdog must call this one stuck

    crew.spawn("forward-0", stuck)
    crew.spawn("backward-0", _consumer, channel, [])
    try:
        with pytest.raises(StallError, match=r"forward-0 stuck while computing forever.*backward-0 waiting on channel c"):
            crew.run()
        assert crew.alive() == ["t/forward-0"]  # truly stuck: reported, not waited for forever
    finally:
        release.set()


def test_keyboard_interrupt_in_the_coordinator_stops_workers():
    crew = Crew("t", watchdog_s=30)
    channel = Channel("c", maxsize=1)
    crew.spawn("producer", _producer, channel, 10 ** 9, closes=[channel])
    crew.spawn("consumer", _consumer, channel, [])
    ticks = []

    def tick():
        ticks.append(1)
        if len(ticks) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        crew.run(tick=tick, tick_every_s=0.01)
    assert crew.alive() == []


def test_channel_rejects_zero_capacity():
    with pytest.raises(ValueError, match="maxsize"):
        Channel("c", 0)


def test_window_lets_item_start_only_after_every_item_up_to_minus_size_finished():
    crew = Crew("t", watchdog_s=30)
    window = Window(size=2)
    log = []
    batches = Channel("seq", maxsize=8)

    def feeder(worker):
        for seq in range(12):
            worker.put(batches, seq)

    def runner(worker):
        while True:
            seq = worker.get(batches)
            window.acquire(worker, seq)
            log.append(("start", seq))
            time.sleep(0.002 * (seq % 3) + (0.05 if seq == 1 else 0.0))  # item 1 straggles
            log.append(("end", seq))
            window.release(seq)

    crew.spawn("feeder", feeder, closes=[batches])
    for index in range(4):
        crew.spawn(f"r{index}", runner)
    crew.run()
    position = {event: i for i, event in enumerate(log)}
    for seq in range(2, 12):
        for older in range(seq - 1):
            assert position[("end", older)] < position[("start", seq)]


def test_ctrl_c_while_threads_are_starting_still_joins_every_thread():
    # The interrupt arrives while the coordinator is still starting workers (the first worker sends
    # it); it must neither leave started threads running nor skip the stop: a daemon thread left in
    # an XLA call at interpreter exit aborts the process (seen in CI as exit -6 instead of 130).
    import _thread
    crew = Crew("t", watchdog_s=30)
    steps = []

    def spinner(worker, index):
        if index == 0:
            _thread.interrupt_main()
        while True:
            worker.check()
            steps.append(index)
            time.sleep(0.001)

    for index in range(16):
        crew.spawn(f"w{index}", spinner, index)
    with pytest.raises(KeyboardInterrupt):
        crew.run()
    assert crew.alive() == []
    assert {w.doing for w in crew.workers} <= {"stopped", "starting"}


def test_ctrl_c_defers_to_a_clean_stop_and_then_raises():
    import _thread
    crew = Crew("t", watchdog_s=30)
    channel = Channel("c", maxsize=1)
    received = []
    crew.spawn("producer", _producer, channel, 10 ** 9, closes=[channel])
    crew.spawn("consumer", _consumer, channel, received)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        crew.run()
    assert time.monotonic() - start < 5 and crew.alive() == [] and len(received) > 0
    assert {w.doing for w in crew.workers} == {"stopped"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run
