"""The one place where stages are jit-compiled.

For each stage l of a `StagedModel` this builds (DESIGN.md, "unit"):

  forward[l](params, state, x)                -> (y, residuals, new_state)   (training mode)
  backward[l](params, residuals, dy)          -> (grads, dx)
  backward_update[l](params, opt, res, dy)    -> (params', opt', dx)    (update fused into backward)
  update[l](params, opt, grads)               -> (params', opt')
  merge_state[l](current, read, new)          -> state'   (stages with batch norm only)

plus the whole-model functions the synchronous and Hogwild trainers need (`train_step`,
`model_grad`, `model_update`, `model_merge_state`), the loss head (`loss_grad`) and `evaluate`
(evaluation mode: batch norm uses the running statistics).

Residual modes:
  stash:     the forward returns the `jax.vjp` pullback (a pytree of residual arrays). The gradient
             is taken at the parameters the forward pass read (weight stashing); nothing is recomputed.
  recompute: the forward keeps only its input (and the small state it read); the backward re-runs
             the stage's forward under `jax.vjp` at the parameters it is given (the store's current
             ones, in the async trainers).

The first stage never returns an input gradient (dx is None): nothing consumes it.

`Units.warmup` calls every function once on real shapes, so all compilation happens before any thread
starts; `trace_counts` records how often each function was traced (it must stay at 1).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Collection, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asyncsgd.models.staged import StagedModel, cross_entropy

Params = Any

UNIT_GROUPS = ("stages", "stages_split", "train_step", "model_grad")


def _apply_update(optimizer: optax.GradientTransformation, params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class Units:
    """Compiled per-stage and whole-model functions for one model, optimiser and batch shape.

    Args:
      model: the staged model.
      optimizer: the per-stage optax transformation.
      residuals: "stash" or "recompute".
    """

    def __init__(self, model: StagedModel, optimizer: optax.GradientTransformation,
                 residuals: str = "stash"):
        if residuals not in ("stash", "recompute"):
            raise ValueError(f"residuals must be 'stash' or 'recompute', got {residuals!r}")
        self.model = model
        self.optimizer = optimizer
        self.residuals = residuals
        self.trace_counts: collections.Counter = collections.Counter()
        self.compile_time_s = 0.0
        self.residual_bytes = 0  # bytes one forward pass keeps for its backward (set by warmup)
        stages = model.stages
        self.forward = [self._jit(f"forward/{s.name}", self._make_forward(i)) for i, s in enumerate(stages)]
        self.backward = [self._jit(f"backward/{s.name}", self._make_backward(i)) for i, s in enumerate(stages)]
        self.backward_update = [self._jit(f"backward_update/{s.name}", self._make_backward_update(i))
                                for i, s in enumerate(stages)]
        self.update = [self._jit(f"update/{s.name}", self._update) for s in stages]
        self.merge_state = [self._jit(f"merge_state/{s.name}", model.merge_state) for s in stages]
        self.model_merge_state = self._jit("model_merge_state", self._model_merge_state)
        self.loss_grad = self._jit("loss_grad", jax.value_and_grad(cross_entropy))
        self.train_step = self._jit("train_step", self._train_step)
        self.model_grad = self._jit("model_grad", self._model_grad)
        self.model_update = self._jit("model_update", self._model_update)
        self.evaluate = self._jit("evaluate", self._evaluate)

    # -- building blocks (traced once each) -------------------------------------------------------
    def _jit(self, name: str, fn: Callable) -> Callable:
        def counted(*args):
            self.trace_counts[name] += 1  # runs at trace time only
            return fn(*args)
        counted.__name__ = name.replace("/", "_")
        return jax.jit(counted)

    def _stage_vjp(self, index: int, params, state, x):
        """`(y, pullback, new_state)` of stage `index` in training mode."""
        stage = self.model.stages[index]
        if index == 0:  # no input gradient for the first stage
            return jax.vjp(lambda p: stage.apply(p, state, x, True), params, has_aux=True)
        return jax.vjp(lambda p, x_: stage.apply(p, state, x_, True), params, x, has_aux=True)

    def _make_forward(self, index: int):
        stage = self.model.stages[index]

        def forward(params, state, x):
            if self.residuals == "stash":
                return self._stage_vjp(index, params, state, x)  # (y, pullback, new_state)
            y, new_state = stage.apply(params, state, x, True)
            return y, (x, state), new_state
        return forward

    def _grads_from_residuals(self, index: int, params, residuals, dy):
        if self.residuals == "stash":
            pullback = residuals
        else:
            x, state = residuals
            _, pullback, _ = self._stage_vjp(index, params, state, x)
        cotangents = pullback(dy)
        grads = cotangents[0]
        dx = cotangents[1] if index > 0 else None
        return grads, dx

    def _make_backward(self, index: int):
        def backward(params, residuals, dy):
            return self._grads_from_residuals(index, params, residuals, dy)
        return backward

    def _make_backward_update(self, index: int):
        def backward_update(params, opt_state, residuals, dy):
            grads, dx = self._grads_from_residuals(index, params, residuals, dy)
            params, opt_state = _apply_update(self.optimizer, params, opt_state, grads)
            return params, opt_state, dx
        return backward_update

    def _update(self, params, opt_state, grads):
        return _apply_update(self.optimizer, params, opt_state, grads)

    def _model_grad(self, params_list, states, x, labels):
        (loss, new_states), grads = jax.value_and_grad(self.model.loss, has_aux=True)(params_list, states, x, labels)
        return grads, loss, new_states

    def _model_update(self, params_list, opt_list, grads_list):
        pairs = [_apply_update(self.optimizer, p, o, g) for p, o, g in zip(params_list, opt_list, grads_list)]
        return [p for p, _ in pairs], [o for _, o in pairs]

    def _model_merge_state(self, current, read, new):
        return [self.model.merge_state(c, r, n) for c, r, n in zip(current, read, new)]

    def _train_step(self, params_list, opt_list, states, x, labels):
        grads, loss, states = self._model_grad(params_list, states, x, labels)
        params_list, opt_list = self._model_update(params_list, opt_list, grads)
        return params_list, opt_list, states, loss

    def _evaluate(self, params_list, states, x, labels, mask):
        logits, _ = self.model.apply(params_list, states, x, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=-1) == labels)
        return jnp.sum(losses * mask), jnp.sum(correct * mask)

    # -- compilation ------------------------------------------------------------------------------
    def init_opt_states(self, params: Sequence[Params]) -> list:
        return [self.optimizer.init(p) for p in params]

    def warmup(self, params: Sequence[Params], opt_states: Sequence[Any], states: Sequence[Any], batch_size: int,
               eval_batch_size: int, groups: Optional[Collection[str]] = None) -> float:
        """Compiles units by calling them once on zeros of the real shapes; returns seconds spent.

        Must run before any worker thread starts (compilation can hold the GIL, DESIGN.md).

        Args:
          groups: which units a trainer will call (default: all of `UNIT_GROUPS`): "stages" (forward,
            merge_state, loss_grad, backward_update), "stages_split" (forward, merge_state, loss_grad,
            backward, model_update), "train_step", "model_grad" (model_grad, model_update,
            model_merge_state). `evaluate` is always compiled.
        """
        groups = set(UNIT_GROUPS if groups is None else groups)
        unknown = groups - set(UNIT_GROUPS)
        if unknown:
            raise ValueError(f"unknown unit groups {sorted(unknown)}; known: {UNIT_GROUPS}")
        start = time.perf_counter()
        params, opt_states, states = list(params), list(opt_states), list(states)
        outputs = []
        x0 = self.model.dummy_input(batch_size)
        labels = jnp.zeros((batch_size,), jnp.int32)
        if groups & {"stages", "stages_split"}:
            x, residuals = x0, []
            for index, forward in enumerate(self.forward):
                x, res, new_state = forward(params[index], states[index], x)
                residuals.append(res)
                if has_state(states[index]):
                    outputs.append(self.merge_state[index](states[index], states[index], new_state))
            loss, dy_top = self.loss_grad(x, labels)
            self.residual_bytes = sum(tree_nbytes(res) for res in residuals)
            outputs.append(loss)
            if "stages" in groups:
                dy = dy_top
                for index in reversed(range(len(self.forward))):
                    _, _, dy = self.backward_update[index](params[index], opt_states[index], residuals[index], dy)
                outputs.append(dy)
            if "stages_split" in groups:
                dy, grads = dy_top, [None] * len(params)
                for index in reversed(range(len(self.forward))):
                    grads[index], dy = self.backward[index](params[index], residuals[index], dy)
                outputs.append(self.model_update(params, opt_states, grads))
        if "train_step" in groups:
            outputs.append(self.train_step(params, opt_states, states, x0, labels))
        if "model_grad" in groups:
            grads, _, new_states = self.model_grad(params, states, x0, labels)
            outputs.append(self.model_update(params, opt_states, grads))
            outputs.append(self.model_merge_state(states, states, new_states))
        xe = self.model.dummy_input(eval_batch_size)
        ye = jnp.zeros((eval_batch_size,), jnp.int32)
        outputs.append(self.evaluate(params, states, xe, ye, jnp.ones((eval_batch_size,), jnp.float32)))
        jax.block_until_ready(outputs)  # blocks: compilation and the first runs finish here
        elapsed = time.perf_counter() - start
        self.compile_time_s += elapsed
        return elapsed

    def step_flops(self, params: Sequence[Params], opt_states: Sequence[Any], states: Sequence[Any],
                   batch_size: int) -> float:
        """FLOPs of one whole training step as XLA's cost analysis counts them (one count per model
        and batch, used for the MFU of every trainer)."""
        x = jax.ShapeDtypeStruct((batch_size, *self.model.input_shape), self.model.input_dtype)
        labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        lowered = jax.jit(self._train_step).lower(list(params), list(opt_states), list(states), x, labels)
        cost = lowered.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        return float((cost or {}).get("flops", float("nan")))

    def max_trace_count(self) -> int:
        return max(self.trace_counts.values()) if self.trace_counts else 0


def has_state(state) -> bool:
    """True for a stage with mutable state (batch-norm statistics)."""
    return bool(jax.tree_util.tree_leaves(state))


def tree_nbytes(tree) -> int:
    """Bytes held by the arrays of a pytree (e.g. the residuals of one forward pass)."""
    return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree)
                   if hasattr(leaf, "shape")))
