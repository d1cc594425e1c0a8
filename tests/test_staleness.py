"""Staleness-aware updates: each correction against a hand computation, the identity at staleness 0
(so layerwise still equals sync), the staleness each trainer passes, and what the summary records."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import replace, run_steps

from asyncsgd.config import TrainConfig, validate
from asyncsgd.errors import ConfigError
from asyncsgd.optim import make_optimizer
from asyncsgd.outputs import resume_config
from asyncsgd.run import train
from asyncsgd.staleness import (STALENESS_EMA, PredictionState, delay_compensation, explicit_momentum,
                                predicted_params, scale_by_staleness, staleness_adam, staleness_momentum,
                                weight_prediction)

pytestmark = pytest.mark.timeout(240)

G = {"w": jnp.array([0.5, -2.0, 1.0]), "b": jnp.array([3.0])}
NOW = {"w": jnp.array([1.0, 1.0, -1.0]), "b": jnp.array([0.25])}
READ = {"w": jnp.array([0.0, 2.0, -1.0]), "b": jnp.array([0.5])}


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def test_scale_divides_the_gradient_by_one_plus_the_staleness():
    opt = optax.chain(scale_by_staleness(), optax.sgd(0.1))
    state = opt.init(NOW)
    updates, _ = opt.update(G, state, NOW, staleness=3, params_read=READ)
    chex.assert_trees_all_close(updates, {"w": np.array([-0.0125, 0.05, -0.025]), "b": np.array([-0.075])},
                                rtol=1e-6)
    fresh, _ = opt.update(G, state, NOW, staleness=0, params_read=NOW)
    chex.assert_trees_all_equal(fresh, jax.tree_util.tree_map(lambda g: -0.1 * g, G))


def test_delay_compensation_adds_lambda_g_squared_times_the_drift():
    lam = 0.04
    updates, _ = delay_compensation(lam).update(G, optax.EmptyState(), NOW, staleness=5, params_read=READ)
    # w: g + 0.04 g^2 (now - read) = [0.5 + 0.04*0.25*1, -2 + 0.04*4*(-1), 1 + 0]
    chex.assert_trees_all_close(updates, {"w": np.array([0.51, -2.16, 1.0]), "b": np.array([3.0 + 0.04 * 9 * -0.25])},
                                rtol=1e-6)
    unchanged, _ = delay_compensation(lam).update(G, optax.EmptyState(), NOW, staleness=0, params_read=NOW)
    chex.assert_trees_all_equal(unchanged, G)
    with pytest.raises(ValueError, match="lambda"):
        delay_compensation(-1.0)


def test_momentum_correction_follows_the_running_mean_staleness_by_hand():
    mu, ema = 0.9, STALENESS_EMA
    opt = staleness_momentum(mu)
    state = opt.init(NOW)
    trace = np.zeros(3)
    mean = 0.0
    for count, (s, g) in enumerate([(0, [1.0, 0.0, 2.0]), (6, [0.5, 1.0, -1.0]), (2, [1.0, 1.0, 1.0]),
                                    (20, [-1.0, 0.0, 0.0])], start=1):
        mean = ema * mean + (1 - ema) * s
        s_bar = mean / (1 - ema ** count)
        lag = max(mu / (1 - mu) - s_bar, 0.0)
        mu_e = mu if s_bar == 0 else lag / (1 + lag)
        trace = np.asarray(g) + mu_e * trace
        out, state = opt.update({"w": jnp.asarray(g)}, state, None, staleness=s) if count > 1 else \
            opt.update({"w": jnp.asarray(g)}, opt.init({"w": NOW["w"]}), None, staleness=s)
        np.testing.assert_allclose(np.asarray(out["w"]), trace, rtol=1e-5)
    assert float(explicit_momentum(mu, 9.0)) == 0.0 and float(explicit_momentum(mu, 100.0)) == 0.0
    np.testing.assert_allclose(float(explicit_momentum(mu, 4.0)), 5.0 / 6.0, rtol=1e-6)


def test_momentum_correction_at_staleness_zero_is_optax_momentum_bit_for_bit():
    for nesterov in (False, True):
        ours, theirs = staleness_momentum(0.9, nesterov), optax.trace(0.9, nesterov)
        a, b = ours.init(NOW), theirs.init(NOW)
        for step in range(4):
            g = jax.tree_util.tree_map(lambda x: x * (step + 1), G)
            ua, a = ours.update(g, a, NOW, staleness=0)
            ub, b = theirs.update(g, b, NOW)
            chex.assert_trees_all_equal(ua, ub)


def test_adam_momentum_correction_lowers_the_first_moment_decay_by_hand():
    """`momentum` under Adam: b1 -> explicit_momentum(b1, s_bar), the bias correction by the product of
    the decays used; b2 untouched."""
    b1, b2, eps, ema = 0.9, 0.999, 1e-8, STALENESS_EMA
    opt = staleness_adam(b1, b2, eps)
    state = opt.init({"w": NOW["w"]})
    m, v, product, mean = np.zeros(3), np.zeros(3), 1.0, 0.0
    decays = []
    for count, (s, g) in enumerate([(0, [1.0, 0.0, 2.0]), (6, [0.5, 1.0, -1.0]), (2, [1.0, 1.0, 1.0]),
                                    (20, [-1.0, 0.5, 0.0])], start=1):
        g = np.asarray(g)
        mean = ema * mean + (1 - ema) * s
        s_bar = mean / (1 - ema ** count)
        lag = max(b1 / (1 - b1) - s_bar, 0.0)
        decay = b1 if s_bar == 0 else lag / (1 + lag)
        decays.append(decay)
        m, v, product = (1 - decay) * g + decay * m, (1 - b2) * g * g + b2 * v, product * decay
        expected = (m / (1 - product)) / (np.sqrt(v / (1 - b2 ** count)) + eps)
        out, state = opt.update({"w": jnp.asarray(g)}, state, None, staleness=s)
        np.testing.assert_allclose(np.asarray(out["w"]), expected, rtol=1e-5, atol=1e-7)
    assert decays[0] == b1 and 0 < decays[3] < decays[1] < decays[2] < b1, decays  # it follows the mean staleness
    with pytest.raises(ValueError, match="b1"):
        staleness_adam(1.0)


def test_adam_momentum_correction_at_staleness_zero_is_optax_adam():
    ours, theirs = staleness_adam(), optax.scale_by_adam()
    a, b = ours.init(NOW), theirs.init(NOW)
    for step in range(5):
        g = jax.tree_util.tree_map(lambda x: x * (step + 1) - 0.5 * step, G)
        ua, a = ours.update(g, a, NOW, staleness=0)
        ub, b = theirs.update(g, b, NOW)
        chex.assert_trees_all_close(ua, ub, rtol=1e-5)  # 1 - prod(b1) against 1 - b1^t: rounding only


def test_weight_prediction_reads_ahead_by_the_running_mean_staleness_by_hand():
    """predict changes no update; its state holds (w + u) + s_bar u, s_bar the running mean staleness
    (bias-corrected, this update's included), and at s_bar = 0 exactly the new parameters."""
    ema, lr = STALENESS_EMA, 0.1
    opt, plain = optax.chain(optax.sgd(lr), weight_prediction()), optax.sgd(lr)
    w = np.array([1.0, -1.0, 0.5], np.float32)
    state, plain_state = opt.init({"w": jnp.asarray(w)}), plain.init({"w": jnp.asarray(w)})
    assert predicted_params({"w": w}, state) is state[1].ahead  # before any update: the initial parameters
    mean = 0.0
    for count, (s, g) in enumerate([(0, [1.0, 0.0, 2.0]), (6, [0.5, 1.0, -1.0]), (2, [1.0, 1.0, 1.0])], start=1):
        params = {"w": jnp.asarray(w)}
        out, state = opt.update({"w": jnp.asarray(g)}, state, params, staleness=s)
        ref, plain_state = plain.update({"w": jnp.asarray(g)}, plain_state, params)
        chex.assert_trees_all_equal(out, ref)  # the update itself is untouched
        mean = ema * mean + (1 - ema) * s
        s_bar = mean / (1 - ema ** count)
        u = -lr * np.asarray(g, np.float32)
        w = w + u
        ahead = np.asarray(predicted_params(None, state)["w"])
        if count == 1:
            np.testing.assert_array_equal(ahead, w)  # s_bar = 0: the new parameters, bit for bit
        else:
            np.testing.assert_allclose(ahead, w + s_bar * u, rtol=1e-5, atol=1e-6)
            assert s_bar > 0 and not np.allclose(ahead, w)
    assert isinstance(state[1], PredictionState)
    assert predicted_params("mine", optax.sgd(lr).init({"w": jnp.asarray(w)})) == "mine"  # no predict: unchanged


def test_every_view_reads_the_predicted_parameters_and_commits_keep_the_real_ones():
    """With predict, a device view (home and another device) hands forward passes the stage's
    predicted parameters; without it, the current ones; the store's commits apply to the current ones."""
    from asyncsgd.store import ParamStore
    from asyncsgd.trainers.placement import DeviceView
    opt = make_optimizer(TrainConfig(staleness_correction="predict", lr=0.1, momentum=0.0, weight_decay=0.0), 10)
    params = {"w": jnp.ones(3)}
    store = ParamStore(["a"], [params], [opt.init(params)])
    grads = {"w": jnp.array([1.0, 2.0, -1.0])}

    def update(p, o):
        updates, o = opt.update(grads, o, p, staleness=4, params_read=p)
        return optax.apply_updates(p, updates), o
    store.commit(0, update)
    store.commit(0, update)
    now = np.asarray(store.read(0).params["w"])
    np.testing.assert_allclose(now, 1.0 - 0.2 * np.array([1.0, 2.0, -1.0]), rtol=1e-6)
    expected = now + 4.0 * -0.1 * np.array([1.0, 2.0, -1.0])  # s_bar 4 (every staleness 4), u = -0.1 g
    devices = jax.devices()[:2]
    assert len(devices) == 2, "needs two (virtual) devices"
    for index in (0, 1):
        read = DeviceView(store, devices, index, predict=True).read(0)
        np.testing.assert_allclose(np.asarray(read.params["w"]), expected, rtol=1e-5, atol=1e-6)
        assert read.params["w"].devices() == {devices[index]} and read.version == 2
        np.testing.assert_array_equal(np.asarray(DeviceView(store, devices, index).read(0).params["w"]), now)


def test_lap_averaging_moves_the_predicted_parameters_with_the_parameters(tiny_config, tiny_data):
    """LAP-SGD with predict: its workers read the predicted parameters of their copy, and an averaging
    round (which moves a copy without an update) moves them by the same amount, so what a worker reads
    keeps its lead over the copy's parameters."""
    from asyncsgd.staleness import predicted_params
    from asyncsgd.trainers.lapsgd import average_copies
    config = replace(tiny_config, trainer="lapsgd", devices=2, staleness_correction="scale,predict", out=None,
                     workers=2, max_inflight=2, averaging_warmup=0, averaging_period=1000)  # copies drift apart
    session = run_steps(config, tiny_data, 16)

    def leads():
        return [[np.asarray(a) - np.asarray(p) for a, p in zip(
            jax.tree_util.tree_leaves(predicted_params(slot.params, slot.opt_state)),
            jax.tree_util.tree_leaves(slot.params))] for store in session.replicas for slot in store.slots()]
    before = leads()
    params_before = [np.asarray(x) for store in session.replicas for x in jax.tree_util.tree_leaves(store.params())]
    assert any(np.abs(d).max() > 0 for stage in before for d in stage), "nothing predicted: the check is empty"
    average_copies(session)
    params_after = [np.asarray(x) for store in session.replicas for x in jax.tree_util.tree_leaves(store.params())]
    moved = max(np.abs(a - b).max() for a, b in zip(params_before, params_after))
    assert moved > 1e-3, f"averaging moved the copies by {moved} only: the check would prove nothing"
    for stage_before, stage_after in zip(before, leads()):
        for a, b in zip(stage_before, stage_after):
            np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.parametrize("correction", ["none", "scale", "dc", "momentum", "scale,momentum", "predict",
                                        "scale,momentum,predict"])
def test_layerwise_still_equals_sync_under_every_correction(tiny_config, tiny_data, correction):
    config = replace(tiny_config, out=None, staleness_correction=correction, weight_decay=1e-3)
    sync = run_steps(replace(config, trainer="sync"), tiny_data, 6)
    layerwise = run_steps(replace(config, trainer="layerwise"), tiny_data, 6)
    chex.assert_trees_all_equal(jax.device_get(layerwise.store.params()), jax.device_get(sync.store.params()))


def test_the_store_reports_the_staleness_of_the_update_it_is_applying():
    from asyncsgd.store import ParamStore
    store = ParamStore(["a"], [jnp.zeros(())], [None])
    for _ in range(3):
        store.commit(0, lambda p, o: (p + 1, o))
    seen = []
    store.commit(0, lambda p, o: (seen.append(store.staleness(0, 1)), (p, o))[1])
    assert seen == [2] and store.staleness(0, 1) == 3


def _spying(seen: list):
    """An optax transformation that records (stage shape, staleness, whether params_read differs from
    params) of every update it is given, from inside the compiled unit (jax.debug.callback)."""
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, staleness=None, params_read=None, **extra):
        key = str(jax.tree_util.tree_map(lambda x: x.shape, updates))
        drift = sum(jnp.sum(jnp.abs(a - b)) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                              jax.tree_util.tree_leaves(params_read)))
        jax.debug.callback(lambda s, d: seen.append((key, int(s), float(d))), staleness, drift)
        return updates, state
    return optax.GradientTransformationExtraArgs(init, update)


@pytest.mark.parametrize("trainer,devices,correction", [("pdasgd", 1, "dc"), ("pdasgd", 2, "dc"),
                                                         ("dasgd", 2, "scale"), ("hogwild", 2, "dc"),
                                                         ("lapsgd", 2, "dc")])
def test_the_optimiser_sees_the_staleness_the_recorder_records(tiny_config, tiny_data, monkeypatch, trainer,
                                                               devices, correction):
    """Every update's staleness reaches the optimiser exactly as updates.csv records it (per stage, as
    multisets), and under dc the parameters it was computed at differ from the current ones exactly
    when it is stale (they are the read version's, not the current)."""
    import asyncsgd.assemble
    seen: list = []
    real = asyncsgd.assemble.make_optimizer
    monkeypatch.setattr(asyncsgd.assemble, "make_optimizer",
                        lambda config, total: optax.chain(_spying(seen), real(config, total)))
    # No warm-up: its first update, at rate 0, would leave a stale gradient's parameters unmoved.
    config = replace(tiny_config, trainer=trainer, devices=devices, staleness_correction=correction, out=None,
                     max_inflight=4, backward_threads=3, workers=3, window="global", warmup_steps=0)
    session = run_steps(config, tiny_data, 24)
    jax.effects_barrier()
    shapes = [str(jax.tree_util.tree_map(lambda x: x.shape, p)) for p in session.store.params()]
    recorded = sorted((shapes[u.stage], u.version_commit - u.version_read) for u in session.recorder.updates)
    warm = len(seen) - len(recorded)  # the warm-up calls (staleness 0) come first
    assert warm >= 0
    assert sorted((key, s) for key, s, _ in seen[warm:]) == recorded
    assert max(s for _, s in recorded) > 0, "no stale update: the check would prove nothing"
    if correction == "dc":
        if trainer != "lapsgd":  # (LAP averaging moves parameters without a version: drift at staleness 0)
            assert all(drift == 0 for _, s, drift in seen[warm:] if s == 0)
        assert all(drift > 0 for _, s, drift in seen[warm:] if s > 0)


def test_summary_records_the_correction_and_defaults_reach_the_config(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="pdasgd", staleness_correction="momentum", epochs=1)
    summary = train(config, tiny_data)
    record = summary["staleness_correction"]
    assert record["name"] == "momentum" and record["momentum"] == 0.9
    means, momenta = record["mean_staleness_by_stage"], record["explicit_momentum_by_stage"]
    assert len(means) == len(summary["updates_per_stage"]) and all(m is not None and m >= 0 for m in means)
    assert all(0.0 <= m <= 0.9 for m in momenta)
    assert np.isfinite(summary["train_loss"])
    saved = json.load(open(f"{config.out}/summary.json"))
    assert saved["staleness_correction"] == record


def test_adam_with_the_default_correction_trains_on_two_devices(tiny_config, tiny_data):
    """`--optimizer adam` with default flags: the default's `momentum` corrects Adam's b1 (it used to
    refuse to start); the summary records the decays it ended at."""
    config = replace(tiny_config, trainer="pdasgd", optimizer="adam", lr=0.01, devices=2, max_inflight=2)
    assert config.staleness_correction == TrainConfig().staleness_correction and "momentum" in config.staleness_correction
    summary = train(validate(config), tiny_data)
    record = summary["staleness_correction"]
    assert record["momentum"] == 0.9 and np.isfinite(summary["train_loss"])
    means, decays = record["mean_staleness_by_stage"], record["explicit_momentum_by_stage"]
    assert all(m is not None for m in means) and max(means) > 0, "no stale update: nothing was corrected"
    assert all(0.0 <= d < 0.9 for d, m in zip(decays, means) if m > 0)
    assert summary["test_accuracy"] > 0.3  # it learned (10 classes: chance is 0.1)


def test_summary_records_how_far_ahead_a_predicting_run_read(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="pdasgd", staleness_correction="scale,predict", epochs=1, devices=2,
                     max_inflight=2)
    summary = train(config, tiny_data)
    horizons = summary["staleness_correction"]["prediction_horizon_by_stage"]
    assert len(horizons) == len(summary["updates_per_stage"]) and all(h is not None and h >= 0 for h in horizons)
    assert max(horizons) > 0, "no stale update: the prediction was never exercised"
    assert np.isfinite(summary["train_loss"])


def test_bad_corrections_are_refused(tiny_config):
    """(The CLI's one-line form of these is in test_cli's table of bad values.)"""
    with pytest.raises(ConfigError, match="--dc-lambda"):
        validate(replace(tiny_config, dc_lambda=-0.1))
    with pytest.raises(ConfigError, match="--staleness-correction: unknown value 'fast'"):
        validate(replace(tiny_config, staleness_correction="fast"))


def test_a_run_saved_before_corrections_existed_resumes_without_one(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    saved = dataclasses.asdict(TrainConfig(dataset="synthetic", out=str(out)))
    del saved["staleness_correction"], saved["dc_lambda"]
    (out / "config.json").write_text(json.dumps(saved))
    assert resume_config(str(out)).staleness_correction == "none"


def test_none_keeps_the_rule_state_so_old_checkpoints_load():
    config = TrainConfig(weight_decay=0.0, staleness_correction="none")
    state = make_optimizer(config, 100).init(NOW)
    reference = optax.sgd(optax.constant_schedule(0.05), momentum=0.9).init(NOW)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(reference)


def test_a_diverged_run_is_told_what_to_try_first():
    from asyncsgd import trainers
    from asyncsgd.outputs import divergence_advice
    config = TrainConfig(trainer="pdasgd", staleness_correction="none")
    assert divergence_advice(config, trainers.get("pdasgd")).startswith(
        "try first --staleness-correction scale,momentum")
    sync = TrainConfig(trainer="sync", staleness_correction="none", lr=0.1)
    assert divergence_advice(sync, trainers.get("sync")).startswith("try first --lr 0.05 (half)")


def test_corrections_combine_and_none_stands_alone():
    from asyncsgd.staleness import parse_corrections
    assert parse_corrections("scale,momentum") == {"scale", "momentum"} and parse_corrections("none") == set()
    for bad, fragment in (("none,scale", "cannot be combined"), ("scale,fast", "unknown value 'fast'")):
        with pytest.raises(ValueError, match=fragment):
            parse_corrections(bad)
    # scale then momentum: the adapted trace of g / (1 + s), by hand for two updates.
    opt = make_optimizer(TrainConfig(staleness_correction="scale,momentum", lr=0.1, momentum=0.9), 10)
    state = opt.init({"w": jnp.zeros(2)})
    g = {"w": jnp.array([1.0, -2.0])}
    first, state = opt.update(g, state, {"w": jnp.zeros(2)}, staleness=0, params_read={"w": jnp.zeros(2)})
    np.testing.assert_allclose(first["w"], [-0.1, 0.2], rtol=1e-6)
    second, _ = opt.update(g, state, {"w": jnp.zeros(2)}, staleness=3, params_read={"w": jnp.zeros(2)})
    ema = STALENESS_EMA
    s_bar = (1 - ema) * 3 / (1 - ema ** 2)
    lag = 9.0 - s_bar
    mu_e = lag / (1 + lag)
    np.testing.assert_allclose(second["w"], [-0.1 * (0.25 + mu_e * 1.0), -0.1 * (-0.5 + mu_e * -2.0)], rtol=1e-5)
