"""Staleness-aware updates: optax transformations that know how old a gradient is.

An asynchronous trainer applies a gradient computed at parameters `w_read` (version v_read) to the
current parameters `w_now` (version v_now); its staleness is `s = v_now - v_read`. The transformations
here take both as extra arguments (optax's `GradientTransformationExtraArgs`):

  update(grads, state, params, staleness=s, params_read=w_read)

and compose with the run's rule in `optim.make_optimizer` (`--staleness-correction`):

  none      the rule alone (what every trainer did before; the state is the rule's own).
  scale     g / (1 + s) before the rule: the learning rate of a stale gradient divided by one plus its
            staleness (Zhang et al., "Staleness-aware Async-SGD", arXiv 1511.05950, divide the
            learning rate by the staleness; `1 + s` keeps a fresh gradient, s = 0, at full rate).
  dc        delay compensation, g + lambda * g * g * (w_now - w_read) element-wise (Zheng et al.,
            "Asynchronous SGD with Delay Compensation", ICML 2017): a first-order Taylor correction of
            the gradient towards w_now, with g * g standing in for the Hessian's diagonal; lambda 0.04
            as in MXNet's `dcasgd` optimiser (`--dc-lambda`).
  momentum  momentum reduced by the momentum asynchrony already adds (Mitliagkas et al., "Asynchrony
            begets momentum", arXiv 1605.09774): with mean staleness s_bar, asynchronous SGD behaves
            like momentum SGD with an implicit momentum whose mean lag mu_i / (1 - mu_i) equals s_bar.
            The explicit momentum keeps the total mean lag at the configured momentum's:
            mu_e / (1 - mu_e) = max(0, mu / (1 - mu) - s_bar), so mu_e = mu at s_bar = 0 and mu_e = 0
            once s_bar >= mu / (1 - mu) (9 for mu = 0.9). s_bar is a per-stage running mean of the
            staleness (exponential, `STALENESS_EMA`, bias-corrected), kept in the state. With
            `--optimizer adam` the momentum corrected is Adam's first-moment decay b1 (`staleness_adam`).
  predict   weight prediction (SpecTrain: Chen, Yang, Cheng, arXiv 1809.02839): a forward
            pass reads the parameters extrapolated along the stage's last update by the stage's
            running mean staleness, w_ahead = w_new + s_bar * u (u the update just applied, s_bar as
            for `momentum`), so the gradient is taken about where the weights will be when it is
            applied. It changes no update: the last transformation of the chain passes the updates
            through and keeps w_ahead in its state (`PredictionState`); every reader of a store
            (`DeviceView.read`, LAP-SGD's copies, a Ray stage server's pull) hands it to the units in
            place of the parameters. With stash residuals the gradient is then taken at w_ahead; with
            recompute residuals at the w_ahead the backward reads. Where nothing is stale (sync,
            layerwise, ddp: s = 0) w_ahead is the new parameters.

Corrections combine, joined by commas, in the order dc, scale, momentum, predict (`scale,momentum`: the
adapted momentum trace of g / (1 + s)). The default is `scale,momentum,predict`: measured on Fashion-MNIST
(docs/usage.md, "Staleness"), `none` diverges with default flags on 4 devices; `scale` alone keeps every
run finite because the stable learning rate of delayed SGD falls like 1 / staleness; adding `momentum`
takes back the implicit momentum that the scaled steps still carry; adding `predict` takes the gradient
about where it will be applied (MLP, 3 epochs, one device: gap to sync -1.58 without it, +0.24 with it).
`predict` without `scale` diverges on 4 devices.

A synchronous step passes s = 0 and w_read = w_now, where every correction is the identity, bit for
bit (scale passes a fresh gradient through untouched; dc adds g * g * 0; momentum uses mu exactly;
predict's w_ahead is w_new + 0 * u),
so `sync`, `layerwise` and `ddp` compute what they computed before corrections existed (tested).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

CORRECTIONS = ("none", "scale", "dc", "momentum", "predict")
NEEDS_READ_PARAMS = frozenset({"dc"})  # corrections that need the parameters a gradient was taken at
PREDICTS = "predict"  # the correction that changes what a forward pass reads (`predicted_params`)


def parse_corrections(text: str) -> frozenset:
    """`--staleness-correction`: one name or several joined by commas ("scale,momentum"); "none" alone.
    Raises ValueError naming what is wrong."""
    names = [name.strip() for name in str(text).split(",")]
    unknown = [name for name in names if name not in CORRECTIONS]
    if unknown or not names:
        raise ValueError(f"unknown value {unknown[0] if unknown else text!r}; choose from "
                         f"{', '.join(CORRECTIONS)} or several joined by commas (scale,momentum)")
    if "none" in names and len(names) > 1:
        raise ValueError(f"{text!r}: 'none' cannot be combined with a correction")
    return frozenset(names) - {"none"}


DC_LAMBDA = 0.04  # MXNet's dcasgd default (Zheng et al. use 0.04 for their ImageNet runs)
STALENESS_EMA = 0.95  # decay of the running mean staleness of `momentum` (about the last 20 updates)
ADAM_B1 = 0.9  # Adam's first-moment decay (optax's default), the momentum `momentum` corrects under Adam


def _float_staleness(staleness) -> jax.Array:
    return jnp.asarray(0 if staleness is None else staleness, dtype=jnp.float32)


def scale_by_staleness() -> optax.GradientTransformationExtraArgs:
    """g -> g / (1 + staleness). Stateless."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, staleness=None, **extra):
        del params, extra
        staleness = _float_staleness(staleness)
        factor = 1.0 / (1.0 + staleness)
        # A fresh gradient passes through untouched (not multiplied by 1.0): the fused update then
        # computes exactly what the rule alone computes, so layerwise stays bit-equal to sync.
        return jax.tree_util.tree_map(lambda g: jnp.where(staleness > 0, g * factor.astype(g.dtype), g),
                                      updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def delay_compensation(lam: float = DC_LAMBDA) -> optax.GradientTransformationExtraArgs:
    """g -> g + lam * g * g * (params - params_read), element-wise (DC-ASGD). Stateless.

    `params` are the parameters the update is applied to (w_now); `params_read` those the gradient was
    computed at. Without `params_read` (a caller that has none) the gradient passes unchanged.
    """
    if lam < 0:
        raise ValueError(f"delay compensation's lambda must be >= 0, got {lam}")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, params_read=None, **extra):
        del extra
        if params is None or params_read is None:
            return updates, state
        corrected = jax.tree_util.tree_map(lambda g, now, read: g + lam * g * g * (now - read),
                                           updates, params, params_read)
        return corrected, state

    return optax.GradientTransformationExtraArgs(init, update)


class StalenessMomentumState(NamedTuple):
    trace: Any
    mean_staleness: jax.Array  # the running mean, not yet bias-corrected
    count: jax.Array  # updates seen (for the bias correction)


def _debiased(mean, count, ema: float = STALENESS_EMA):
    """A running mean corrected for its zero start (as Adam's moments are): mean / (1 - ema^count)."""
    return mean / (1.0 - ema ** count)


def _running_staleness(state, staleness, ema: float):
    """One more update's staleness in a state's running mean: `(mean, count, s_bar)`, s_bar the
    bias-corrected mean including it (a state with `mean_staleness` and `count` fields)."""
    count = state.count + 1
    mean = ema * state.mean_staleness + (1.0 - ema) * _float_staleness(staleness)
    return mean, count, _debiased(mean, count.astype(jnp.float32), ema)


def explicit_momentum(momentum: float, mean_staleness) -> jax.Array:
    """The explicit momentum that keeps the total mean lag at `momentum`'s (module docstring)."""
    mean_staleness = jnp.asarray(mean_staleness, jnp.float32)
    lag = jnp.maximum(momentum / (1.0 - momentum) - mean_staleness, 0.0)
    return jnp.where(mean_staleness > 0, lag / (1.0 + lag), jnp.float32(momentum))


def staleness_momentum(momentum: float, nesterov: bool = False,
                       ema: float = STALENESS_EMA) -> optax.GradientTransformationExtraArgs:
    """Heavy-ball (or Nesterov) momentum whose coefficient falls as the mean staleness grows.

    Same trace as `optax.trace` (t <- g + mu_e * t; update t, or g + mu_e * t with Nesterov), with
    mu_e = `explicit_momentum(momentum, s_bar)` and s_bar the bias-corrected running mean of the
    staleness including this update's.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")

    def init(params):
        return StalenessMomentumState(trace=jax.tree_util.tree_map(jnp.zeros_like, params),
                                      mean_staleness=jnp.zeros([], jnp.float32), count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, staleness=None, **extra):
        del params, extra
        mean, count, s_bar = _running_staleness(state, staleness, ema)
        mu = explicit_momentum(momentum, s_bar)
        trace = jax.tree_util.tree_map(lambda g, t: g + mu.astype(g.dtype) * t, updates, state.trace)
        if nesterov:
            out = jax.tree_util.tree_map(lambda g, t: g + mu.astype(g.dtype) * t, updates, trace)
        else:
            out = trace
        return out, StalenessMomentumState(trace, mean, count)

    return optax.GradientTransformationExtraArgs(init, update)


class StalenessAdamState(NamedTuple):
    mu: Any  # first moment (not bias-corrected)
    nu: Any  # second moment (not bias-corrected)
    b1_product: jax.Array  # the product of the first moment's decays so far (its bias correction)
    mean_staleness: jax.Array  # the running mean, not yet bias-corrected
    count: jax.Array  # updates seen


def staleness_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   ema: float = STALENESS_EMA) -> optax.GradientTransformationExtraArgs:
    """Adam's scaling (as `optax.scale_by_adam`) with its first-moment decay reduced as the mean
    staleness grows: `momentum` for `--optimizer adam`.

    Adam's first moment is momentum in disguise: an exponential average with decay b1 is heavy-ball
    momentum b1 with the step scaled by 1 - b1, so the implicit momentum of asynchrony (module
    docstring) adds to it as it adds to SGD's. The decay used is b1_e = `explicit_momentum(b1, s_bar)`;
    the bias correction divides by 1 - prod(b1_e), the total weight of an average whose decay varies
    (1 - b1^t when it does not). The second moment keeps b2: it estimates the gradient's scale, which
    staleness does not bias. With b1_e = 0 (s_bar >= 9 for b1 = 0.9) the step is g / (sqrt(nu_hat) + eps).
    """
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"adam's b1 must be in [0, 1), got {b1}")

    def init(params):
        return StalenessAdamState(mu=otu.tree_zeros_like(params), nu=otu.tree_zeros_like(params),
                                  b1_product=jnp.ones([], jnp.float32), mean_staleness=jnp.zeros([], jnp.float32),
                                  count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, staleness=None, **extra):
        del params, extra
        mean, count, s_bar = _running_staleness(state, staleness, ema)
        decay = explicit_momentum(b1, s_bar)
        mu = otu.tree_update_moment(updates, state.mu, decay, 1)  # optax's own moments, as scale_by_adam's
        nu = otu.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
        b1_product = state.b1_product * decay
        nu_hat = otu.tree_bias_correction(nu, b2, count)
        out = jax.tree_util.tree_map(lambda m, v: (m / (1 - b1_product).astype(m.dtype)) / (jnp.sqrt(v) + eps),
                                     mu, nu_hat)
        return out, StalenessAdamState(mu, nu, b1_product, mean, count)

    return optax.GradientTransformationExtraArgs(init, update)


class PredictionState(NamedTuple):
    ahead: Any  # the parameters a forward pass reads: w_new + s_bar * u (the initial ones before any update)
    mean_staleness: jax.Array  # the running mean, not yet bias-corrected
    count: jax.Array  # updates seen (for the bias correction)


def weight_prediction(ema: float = STALENESS_EMA) -> optax.GradientTransformationExtraArgs:
    """The last transformation of a chain: passes the final updates u through unchanged and keeps
    `ahead = (params + u) + s_bar * u` in its state, s_bar the bias-corrected running mean staleness
    including this update's (module docstring, `predict`). `params + u` is what `optax.apply_updates`
    installs, so at s_bar = 0 `ahead` is the new parameters bit for bit."""

    def init(params):
        return PredictionState(ahead=params, mean_staleness=jnp.zeros([], jnp.float32),
                               count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, staleness=None, **extra):
        del extra
        if params is None:
            raise ValueError("weight prediction needs the parameters the update is applied to")
        mean, count, s_bar = _running_staleness(state, staleness, ema)
        new = optax.apply_updates(params, updates)
        ahead = jax.tree_util.tree_map(lambda w, u: w + s_bar.astype(w.dtype) * u.astype(w.dtype), new, updates)
        return updates, PredictionState(ahead, mean, count)

    return optax.GradientTransformationExtraArgs(init, update)


def _find(opt_state, kind):
    """The first `kind` state inside an optimiser state (None if the chain has none)."""
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda node: isinstance(node, kind)):
        if isinstance(leaf, kind):
            return leaf
    return None


def needs_read_params(text: str) -> bool:
    """Whether `--staleness-correction` `text` needs the parameters each gradient was taken at (dc):
    then whoever applies an update keeps them from the read until the commit."""
    return bool(parse_corrections(text) & NEEDS_READ_PARAMS)


def predicted_params(params, opt_state):
    """What a forward pass should read of a stage: its predicted parameters where its optimiser
    predicts (`predict`), else `params` itself."""
    found = _find(opt_state, PredictionState)
    return params if found is None else found.ahead


def with_prediction(opt_state, ahead):
    """`opt_state` with its predicted parameters replaced by `ahead` (a copy moved without an update:
    LAP-SGD's averaging shifts them as it shifts the parameters)."""
    return jax.tree_util.tree_map(
        lambda node: node._replace(ahead=ahead) if isinstance(node, PredictionState) else node, opt_state,
        is_leaf=lambda node: isinstance(node, PredictionState))


def describe(config, opt_states) -> dict:
    """The run's correction for summary.json: its name and settings; for `momentum`, per stage the
    running mean staleness and the explicit momentum it ended at; for `predict`, per stage the horizon
    (the running mean staleness) its forward passes read ahead by at the end (from the stages'
    optimiser states)."""
    names = parse_corrections(config.staleness_correction)
    out: dict[str, Any] = {"name": config.staleness_correction}
    if "dc" in names:
        out["dc_lambda"] = config.dc_lambda
    if "momentum" in names:
        adam = config.optimizer == "adam"  # the corrected momentum is Adam's first-moment decay b1
        momentum = ADAM_B1 if adam else config.momentum
        out["momentum"], out["ema"] = momentum, STALENESS_EMA
        means = [_mean_staleness(state, StalenessAdamState if adam else StalenessMomentumState)
                 for state in opt_states]
        out["mean_staleness_by_stage"] = means
        out["explicit_momentum_by_stage"] = [None if m is None else float(explicit_momentum(momentum, m))
                                             for m in means]
    if "predict" in names:  # how far ahead each stage's forward passes read at the end
        out["prediction_horizon_by_stage"] = [_mean_staleness(state, PredictionState) for state in opt_states]
    return out


def _mean_staleness(opt_state, kind=StalenessMomentumState) -> Optional[float]:
    """The bias-corrected running mean staleness held in a stage's optimiser state (None before any update)."""
    found = _find(opt_state, kind)
    if found is None or int(found.count) == 0:
        return None
    return float(_debiased(float(found.mean_staleness), int(found.count)))
