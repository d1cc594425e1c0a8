"""Trainers: equivalences with the synchronous reference, update accounting, staleness bounds, failures."""

import threading

import chex
import jax
import numpy as np
import pytest
from conftest import replace, run_steps

from asyncsgd.data import steps_per_epoch
from asyncsgd import trainers
from asyncsgd.assemble import build_session
from asyncsgd.errors import WorkerError
from asyncsgd.evaluation import evaluate
from asyncsgd.trainers import EpochPlan

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_layerwise_matches_sync_after_20_steps(tiny_config, tiny_data, model, optimizer):
    config = replace(tiny_config, model=model, optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.05,
                     weight_decay=1e-4, momentum=0.9)
    sync = run_steps(replace(config, trainer="sync"), tiny_data, 20)
    layerwise = run_steps(replace(config, trainer="layerwise"), tiny_data, 20)
    assert sync.store.versions() == layerwise.store.versions() == [20] * len(sync.store)
    chex.assert_trees_all_close(layerwise.store.params(), sync.store.params(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layerwise.recorder.losses, sync.recorder.losses, rtol=1e-4)
    # The models moved: equality is not the trivial one of two untouched initialisations.
    init = build_session(config, tiny_data.normalized())[0]
    assert not np.allclose(jax.tree_util.tree_leaves(init.store.params())[0],
                           jax.tree_util.tree_leaves(sync.store.params())[0])


@pytest.mark.parametrize("trainer", ["pdasgd", "dasgd"])
@pytest.mark.parametrize("residuals", ["stash", "recompute"])
def test_deterministic_mode_equals_layerwise_exactly(tiny_config, tiny_data, trainer, residuals):
    config = replace(tiny_config, model="cnn", residuals=residuals, forward_threads=1, backward_threads=1,
                     max_inflight=0)
    reference = run_steps(replace(config, trainer="layerwise"), tiny_data, 12)
    threaded = run_steps(replace(config, trainer=trainer), tiny_data, 12)
    if trainer == "pdasgd":  # same units, same order: bit for bit
        chex.assert_trees_all_equal(threaded.store.params(), reference.store.params())
    else:  # the whole-model update is a different compiled function: equal to rounding
        chex.assert_trees_all_close(threaded.store.params(), reference.store.params(), rtol=1e-5, atol=1e-6)
    assert threaded.store.versions() == reference.store.versions()
    assert all(u.staleness == 0 for u in threaded.recorder.updates)


@pytest.mark.parametrize("trainer", ["pdasgd", "dasgd", "hogwild"])
def test_no_lost_updates_and_staleness_within_the_window_bound(tiny_config, tiny_data, trainer):
    config = replace(tiny_config, trainer=trainer, model="mlp", forward_threads=2, backward_threads=6,
                     workers=4, max_inflight=3, batch_size=8)
    steps = steps_per_epoch(len(tiny_data.train_y), 8)
    session = run_steps(config, tiny_data, steps)
    recorder, store = session.recorder, session.store
    assert recorder.steps == steps
    for stage in range(len(store)):  # commits counted by the workers == version advance of the store
        commits = [u for u in recorder.updates if u.stage == stage]
        assert len(commits) == steps == store.read(stage).version
        # every version of the stage was committed to exactly once
        assert sorted(u.version_commit for u in commits) == list(range(steps))
    bound = trainers.get(trainer).staleness_bound(config)
    worst = max(u.staleness for u in recorder.updates)
    assert 0 <= min(u.staleness for u in recorder.updates)
    assert worst <= bound, (worst, bound)
    assert set(u.worker for u in recorder.updates) >= ({"backward-0"} if trainer != "hogwild" else {"hogwild-0"})


@pytest.mark.parametrize("trainer", ["sync", "layerwise", "pdasgd", "dasgd", "hogwild"])
def test_every_trainer_learns_on_synthetic_data(tiny_config, tiny_data, trainer):
    # lr 0.02: at 0.05 with momentum 0.9, D-ASGD's stale block updates can diverge (README).
    config = replace(tiny_config, trainer=trainer, model="mlp", lr=0.02)
    data = tiny_data.normalized()
    session = run_steps(config, tiny_data, steps_per_epoch(len(tiny_data.train_y), config.batch_size))
    _, accuracy = evaluate(session.units, session.store.params(), session.store.states(), data.test_x, data.test_y, 64)
    assert accuracy > 0.5, accuracy  # chance is 0.1; one short epoch, so no tighter bar for async ones
    losses = session.recorder.losses
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert session.units.max_trace_count() == 1  # threads never triggered a recompile


def test_injected_stage_failure_names_stage_and_worker_and_leaves_no_threads(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="pdasgd", model="cnn", backward_threads=3)
    session, _ = build_session(config, tiny_data.normalized())
    original = session.units.backward_update[2]
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise FloatingPointError("injected failure")
        return original(*args)

    session.units.backward_update[2] = failing
    before = set(threading.enumerate())
    with pytest.raises(WorkerError, match=r"backward-\d failed while backward stage block2 .*injected failure"):
        trainers.get("pdasgd").run_epoch(session, EpochPlan(0, 0, 30))
    assert [t for t in threading.enumerate() if t not in before] == []


# -- paper-scale models (tiny inputs of the right kind) ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_images_rgb():
    from asyncsgd.data import synthetic
    return synthetic(num_train=64, num_test=32, input_shape=(8, 8, 3), seed=1)


@pytest.fixture(scope="module")
def tiny_tokens():
    from asyncsgd.data import synthetic_text
    return synthetic_text(num_train=64, num_test=32, max_len=6, vocab_size=11, seed=1)


# ResNet-34 is ResNet-18's basic block, deeper (its construction and size: test_units); ResNet-50's
# bottleneck units are checked stage by stage against the whole model's gradient in test_units. The
# trainers' plumbing with batch norm is the same for every ResNet.
@pytest.mark.parametrize("trainer, model", [("sync", "resnet18"), ("sync", "lstm"), ("pdasgd", "resnet18"),
                                            ("pdasgd", "lstm")])
def test_one_step_of_each_paper_model(tiny_config, tiny_images_rgb, tiny_tokens, model, trainer):
    data = tiny_tokens if model == "lstm" else tiny_images_rgb
    config = replace(tiny_config, trainer=trainer, model=model, max_inflight=0, forward_threads=1,
                     backward_threads=1, dataset="synthetic_text" if model == "lstm" else "synthetic")
    session = run_steps(config, data, 1)
    assert session.store.versions() == [1] * len(session.store)
    assert session.units.max_trace_count() == 1
    assert np.isfinite(session.recorder.losses).all() and len(session.recorder.losses) == 1
    bn_stages = [s for s in session.store.snapshot() if jax.tree_util.tree_leaves(s.state)]
    assert len(bn_stages) == (0 if model == "lstm" else len(session.store) - 1)  # every stage but the head
    assert all(s.state_version == 1 for s in bn_stages)  # one forward pass, one statistics step each


def test_layerwise_matches_sync_with_batch_norm_including_running_statistics(tiny_config, tiny_images_rgb):
    config = replace(tiny_config, model="resnet18", lr=0.05, momentum=0.9)
    sync = run_steps(replace(config, trainer="sync"), tiny_images_rgb, 4)
    layerwise = run_steps(replace(config, trainer="layerwise"), tiny_images_rgb, 4)
    chex.assert_trees_all_close(layerwise.store.params(), sync.store.params(), rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(layerwise.store.states(), sync.store.states(), rtol=1e-4, atol=1e-5)
    assert [s.state_version for s in layerwise.store.snapshot()][:-1] == [4] * (len(layerwise.store) - 1)


@pytest.mark.parametrize("trainer", ["pdasgd", "hogwild"])
def test_concurrent_trainers_lose_no_batch_norm_statistics_step(tiny_config, tiny_images_rgb, trainer):
    # 2 forward x 3 backward threads (or 3 Hogwild workers): every forward pass's statistics step
    # lands in the store (state_version == steps) and the statistics stay finite and moved.
    config = replace(tiny_config, trainer=trainer, model="resnet18", norm="batch", forward_threads=2,
                     backward_threads=3, workers=3, max_inflight=3, lr=0.02)
    session = run_steps(config, tiny_images_rgb, 4)
    snapshot = session.store.snapshot()
    assert [s.version for s in snapshot] == [4] * len(snapshot)
    assert [s.state_version for s in snapshot[:-1]] == [4] * (len(snapshot) - 1)
    _, init_states = session.model.init(jax.random.PRNGKey(config.seed))  # what the store started from
    leaves = jax.tree_util.tree_leaves([s.state for s in snapshot])
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    assert not np.allclose(jax.tree_util.tree_leaves(init_states)[0], leaves[0])
