"""Per-stage units: gradients equal the whole-model gradient; each unit compiles once; the conv is exact."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from asyncsgd.models import cross_entropy, get_model
from asyncsgd.models.conv import (CHOICES as conv_choices, CHUNK_BYTES, conv2d, counting_flops, same_padding,
                                  weight_grad, weight_grad_chunk)
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


@pytest.mark.parametrize("shape", [(2, 9, 2, 4, 3, 1), (2, 28, 8, 16, 3, 2), (2, 8, 4, 8, 1, 2), (2, 7, 3, 5, 3, 2),
                                   (64, 32, 16, 16, 3, 1), (32, 56, 16, 32, 3, 2)])
def test_conv2d_matches_lax_value_and_gradients(shape):
    batch, size, in_c, out_c, kernel, stride = shape
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, in_c))
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, in_c, out_c))
    padding = (same_padding(size, kernel, stride),) * 2

    def ours(x, w):
        return jnp.sum(jnp.sin(conv2d(x, w, (stride, stride), padding)))

    def reference(x, w):
        y = lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-5)
    # float32 sums over batch x positions: compared to the gradient's own scale
    ours_grads, reference_grads = jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)
    for mine, theirs in zip(ours_grads, reference_grads):
        chex.assert_trees_all_close(mine, theirs, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(theirs))))
    out_size = -(-size // stride)
    chunk = weight_grad_chunk(batch, (out_size, out_size), (kernel, kernel), in_c, out_c)
    expected = "whole batch" if chunk == batch else f"chunks of {chunk}"
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


def test_cross_entropy_is_mean_over_batch():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    labels = jnp.array([0, 0])
    expected = (-jax.nn.log_softmax(logits)[0, 0] - jax.nn.log_softmax(logits)[1, 0]) / 2
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-6)
