"""The one place where stages are jit-compiled.

For each stage l of a `StagedModel` this builds (DESIGN.md, "unit"):

  forward[l](params, state, x)                -> (y, residuals, new_state)   (training mode)
  backward[l](params, residuals, dy)          -> (grads, dx)
  backward_update[l](params, opt, res, dy, s, read) -> (params', opt', dx)  (update fused into backward)
  update[l](params, opt, grads, s, read)      -> (params', opt')
  merge_state[l](current, read, new)          -> state'   (stages with batch norm only)

plus the whole-model functions of one device that several trainers share (`train_step`,
`model_grad`, `model_update`, `model_merge_state`), the loss head (`loss_grad`) and `evaluate`
(evaluation mode: batch norm uses the running statistics). Every unit that applies an update takes the
gradient's staleness `s` (an int, traced: any value, one compile) and the parameters it was computed
at, `read` (the current parameters where a trainer has no others), for the staleness correction
(`asyncsgd/staleness.py`); `model_update` takes one of each per stage. Trainers that need more (ddp's
step over a device mesh, LAP-SGD's averaging, LPP-SGD's partial gradients) build it beside themselves in
`asyncsgd/trainers/` from the pure building blocks here (`grads_of`, `apply_updates`, `model.loss`),
compiled through the same `jit`, so every unit's traces are counted in one place.

A jitted function is traced once and compiled once per device it runs on; `warmup(devices=...)`
compiles each needed unit on every device of the run.

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
import contextlib
import math
import time
from typing import Any, Callable, Collection, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from asyncsgd.models.conv import counting_flops
from asyncsgd.models.staged import StagedModel, cross_entropy

Params = Any

UNIT_GROUPS = ("stages", "stages_split", "update", "train_step", "model_grad")


def _apply_update(optimizer: optax.GradientTransformationExtraArgs, params, opt_state, grads, staleness=0,
                  params_read=None):
    updates, opt_state = optimizer.update(grads, opt_state, params, staleness=staleness,
                                          params_read=params if params_read is None else params_read)
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
        self.optimizer = optax.with_extra_args_support(optimizer)
        self.residuals = residuals
        self.trace_counts: collections.Counter = collections.Counter()
        # Per unit: the pure function and the shapes it was traced with (for its FLOP count).
        self._fns: dict[str, Callable] = {}
        self.jitted: dict[str, Callable] = {}  # every unit by name (what `jit` returned)
        self.signatures: dict[str, Any] = {}
        self._flops: dict[str, float] = {}
        self.compile_time_s = 0.0
        self.residual_bytes = 0  # bytes one forward pass keeps for its backward (set by warmup)
        stages = model.stages
        self.forward = [self.jit(f"forward/{s.name}", self._make_forward(i)) for i, s in enumerate(stages)]
        self.backward = [self.jit(f"backward/{s.name}", self._make_backward(i)) for i, s in enumerate(stages)]
        self.backward_update = [self.jit(f"backward_update/{s.name}", self._make_backward_update(i))
                                for i, s in enumerate(stages)]
        self.update = [self.jit(f"update/{s.name}", self._update) for s in stages]
        self.merge_state = [self.jit(f"merge_state/{s.name}", model.merge_state) for s in stages]
        self.model_merge_state = self.jit("model_merge_state", self._model_merge_state)
        self.loss_grad = self.jit("loss_grad", jax.value_and_grad(cross_entropy))
        self.train_step = self.jit("train_step", self._train_step)
        self.model_grad = self.jit("model_grad", self.grads_of)
        self.model_update = self.jit("model_update", self.apply_updates)
        self.evaluate = self.jit("evaluate", self._evaluate)

    # -- building blocks (traced once each) -------------------------------------------------------
    def jit(self, name: str, fn: Callable) -> Callable:
        """`jax.jit(fn)` whose traces are counted under `name` (`trace_counts`; they must stay at 1)."""
        def counted(*args):
            self.trace_counts[name] += 1  # runs at trace time only
            self.signatures.setdefault(name, jax.tree_util.tree_map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), args))
            return fn(*args)
        counted.__name__ = name.replace("/", "_")
        self._fns[name] = fn
        self.jitted[name] = jax.jit(counted)
        return self.jitted[name]

    def unit_flops(self, name: str) -> float:
        """FLOPs of one call of unit `name` as XLA's cost analysis counts them, at the shapes it was
        compiled for (NaN for a unit never compiled, or one XLA cannot count)."""
        if name not in self._flops:
            flops = float("nan")
            if name in self.signatures:
                try:  # a fresh, uncounted jit of the same function: the unit's own trace count stays 1
                    with counting_flops():
                        cost = jax.jit(self._fns[name]).lower(*self.signatures[name]).cost_analysis()
                    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                    flops = float((cost or {}).get("flops", float("nan")))
                except Exception:  # noqa: BLE001 - e.g. a shard_map without its mesh: no count
                    flops = float("nan")
            self._flops[name] = flops
        return self._flops[name]

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
        def backward_update(params, opt_state, residuals, dy, staleness, params_read):
            grads, dx = self._grads_from_residuals(index, params, residuals, dy)
            params, opt_state = _apply_update(self.optimizer, params, opt_state, grads, staleness, params_read)
            return params, opt_state, dx
        return backward_update

    def _update(self, params, opt_state, grads, staleness, params_read):
        return _apply_update(self.optimizer, params, opt_state, grads, staleness, params_read)

    def grads_of(self, params_list, states, x, labels):
        """`(grads, loss, new_states)` of the whole model on one batch (pure: for use inside a jit)."""
        (loss, new_states), grads = jax.value_and_grad(self.model.loss, has_aux=True)(params_list, states, x, labels)
        return grads, loss, new_states

    def apply_updates(self, params_list, opt_list, grads_list, staleness=None, read_list=None):
        """Every stage's optimiser step (pure: for use inside a jit). `staleness` and `read_list`: one per
        stage (default: a synchronous step, staleness 0 at the current parameters)."""
        staleness = [0] * len(params_list) if staleness is None else staleness
        read_list = params_list if read_list is None else read_list
        pairs = [_apply_update(self.optimizer, p, o, g, s, r)
                 for p, o, g, s, r in zip(params_list, opt_list, grads_list, staleness, read_list)]
        return [p for p, _ in pairs], [o for _, o in pairs]

    def _model_merge_state(self, current, read, new):
        return [self.model.merge_state(c, r, n) for c, r, n in zip(current, read, new)]

    def _train_step(self, params_list, opt_list, states, x, labels):
        grads, loss, states = self.grads_of(params_list, states, x, labels)
        params_list, opt_list = self.apply_updates(params_list, opt_list, grads)
        return params_list, opt_list, states, loss

    def _evaluate(self, params_list, states, x, labels, mask):
        logits, _ = self.model.apply(params_list, states, x, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=-1) == labels)
        return jnp.sum(losses * mask), jnp.sum(correct * mask)

    # -- compilation ------------------------------------------------------------------------------
    def init_opt_states(self, params: Sequence[Params]) -> list:
        return [self.optimizer.init(p) for p in params]

    @contextlib.contextmanager
    def compiling(self):
        """Counts the time spent inside (compiling and first runs) in `compile_time_s`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.compile_time_s += time.perf_counter() - start

    def warmup(self, params: Sequence[Params], opt_states: Sequence[Any], states: Sequence[Any], batch_size: int,
               eval_batch_size: Optional[int] = None, groups: Optional[Collection[str]] = None,
               devices: Optional[Sequence[Any]] = None) -> None:
        """Compiles units by calling them once on zeros of the real shapes.

        Must run before any worker thread starts (compilation can hold the GIL, DESIGN.md).

        Args:
          eval_batch_size: also compile `evaluate` (on the default device) for this batch size.
          groups: which units a trainer will call (default: all of `UNIT_GROUPS`):
            "stages" (forward, merge_state, loss_grad, backward_update), "stages_split" (forward,
            merge_state, loss_grad, backward, model_update), "update" (update of every stage),
            "train_step", "model_grad" (model_grad, model_update, model_merge_state).
          devices: compile the groups on each of these devices (default: the default device only).
        """
        groups = set(UNIT_GROUPS if groups is None else groups)
        unknown = groups - set(UNIT_GROUPS)
        if unknown:
            raise ValueError(f"unknown unit groups {sorted(unknown)}; known: {UNIT_GROUPS}")
        devices = list(dict.fromkeys(devices)) if devices else None  # simulated devices may share one
        with self.compiling():
            trees = (list(params), list(opt_states), list(states))
            outputs = []
            for device in (devices or [None]) if groups else []:
                placed = trees if device is None else jax.device_put(trees, device)
                outputs.extend(self._warm_groups(*placed, batch_size, groups, device))
            if eval_batch_size is not None:
                xe = self.model.dummy_input(eval_batch_size)
                ye = jnp.zeros((eval_batch_size,), jnp.int32)
                outputs.append(self.evaluate(*on_home(trees[::2]), xe, ye,
                                             jnp.ones((eval_batch_size,), jnp.float32)))
            jax.block_until_ready(outputs)  # blocks: compilation and the first runs finish here

    def _warm_groups(self, params: list, opt_states: list, states: list, batch_size: int, groups: set,
                     device: Any) -> list:
        """Runs each unit of `groups` once on `device` (None: the default device); returns the outputs."""
        outputs = []
        x0 = self.model.dummy_input(batch_size)
        labels = jnp.zeros((batch_size,), jnp.int32)
        if device is not None:
            x0, labels = jax.device_put((x0, labels), device)
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
                    _, _, dy = self.backward_update[index](params[index], opt_states[index], residuals[index], dy,
                                                           0, params[index])
                outputs.append(dy)
            if "stages_split" in groups:
                dy, grads = dy_top, [None] * len(params)
                for index in reversed(range(len(self.forward))):
                    grads[index], dy = self.backward[index](params[index], residuals[index], dy)
                outputs.append(self.model_update(params, opt_states, grads, [0] * len(params), params))
        if "update" in groups:
            outputs.extend(self.update[index](params[index], opt_states[index], params[index], 0, params[index])
                           for index in range(len(params)))
        if "train_step" in groups:
            outputs.append(self.train_step(params, opt_states, states, x0, labels))
        if "model_grad" in groups:
            grads, _, new_states = self.model_grad(params, states, x0, labels)
            outputs.append(self.model_update(params, opt_states, grads, [0] * len(params), params))
            outputs.append(self.model_merge_state(states, states, new_states))
        return outputs

    def step_flops(self, params: Sequence[Params], opt_states: Sequence[Any], states: Sequence[Any],
                   batch_size: int) -> float:
        """FLOPs of one whole training step as XLA's cost analysis counts them (one count per model
        and batch, used for the MFU of every trainer)."""
        x = jax.ShapeDtypeStruct((batch_size, *self.model.input_shape), self.model.input_dtype)
        labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        with counting_flops():
            lowered = jax.jit(self._train_step).lower(list(params), list(opt_states), list(states), x, labels)
        cost = lowered.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        return float((cost or {}).get("flops", float("nan")))

    def max_trace_count(self) -> int:
        return max(self.trace_counts.values()) if self.trace_counts else 0


def on_home(tree: Any) -> Any:
    """`tree` with every array on the default device: unchanged when they already are (so a
    compiled function sees the same placement as at warm-up), else copied there (a ddp replica)."""
    home = jax.devices()[0]
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.Array)]
    if all(leaf.devices() == {home} for leaf in leaves):
        return tree
    return jax.device_put(tree, home)


def has_state(state) -> bool:
    """True for a stage with mutable state (batch-norm statistics)."""
    return bool(jax.tree_util.tree_leaves(state))


def tree_nbytes(tree) -> int:
    """Bytes held by the arrays of a pytree (e.g. the residuals of one forward pass)."""
    # `nbytes` where the leaf has it (arrays: a field read, called per pull and push), else from the
    # shape (a ShapeDtypeStruct)
    return int(sum(leaf.nbytes if hasattr(leaf, "nbytes") else math.prod(leaf.shape) * leaf.dtype.itemsize
                   for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "shape")))
