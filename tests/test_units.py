"""Per-stage units: gradients equal the whole-model gradient; each unit compiles once; the conv is exact."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from asyncsgd.models import cross_entropy, get_model
from asyncsgd.models.conv import conv2d, same_padding
from asyncsgd.units import Units


def _stagewise_grads(units, params, x, labels):
    residuals = []
    for index, forward in enumerate(units.forward):
        x, res = forward(params[index], x)
        residuals.append(res)
    loss, dy = units.loss_grad(x, labels)
    grads = [None] * len(params)
    for index in reversed(range(len(params))):
        grads[index], dy = units.backward[index](params[index], residuals[index], dy)
    return loss, grads


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("residuals", ["stash", "recompute"])
def test_stage_gradients_equal_whole_model_grad(model_name, residuals):
    model = get_model(model_name, input_shape=(8, 8, 1), num_classes=10)
    params = model.init(jax.random.PRNGKey(0))
    units = Units(model, optax.sgd(0.1), residuals)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    labels = jnp.array([0, 3, 7, 9])
    loss, grads = _stagewise_grads(units, params, x, labels)
    ref_loss, ref_grads = jax.value_and_grad(model.loss)(params, x, labels)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=2e-5, atol=1e-6)


def test_first_stage_returns_no_input_gradient():
    model = get_model("mlp", input_shape=(8, 8, 1))
    params = model.init(jax.random.PRNGKey(0))
    units = Units(model, optax.sgd(0.1))
    y, res = units.forward[0](params[0], jnp.ones((2, 8, 8, 1)))
    grads, dx = units.backward[0](params[0], res, jnp.ones_like(y))
    assert dx is None
    chex.assert_trees_all_equal_shapes(grads, params[0])


def test_backward_update_equals_backward_then_update():
    model = get_model("mlp", input_shape=(8, 8, 1))
    params = model.init(jax.random.PRNGKey(0))
    units = Units(model, optax.adam(1e-2))
    opt = units.init_opt_states(params)
    y, res = units.forward[1](params[1], jnp.ones((2, 512)))
    dy = jnp.ones_like(y)
    grads, dx = units.backward[1](params[1], res, dy)
    expected = units.update[1](params[1], opt[1], grads)
    fused_params, fused_opt, fused_dx = units.backward_update[1](params[1], opt[1], res, dy)
    chex.assert_trees_all_close((fused_params, fused_opt, fused_dx), (*expected, dx), rtol=1e-6)


def test_every_unit_compiles_once_across_many_calls():
    model = get_model("cnn", input_shape=(8, 8, 1))
    params = model.init(jax.random.PRNGKey(0))
    units = Units(model, optax.sgd(0.1), "stash")
    opt = units.init_opt_states(params)
    units.warmup(params, opt, batch_size=4, eval_batch_size=8)
    compiled = dict(units.trace_counts)
    assert set(compiled) >= {f"forward/{n}" for n in model.stage_names}
    assert all(count == 1 for count in compiled.values()), compiled
    for _ in range(3):  # new arrays, same shapes: no retrace
        _stagewise_grads(units, params, jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1)), jnp.zeros(4, jnp.int32))
    assert dict(units.trace_counts) == compiled


def test_residual_modes_agree_on_the_fused_update():
    model = get_model("cnn", input_shape=(8, 8, 1))
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    outs = []
    for mode in ("stash", "recompute"):
        units = Units(model, optax.sgd(0.1), mode)
        y, res = units.forward[2](params[2], units.forward[1](params[1], units.forward[0](params[0], x)[0])[0])
        outs.append(units.backward_update[2](params[2], units.init_opt_states(params)[2], res, jnp.ones_like(y)))
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(9, 2, 4, 3, 1), (28, 8, 16, 3, 2), (8, 4, 8, 1, 2), (7, 3, 5, 3, 2)])
def test_conv2d_matches_lax_value_and_gradients(shape):
    size, in_c, out_c, kernel, stride = shape
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, in_c))
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, in_c, out_c))
    padding = (same_padding(size, kernel, stride),) * 2

    def ours(x, w):
        return jnp.sum(jnp.sin(conv2d(x, w, (stride, stride), padding)))

    def reference(x, w):
        y = lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-5)
    chex.assert_trees_all_close(jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w),
                                rtol=1e-4, atol=1e-4)


def test_cross_entropy_is_mean_over_batch():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    labels = jnp.array([0, 0])
    expected = (-jax.nn.log_softmax(logits)[0, 0] - jax.nn.log_softmax(logits)[1, 0]) / 2
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-6)
