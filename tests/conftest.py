"""Strict JAX for every test, several virtual CPU devices, and shared tiny fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")


def _share_compilations() -> None:
    """One persistent XLA compilation cache for this test run (and the CLI processes it starts, which
    inherit the environment): the suite builds the same units for the same shapes in test after test,
    and a cached executable loads in a fraction of its compile time (measured: a CNN session's units 11.5 s
    -> 1.8 s the second time). Tracing still happens per function, so trace counts are unchanged; the
    directory is new for each run and removed at its end."""
    import atexit
    import shutil
    import tempfile
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    path = tempfile.mkdtemp(prefix="asyncsgd-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    atexit.register(shutil.rmtree, path, ignore_errors=True)


_share_compilations()

import dataclasses  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from asyncsgd.config import TrainConfig  # noqa: E402
from asyncsgd.data import synthetic  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def tiny_data():
    """A learnable 8x8x1 synthetic dataset: small enough that each unit compiles in well under a second."""
    return synthetic(num_train=512, num_test=128, input_shape=(8, 8, 1), seed=0)


@pytest.fixture
def tiny_config(tmp_path):
    """A config for seconds-long runs on `tiny_data`."""
    return TrainConfig(model="mlp", dataset="synthetic", epochs=1, batch_size=16, lr=0.05, progress=False,
                       eval_batch_size=64, watchdog_s=60.0, out=str(tmp_path / "run"))


def replace(config, **changes):
    return dataclasses.replace(config, **changes)


def popen_with_sigint(cmd, **kwargs):
    """`subprocess.Popen` whose child has Ctrl+C at its default. A suite started as a background job
    (`make test &`) inherits SIGINT *ignored*, and exec keeps an ignored signal ignored, so a child would
    rightly ignore the test's SIGINT; a handled signal is reset to default by exec instead."""
    import signal
    import subprocess
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_or_dump(proc, timeout_s: float, what: str) -> None:
    """Waits for `proc` to exit; if it does not, fails with every thread's stack (the CLI dumps them
    on SIGUSR1) so a hang says where it is."""
    import signal
    import subprocess
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        pytest.fail(f"no exit {timeout_s:.0f} s after {what}; stacks:\n" + proc.communicate()[1][-6000:])


def interrupt_run(argv, out, signum, train_records: int):
    """Starts `asyncsgd` with `argv` (Ctrl+C at its default), waits until `out/metrics.jsonl` holds
    `train_records` train records, sends `signum` and waits for the exit (failing with the thread
    stacks after 10 s). Returns the finished process and the seconds from the signal to its exit."""
    import subprocess
    import sys
    proc = popen_with_sigint([sys.executable, "-m", "asyncsgd", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count('"train"') >= train_records):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signum)
        wait_or_dump(proc, 10, f"signal {signum}")
        return proc, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


def train_steps(config, dataset, steps):
    """Builds a session for `config` on `dataset` (raw), trains `steps` steps of the first epoch and
    returns the session (store, recorder, units) and the epoch's `EpochResult`."""
    from asyncsgd import trainers
    from asyncsgd.assemble import build_session
    session, _ = build_session(config, dataset.normalized())
    result = trainers.get(config.trainer).run_epoch(session, trainers.EpochPlan(0, 0, steps))
    session.recorder.tick()
    return session, result


def run_steps(config, dataset, steps):
    """`train_steps`' session alone."""
    return train_steps(config, dataset, steps)[0]


def has_fashion_mnist() -> bool:
    """True when the Debian package's files exist; with $ASYNCSGD_REQUIRE_REALDATA set (CI, `make
    test`) their absence fails the real-data tests instead of skipping them."""
    present = all(os.path.exists(os.path.join(FASHION_DIR, f)) for f in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    if not present and os.environ.get("ASYNCSGD_REQUIRE_REALDATA"):
        pytest.fail(f"Fashion-MNIST is required (ASYNCSGD_REQUIRE_REALDATA) but missing from {FASHION_DIR}")
    return present
