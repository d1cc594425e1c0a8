"""The one place where stages are jit-compiled.

For each stage l of a `StagedModel` this builds (DESIGN.md, "unit"):

  forward[l](params, state, x)                -> (y, residuals, new_state)   (training mode)
  backward[l](params, residuals, dy)          -> (grads, dx)
  backward_update[l](params, opt, res, dy)    -> (params', opt', dx)    (update fused into backward)
  update[l](params, opt, grads)               -> (params', opt')
  merge_state[l](current, read, new)          -> state'   (stages with batch norm only)

plus the whole-model functions the synchronous and Hogwild trainers need (`train_step`,
`model_grad`, `model_update`, `model_merge_state`), the loss head (`loss_grad`) and `evaluate`
(evaluation mode: batch norm uses the running statistics). The multi-device trainers add
`ddp_step` (one step over a device mesh with a gradient all-reduce, built by `build_ddp_step`),
`partial_grad[k]` (LPP-SGD: the gradient of stage slice k only, built by `build_partial_grads`),
and `average` / `shift` (LAP-SGD's model averaging).

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
import time
from typing import Any, Callable, Collection, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asyncsgd.models.staged import StagedModel, cross_entropy

Params = Any

UNIT_GROUPS = ("stages", "stages_split", "update", "train_step", "model_grad", "averaging", "partial_grad",
               "ddp_step")


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
        self.average = self._jit("average", _tree_mean)
        self.shift = self._jit("shift", _tree_shift)
        self.ddp_step: Optional[Callable] = None
        self.mesh = None
        self.slices: tuple[tuple[int, int], ...] = ()
        self.partial_grad: list[Callable] = []
        self.average_copies = 1  # how many model copies `average` takes (LAP-SGD: one per device)

    def build_ddp_step(self, mesh) -> None:
        """`ddp_step(params, opts, states, x, labels) -> (params, opts, states, loss)` over `mesh` (one
        axis): parameters replicated, the batch split along the axis, gradients (and the loss and the
        batch-norm statistics) averaged across devices with `pmean` before the update."""
        from jax.sharding import PartitionSpec as P
        axis = mesh.axis_names[0]

        def step(params_list, opt_list, states, x, labels):
            grads, loss, new_states = self._model_grad(params_list, states, x, labels)
            grads, loss, new_states = jax.lax.pmean((grads, loss, new_states), axis)
            params_list, opt_list = self._model_update(params_list, opt_list, grads)
            return params_list, opt_list, new_states, loss
        self.mesh = mesh
        # check_vma=False: the CNN's custom-VJP convolution does not carry shard_map's varying-axis types;
        # the pmean makes every output replicated, which the ddp tests check against sync.
        self.ddp_step = self._jit("ddp_step", jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(axis), P(axis)),
                                                            out_specs=(P(), P(), P(), P()), check_vma=False))

    def build_partial_grads(self, slices: Sequence[tuple[int, int]]) -> None:
        """`partial_grad[k](params, states, x, labels) -> (grads of stages a..b-1, loss, new_states)` for
        each slice `(a, b)`: stages below `a` run forward only, stages above `b` only pass the gradient
        down (their weight gradients are never formed), the backward stops at stage `a`."""
        self.slices = tuple(slices)
        self.partial_grad = [self._jit(f"partial_grad/{a}-{b}", self._make_partial_grad(a, b)) for a, b in slices]

    def _make_partial_grad(self, first: int, end: int):
        def partial_grad(params_list, states, x, labels):
            def loss_of(part):
                return self.model.loss(list(params_list[:first]) + list(part) + list(params_list[end:]),
                                       states, x, labels)
            (loss, new_states), grads = jax.value_and_grad(loss_of, has_aux=True)(list(params_list[first:end]))
            return grads, loss, new_states
        return partial_grad

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
               eval_batch_size: int, groups: Optional[Collection[str]] = None,
               devices: Optional[Sequence[Any]] = None) -> float:
        """Compiles units by calling them once on zeros of the real shapes; returns seconds spent.

        Must run before any worker thread starts (compilation can hold the GIL, DESIGN.md).

        Args:
          groups: which units a trainer will call (default: all of `UNIT_GROUPS` that are built):
            "stages" (forward, merge_state, loss_grad, backward_update), "stages_split" (forward,
            merge_state, loss_grad, backward, model_update), "update" (update of every stage),
            "train_step", "model_grad" (model_grad, model_update, model_merge_state), "averaging"
            (average, shift), "partial_grad" (every slice's), "ddp_step" (on the mesh).
            `evaluate` is always compiled (on the default device).
          devices: compile the groups on each of these devices (default: the default device only).
        """
        if groups is None:
            groups = [g for g in UNIT_GROUPS if g != "ddp_step" or self.ddp_step is not None]
        groups = set(groups)
        unknown = groups - set(UNIT_GROUPS)
        if unknown:
            raise ValueError(f"unknown unit groups {sorted(unknown)}; known: {UNIT_GROUPS}")
        if "ddp_step" in groups and self.ddp_step is None:
            raise ValueError("ddp_step: call build_ddp_step(mesh) before warmup")
        start = time.perf_counter()
        trees = (list(params), list(opt_states), list(states))
        outputs = []
        for device in (devices or [None]):
            placed = trees if device is None else jax.device_put(trees, device)
            outputs.extend(self._warm_groups(*placed, batch_size, groups - {"ddp_step"}, device))
        if "ddp_step" in groups:
            from jax.sharding import NamedSharding, PartitionSpec as P
            batch = NamedSharding(self.mesh, P(self.mesh.axis_names[0]))
            x0 = jax.device_put(self.model.dummy_input(batch_size), batch)
            labels = jax.device_put(jnp.zeros((batch_size,), jnp.int32), batch)
            outputs.append(self.ddp_step(*trees, x0, labels))
        xe = self.model.dummy_input(eval_batch_size)
        ye = jnp.zeros((eval_batch_size,), jnp.int32)
        outputs.append(self.evaluate(*on_home(trees[::2]), xe, ye, jnp.ones((eval_batch_size,), jnp.float32)))
        jax.block_until_ready(outputs)  # blocks: compilation and the first runs finish here
        elapsed = time.perf_counter() - start
        self.compile_time_s += elapsed
        return elapsed

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
                    _, _, dy = self.backward_update[index](params[index], opt_states[index], residuals[index], dy)
                outputs.append(dy)
            if "stages_split" in groups:
                dy, grads = dy_top, [None] * len(params)
                for index in reversed(range(len(self.forward))):
                    grads[index], dy = self.backward[index](params[index], residuals[index], dy)
                outputs.append(self.model_update(params, opt_states, grads))
        if "update" in groups:
            outputs.extend(self.update[index](params[index], opt_states[index], params[index])
                           for index in range(len(params)))
        if "train_step" in groups:
            outputs.append(self.train_step(params, opt_states, states, x0, labels))
        if "model_grad" in groups:
            grads, _, new_states = self.model_grad(params, states, x0, labels)
            outputs.append(self.model_update(params, opt_states, grads))
            outputs.append(self.model_merge_state(states, states, new_states))
        if "averaging" in groups:
            outputs.append(self.average([(params, states)] * self.average_copies))
            outputs.append(self.shift((params, states), (params, states), (params, states)))
        if "partial_grad" in groups:
            for (first, end), partial in zip(self.slices, self.partial_grad):
                grads, _, _ = partial(params, states, x0, labels)
                outputs.extend(self.update[index](params[index], opt_states[index], g)
                               for index, g in zip(range(first, end), grads))
        return outputs

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


def on_home(tree: Any) -> Any:
    """`tree` with every array on the default device: unchanged when they already are (so a
    compiled function sees the same placement as at warm-up), else copied there (a ddp replica)."""
    home = jax.devices()[0]
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.Array)]
    if all(leaf.devices() == {home} for leaf in leaves):
        return tree
    return jax.device_put(tree, home)


def _tree_mean(trees: Sequence[Any]) -> Any:
    """The element-wise mean of equally shaped pytrees (LAP-SGD's model average)."""
    return jax.tree_util.tree_map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def _tree_shift(live: Any, average: Any, snapshot: Any) -> Any:
    """`live + (average - snapshot)`: moves a live copy by what averaging its snapshot changed."""
    return jax.tree_util.tree_map(lambda x, a, s: x + (a - s), live, average, snapshot)


def has_state(state) -> bool:
    """True for a stage with mutable state (batch-norm statistics)."""
    return bool(jax.tree_util.tree_leaves(state))


def tree_nbytes(tree) -> int:
    """Bytes held by the arrays of a pytree (e.g. the residuals of one forward pass)."""
    return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree)
                   if hasattr(leaf, "shape")))
