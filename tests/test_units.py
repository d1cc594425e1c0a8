"""Per-stage units: gradients equal the whole-model gradient; each unit compiles once; the conv is exact."""

import dataclasses
import os
import subprocess
import sys
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from asyncsgd.models import cross_entropy, get_model, onednn
from asyncsgd.errors import ConfigError
from asyncsgd.models.conv import (CHOICES as conv_choices, CHUNK_BYTES, backend_for, conv2d, counting_flops,
                                  describe_choices, same_padding, using, weight_grad, weight_grad_chunk)
from asyncsgd.units import Units


def _stagewise_grads(units, params, states, x, labels):
    residuals, new_states = [], []
    for index, forward in enumerate(units.forward):
        x, res, new_state = forward(params[index], states[index], x)
        residuals.append(res)
        new_states.append(new_state)
    loss, dy = units.loss_grad(x, labels)
    grads = [None] * len(params)
    for index in reversed(range(len(params))):
        grads[index], dy = units.backward[index](params[index], residuals[index], dy)
    return loss, grads, new_states


def _tiny(model_name, batch=4, **options):
    """A model on a tiny input of the right kind, its variables, an input batch and labels."""
    if model_name == "lstm":
        model = get_model("lstm", input_shape=(6,), num_classes=2, vocab_size=11)
        x = jax.random.randint(jax.random.PRNGKey(1), (batch, 6), 0, 11)
        labels = jnp.arange(batch) % 2
    else:
        shape = (8, 8, 3) if model_name.startswith("resnet") else (8, 8, 1)
        model = get_model(model_name, input_shape=shape, num_classes=10, **options)
        if model_name == "resnet50":  # each kind of bottleneck stage once: widening, identity, strided (and
            # the head), not all 16 blocks, whose compilation took most of this test's 27 s
            by_name = dict(zip(model.stage_names, model.stages))
            kept = ("stem", "layer1.0", "layer1.1", "layer2.0", "head")
            model = dataclasses.replace(model, stages=tuple(by_name[name] for name in kept))
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, *shape))
        labels = jnp.arange(batch) * 3 % 10
    params, states = model.init(jax.random.PRNGKey(0))
    return model, params, states, x, labels


# Every kind of stage; the residual mode itself is checked on the cheaper models (ResNet-50 compiles
# slowly; ResNet-34 is ResNet-18's basic block, deeper, so it adds no kind of stage).
@pytest.mark.parametrize("model_name, options, residuals", [
    (name, {}, mode) for name in ("mlp", "cnn", "resnet18", "lstm") for mode in ("stash", "recompute")
] + [("resnet18", {"norm": "group"}, "stash"), ("resnet50", {}, "stash")])
def test_stage_gradients_equal_whole_model_grad(model_name, options, residuals):
    model, params, states, x, labels = _tiny(model_name, **options)
    units = Units(model, optax.sgd(0.1), residuals)
    loss, grads, new_states = _stagewise_grads(units, params, states, x, labels)
    (ref_loss, ref_states), ref_grads = jax.value_and_grad(model.loss, has_aux=True)(params, states, x, labels)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(new_states, ref_states, rtol=1e-5, atol=1e-6)


def test_batch_norm_state_moves_in_training_and_is_used_in_evaluation():
    model, params, states, x, labels = _tiny("resnet18", batch=8)
    units = Units(model, optax.sgd(0.1))
    _, _, new_states = _stagewise_grads(units, params, states, x, labels)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), states, new_states)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # the running statistics moved
    mask = jnp.ones(8)
    before = units.evaluate(params, states, x, labels, mask)
    after = units.evaluate(params, new_states, x, labels, mask)
    assert abs(float(before[0]) - float(after[0])) > 1e-4  # evaluation reads the running statistics
    chex.assert_trees_all_equal(units.evaluate(params, new_states, x, labels, mask), after)  # and only them


def test_merge_state_applies_a_pass_to_the_current_state_without_losing_others():
    from asyncsgd.models import BN_MOMENTUM
    model, params, states, x, labels = _tiny("resnet18", batch=8)
    stage = model.stages[1]
    read = states[1]
    _, new = stage.apply(params[1], read, jax.nn.relu(x[..., :1].repeat(64, -1)), True)
    # Another pass moved the state meanwhile; merging must equal the EMA step applied to that state.
    current = jax.tree_util.tree_map(lambda a: a + 0.5, read)
    merged = model.merge_state(current, read, new)
    batch_stat = jax.tree_util.tree_map(lambda n, r: (n - BN_MOMENTUM * r) / (1 - BN_MOMENTUM), new, read)
    expected = jax.tree_util.tree_map(lambda c, b: BN_MOMENTUM * c + (1 - BN_MOMENTUM) * b, current, batch_stat)
    chex.assert_trees_all_close(merged, expected, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(model.merge_state(read, read, new), new)  # one pass at a time: exact


def test_first_stage_returns_no_input_gradient():
    model = get_model("mlp", input_shape=(8, 8, 1))
    params, states = model.init(jax.random.PRNGKey(0))
    units = Units(model, optax.sgd(0.1))
    y, res, _ = units.forward[0](params[0], states[0], jnp.ones((2, 8, 8, 1)))
    grads, dx = units.backward[0](params[0], res, jnp.ones_like(y))
    assert dx is None
    chex.assert_trees_all_equal_shapes(grads, params[0])


def test_backward_update_equals_backward_then_update():
    model = get_model("mlp", input_shape=(8, 8, 1))
    params, states = model.init(jax.random.PRNGKey(0))
    units = Units(model, optax.adam(1e-2))
    opt = units.init_opt_states(params)
    y, res, _ = units.forward[1](params[1], states[1], jnp.ones((2, 512)))
    dy = jnp.ones_like(y)
    grads, dx = units.backward[1](params[1], res, dy)
    expected = units.update[1](params[1], opt[1], grads, 3, params[1])
    fused_params, fused_opt, fused_dx = units.backward_update[1](params[1], opt[1], res, dy, 3, params[1])
    chex.assert_trees_all_close((fused_params, fused_opt, fused_dx), (*expected, dx), rtol=1e-6)


def test_resnets_have_the_published_sizes_and_one_stage_per_block():
    for name, blocks, millions in (("resnet18", 8, 11.17), ("resnet34", 16, 21.28), ("resnet50", 16, 23.52)):
        model = get_model(name, input_shape=(32, 32, 3), num_classes=10)
        params, states = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
        assert round(count / 1e6, 2) == millions, (name, count)
        assert model.stage_names[0] == "stem" and model.stage_names[-1] == "head"
        assert len(model.stages) == blocks + 2 and all(jax.tree_util.tree_leaves(s) for s in states[:-1])


def test_every_unit_compiles_once_across_many_calls():
    model_name = "resnet18"  # batch norm: merge_state units too
    model, params, states, x, labels = _tiny(model_name)
    units = Units(model, optax.sgd(0.1), "stash")
    opt = units.init_opt_states(params)
    units.warmup(params, opt, states, batch_size=4, eval_batch_size=8, groups=("stages_split", "model_grad"))
    compiled = dict(units.trace_counts)
    assert set(compiled) >= {f"forward/{n}" for n in model.stage_names}
    if model_name == "resnet18":
        assert "merge_state/layer1.0" in compiled and "model_merge_state" in compiled
    assert all(count == 1 for count in compiled.values()), compiled
    for seed in range(3):  # new arrays, same shapes: no retrace
        _stagewise_grads(units, params, states, x + seed, labels)
    assert dict(units.trace_counts) == compiled


def test_residual_modes_agree_on_the_fused_update():
    model, params, states, x, _ = _tiny("cnn")
    outs = []
    for mode in ("stash", "recompute"):
        units = Units(model, optax.sgd(0.1), mode)
        h = units.forward[1](params[1], states[1], units.forward[0](params[0], states[0], x)[0])[0]
        y, res, _ = units.forward[2](params[2], states[2], h)
        outs.append(units.backward_update[2](params[2], units.init_opt_states(params)[2], res, jnp.ones_like(y),
                                               0, params[2]))
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["xla", "onednn"])
@pytest.mark.parametrize("shape", [(2, 9, 2, 4, 3, 1), (2, 28, 8, 16, 3, 2), (2, 8, 4, 8, 1, 2), (2, 7, 3, 5, 3, 2),
                                   (64, 32, 16, 16, 3, 1), (32, 56, 16, 32, 3, 2)])
def test_conv2d_matches_lax_value_and_gradients(shape, form):
    batch, size, in_c, out_c, kernel, stride = shape
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, in_c))
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, in_c, out_c))
    padding = (same_padding(size, kernel, stride),) * 2

    def ours(x, w):
        return jnp.sum(jnp.sin(conv2d(x, w, (stride, stride), padding)))

    def reference(x, w):
        y = lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    with using(form):  # traced under the form (jax.jit: the eager calls would trace per primitive too)
        value, ours_grads = jax.jit(jax.value_and_grad(ours, (0, 1)))(x, w)
    np.testing.assert_allclose(value, reference(x, w), rtol=1e-5)
    # float32 sums over batch x positions: compared to the gradient's own scale
    reference_grads = jax.grad(reference, (0, 1))(x, w)
    for mine, theirs in zip(ours_grads, reference_grads):
        chex.assert_trees_all_close(mine, theirs, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(theirs))))
    out_size = -(-size // stride)
    chunk = weight_grad_chunk(batch, (out_size, out_size), (kernel, kernel), in_c, out_c)
    expected = "onednn" if form == "onednn" else "whole batch" if chunk == batch else f"chunks of {chunk}"
    assert conv_choices[(batch, size, size, in_c, out_c, kernel, kernel, stride, stride)] == expected


def test_weight_grad_chunks_fit_the_budget_and_divide_the_batch():
    # 32x32 maps, 64 -> 64 channels, 3x3 (ResNet-18's first group): 2.6 MB a picture -> 2 a chunk
    assert weight_grad_chunk(128, (32, 32), (3, 3), 64, 64) == 2
    assert weight_grad_chunk(128, (28, 28), (3, 3), 32, 32) == 4  # 1.0 MB a picture
    assert weight_grad_chunk(96, (28, 28), (3, 3), 32, 32) == 6  # the largest divisor of 96 that fits
    assert weight_grad_chunk(128, (4, 4), (3, 3), 512, 512) == 128  # 16 positions: the whole batch
    assert weight_grad_chunk(8, (28, 28), (3, 3), 32, 32) == 8  # 2 chunks only: the whole batch
    assert weight_grad_chunk(127, (28, 28), (3, 3), 32, 32) == 1  # a prime batch: one picture a chunk
    for batch in (1, 7, 64, 100, 128):
        chunk = weight_grad_chunk(batch, (14, 14), (3, 3), 64, 64)
        assert batch % chunk == 0 and (chunk == batch or chunk * 196 * 640 * 4 <= CHUNK_BYTES)


def test_flop_counts_see_every_chunk_of_the_weight_gradient():
    # XLA's cost analysis counts a loop body once: the FLOP count must trace the loop-free form.
    x = jax.ShapeDtypeStruct((64, 32, 32, 16), jnp.float32)
    dy = jax.ShapeDtypeStruct((64, 32, 32, 16), jnp.float32)
    assert weight_grad_chunk(64, (32, 32), (3, 3), 16, 16) == 8

    def flops():
        lowered = jax.jit(lambda x, dy: weight_grad(x, dy, (3, 3), (1, 1), ((1, 1), (1, 1)))).lower(x, dy)
        cost = lowered.cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    products = 2 * 64 * 32 * 32 * 9 * 16 * 16  # one multiply-add per position, offset and channel pair
    with counting_flops():
        counted = flops()
    assert products <= counted < 1.05 * products
    assert flops() < counted / 4  # the looped form, as XLA counts it: why the context exists


@pytest.mark.parametrize("conv_threads", [0, 1])  # all cores each (one OpenMP team per caller), one core each
def test_onednn_convolutions_from_several_threads_at_once_match_one_at_a_time(conv_threads):
    # PD-ASGD's and Hogwild's threads run convolutions concurrently; a scratchpad shared between
    # them (oneDNN's default) gave wrong values and hung a Hogwild run. Each thread here runs the same
    # compiled forward+gradients on its own data, many times, while the others do.
    shape_x, shape_w = (16, 14, 14, 32), (3, 3, 32, 32)
    with using("onednn"):
        step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, (1, 1), ((1, 1), (1, 1))))),
                                          (0, 1)))
    inputs = [(jax.random.normal(jax.random.PRNGKey(i), shape_x), jax.random.normal(jax.random.PRNGKey(9), shape_w))
              for i in range(4)]
    with onednn.threads_set(conv_threads):
        _check_concurrent_convolutions(step, inputs)


def _check_concurrent_convolutions(step, inputs):
    expected = [jax.device_get(step(*pair)) for pair in inputs]  # one at a time
    mismatches, errors = [], []

    def work(index):
        try:
            for _ in range(25):
                got = jax.device_get(step(*inputs[index]))
                if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected[index]))):
                    mismatches.append(index)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a convolution thread hung"
    assert not errors and not mismatches, (errors, sorted(set(mismatches)))


def test_onednn_convolutions_run_at_the_thread_count_set_and_agree_across_counts():
    # One core per convolution (`--conv-threads 1`, Hogwild's default on 2 cores) against two: the same
    # values to float rounding (oneDNN may split a reduction differently), the setting reported and
    # restored, and a bad count refused.
    with using("onednn"):
        step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, (2, 2), ((1, 1), (1, 1))))),
                                          (0, 1)))
    x, w = jax.random.normal(jax.random.PRNGKey(0), (8, 14, 14, 16)), jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 24))
    before = onednn.threads()
    with onednn.threads_set(2):
        assert onednn.threads() == 2
        two = jax.device_get(step(x, w))
        with onednn.threads_set(1):
            assert onednn.threads() == 1
            one = jax.device_get(step(x, w))
        assert onednn.threads() == 2
    assert onednn.threads() == before
    with onednn.threads_set(1):
        with onednn.threads_set(0):  # 0 is OpenMP's default again, whatever was set around it
            assert onednn.threads() == before
        assert onednn.threads() == 1
    chex.assert_trees_all_close(one, two, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="convolution threads must be >= 0, got -1"):
        onednn.set_threads(-1)
    # The count reaches OpenMP: in a fresh process, convolutions on 2 threads start OpenMP's second
    # thread (a worker of the calling thread's team), on 1 they start none.
    script = """
import os, sys, jax, jax.numpy as jnp
from asyncsgd.models import onednn
onednn.set_threads(int(sys.argv[1]))
x, w = jnp.ones((8, 14, 14, 16)), jnp.ones((3, 3, 16, 16))
f = jax.jit(lambda x, w: onednn.forward(x, w, (1, 1), ((1, 1), (1, 1)))).lower(x, w).compile()
before = len(os.listdir("/proc/self/task"))  # compiled, no convolution run yet
for _ in range(3):
    f(x, w).block_until_ready()
print(onednn.threads(), len(os.listdir("/proc/self/task")) - before)
"""
    started = {}
    for threads in (1, 2):
        done = subprocess.run([sys.executable, "-c", script, str(threads)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        reported, started[threads] = map(int, done.stdout.split())
        assert reported == threads
    assert started[1] == 0 and started[2] >= 1, started


def test_convolutions_fall_back_to_xla_when_onednn_cannot_be_built(tmp_path):
    # A fresh cache and no compiler: the library cannot be built, auto takes XLA's form and says why,
    # onednn asked for explicitly is a one-line configuration error.
    script = """
import jax, jax.numpy as jnp
from asyncsgd.models import conv, onednn
print(onednn.status())
x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
jax.jit(jax.grad(lambda x: jnp.sum(conv.conv2d(x, w, (1, 1), ((1, 1), (1, 1))))))(x)
print(sorted(set(conv.CHOICES.values())))
try:
    with conv.using("onednn"):
        jax.jit(lambda x: conv.conv2d(x, w, (1, 1), ((1, 1), (1, 1)))).lower(x)
except conv.ConfigError as exc:
    print("error:", exc)
"""
    env = {**os.environ, "ASYNCSGD_CACHE": str(tmp_path), "CXX": "no-such-compiler", "ASYNCSGD_CONV": "auto"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status, forms, error = done.stdout.strip().splitlines()
    assert status == "(False, 'oneDNN unavailable: no C++ compiler (no-such-compiler) to build the oneDNN convolutions')"
    assert forms == "['whole batch']"
    assert error == "error: ASYNCSGD_CONV=onednn: oneDNN unavailable: no C++ compiler (no-such-compiler) to build the oneDNN convolutions"
    assert not list(tmp_path.iterdir())  # nothing half-built left in the cache


def test_convolution_form_follows_dtype_and_request():
    assert backend_for(jnp.float32) == "onednn"  # built here (CI installs the wheels and g++)
    assert backend_for(jnp.bfloat16) == "xla"
    with using("xla"):
        assert backend_for(jnp.float32) == "xla"
    with counting_flops():
        assert backend_for(jnp.float32) == "xla"
    with using("onednn"), pytest.raises(ConfigError, match="float32 only"):
        backend_for(jnp.bfloat16)
    with pytest.raises(ConfigError, match="expected one of auto, onednn, xla"):
        with using("mkl"):
            pass


def test_convolution_choices_are_recorded_per_shape_and_filtered_by_batch():
    w = jnp.ones((3, 3, 5, 7))
    for batch in (3, 6):  # sizes no other test uses
        jax.jit(lambda x: conv2d(x, w, (1, 1), ((1, 1), (1, 1))))(jnp.ones((batch, 11, 11, 5)))
    assert describe_choices()["3x11x11x5x7x3x3x1x1"] == describe_choices()["6x11x11x5x7x3x3x1x1"] == "onednn"
    only = describe_choices(6)
    assert "6x11x11x5x7x3x3x1x1" in only and all(key.startswith("6x") for key in only)


def test_flop_count_of_a_onednn_backward_unit_is_the_xla_forms():
    # the backward units replay the pullbacks made by oneDNN forwards: their counts must still see the
    # convolutions' arithmetic (a custom call counts as nothing), as in units compiled with XLA's form
    model, params, states, x, labels = _tiny("cnn")
    counted = {}
    for form in ("onednn", "xla"):
        with using(form):
            units = Units(model, optax.sgd(0.1), "stash")
            _stagewise_grads(units, params, states, x, labels)
        counted[form] = {name: units.unit_flops(name) for name in units.signatures if "block" in name}
    assert counted["onednn"].keys() == counted["xla"].keys() and len(counted["xla"]) >= 6
    for name, flops in counted["xla"].items():
        assert flops > 0 and counted["onednn"][name] == pytest.approx(flops, rel=1e-6), name


def test_cross_entropy_is_mean_over_batch():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    labels = jnp.array([0, 0])
    expected = (-jax.nn.log_softmax(logits)[0, 0] - jax.nn.log_softmax(logits)[1, 0]) / 2
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-6)
