"""ParamStore: versions are monotone, concurrent commits lose nothing, snapshots are consistent."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

from asyncsgd.store import ParamStore

pytestmark = pytest.mark.timeout(60)


def _store(stages=3):
    return ParamStore([f"s{i}" for i in range(stages)], [jnp.zeros(()) for _ in range(stages)],
                      [jnp.zeros(()) for _ in range(stages)])


def test_commit_bumps_version_and_returns_both_slots():
    store = _store()
    commit = store.commit(1, lambda p, o: (p + 1, o + 2, "extra"))
    assert (commit.before.version, commit.after.version, commit.extra) == (0, 1, "extra")
    assert store.read(1).version == 1 and float(store.read(1).params) == 1.0
    assert store.versions() == [0, 1, 0]


def test_reads_are_immutable_snapshots():
    store = _store()
    before = store.read(0)
    store.commit(0, lambda p, o: (p + 5, o))
    assert float(before.params) == 0.0 and before.version == 0
    assert float(store.read(0).params) == 5.0


def test_eight_threads_committing_to_the_same_stages_lose_nothing():
    store = _store(stages=2)
    commits_per_thread = 200
    seen_versions = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def committer(index):
        start.wait()
        for n in range(commits_per_thread):
            stage = n % 2
            # A read-modify-write that would lose increments without the per-stage lock.
            commit = store.commit(stage, lambda p, o: (p + 1, o))
            seen_versions[index].append((stage, commit.after.version))

    threads = [threading.Thread(target=committer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads)
    total = 8 * commits_per_thread
    assert store.versions() == [total // 2, total // 2]
    assert [float(p) for p in store.params()] == [total / 2, total / 2]
    for stage in (0, 1):  # every version handed out exactly once per stage
        versions = sorted(v for per_thread in seen_versions for s, v in per_thread if s == stage)
        assert versions == list(range(1, total // 2 + 1))
    for per_thread in seen_versions:  # monotone as each thread sees them
        for stage in (0, 1):
            mine = [v for s, v in per_thread if s == stage]
            assert mine == sorted(mine)


def test_commit_all_is_atomic_with_respect_to_snapshots():
    store = _store(stages=4)
    stop = threading.Event()
    torn = []

    def writer():
        while not stop.is_set():
            store.commit_all(lambda ps, os, sts: ([p + 1 for p in ps], os, sts, None))

    def reader():
        while not stop.is_set():
            versions = [slot.version for slot in store.snapshot()]
            if len(set(versions)) != 1:
                torn.append(versions)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert not torn
    assert len(set(store.versions())) == 1 and store.versions()[0] > 0
    np.testing.assert_allclose([float(p) for p in store.params()], [store.versions()[0]] * 4)


def test_failed_update_leaves_the_slot_unchanged():
    store = _store()

    def broken(p, o):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.commit(0, broken)
    assert store.read(0).version == 0
    store.commit(0, lambda p, o: (p, o))  # the lock was released
    assert store.read(0).version == 1


def test_state_commits_lose_nothing_and_version_separately_from_params():
    # Eight threads each add 1 to stage 0's state 200 times through commit_state while another
    # thread commits parameters: every state step lands, and the two versions count their own commits.
    store = ParamStore(["s0"], [jnp.zeros(())], [jnp.zeros(())], [{"mean": jnp.zeros(())}])
    errors = []

    def bump_state():
        try:
            for _ in range(200):
                store.commit_state(0, lambda st: {"mean": st["mean"] + 1})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def bump_params():
        for _ in range(100):
            store.commit(0, lambda p, o: (p + 1, o))

    threads = [threading.Thread(target=bump_state) for _ in range(8)] + [threading.Thread(target=bump_params)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    slot = store.read(0)
    assert (slot.version, slot.state_version) == (100, 1600)
    assert float(slot.state["mean"]) == 1600.0 and float(slot.params) == 100.0


def test_commit_all_bumps_state_version_only_for_stages_with_new_state():
    store = ParamStore(["a", "b"], [jnp.zeros(()), jnp.zeros(())], [jnp.zeros(()), jnp.zeros(())],
                       [{}, {"mean": jnp.zeros(())}])
    store.commit_all(lambda ps, os, sts: (ps, os, [{}, {"mean": sts[1]["mean"] + 1}], None))
    assert [s.state_version for s in store.snapshot()] == [0, 1] and store.versions() == [1, 1]
    store.commit_all(lambda ps, os, sts: (ps, os, sts, None))  # same objects back: no state change
    assert [s.state_version for s in store.snapshot()] == [0, 1] and store.versions() == [2, 2]
