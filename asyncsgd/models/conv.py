"""A 2-D convolution for the CPU: oneDNN's kernels where they can be built, else XLA's own with a
weight gradient as shifted matrix products in cache-sized chunks.

Which form a convolution takes is decided once, when it is traced (`backend_for`): `onednn` (the
forward, the input gradient and the weight gradient as FFI custom calls into oneDNN,
`asyncsgd/models/onednn.py`) on the CPU for float32 when the library builds, otherwise `xla`.
`ASYNCSGD_CONV=auto|onednn|xla` (or `using(name)` around the compilation) chooses: `auto` (default)
takes oneDNN when available, `onednn` fails with the reason when it is not, `xla` never uses it.
FLOP counts (`counting_flops()`) always trace the XLA form: XLA's cost analysis cannot see inside a
custom call. `CHOICES` records every shape traced in this process and its form (the bench prints it).

Measured on this 2-core machine (jax 0.10.2, Xeon with AVX-512, batch 128; docs/measurements.md):
one 3x3 convolution 28x28, 32 -> 32 channels, oneDNN forward 6.3 ms, input gradient 6.2, weight
gradient 6.0; XLA's forward 15.6, input gradient 19.0 and the chunked weight gradient below 31.

The XLA form's weight gradient. On XLA's CPU backend the weight gradient of a convolution (the
"backward filter" convolution, which contracts over batch x height x width) is the slow part of a
training step. Its form here: one (rows x C_in)^T (rows x C_out) matrix product per kernel offset over
shifted views of the padded input, summed over chunks of the batch small enough that a chunk's views
and output gradient stay in cache (`weight_grad_chunk`): 28x28, 32 -> 32: XLA's own 54 ms, the nine
products over the whole batch 49 ms, in chunks of 4 images 23 ms (an earlier measurement of the same
shape). Where a chunk would hold most of the batch (small feature maps: 7x7, 4x4) the whole-batch form
is as fast and is kept. The chunk size is a fixed function of the shapes (not timed at compile time).
Every matrix-product form of the forward and the input gradient measured was slower than XLA's.

`conv2d` is exact up to float32 summation order in either form: the tests compare its value and both
gradients with `lax.conv_general_dilated`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from asyncsgd.errors import ConfigError
from asyncsgd.models import onednn

_DIMS = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding (low, high) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS)


BACKENDS = ("auto", "onednn", "xla")
_BACKEND = contextvars.ContextVar("asyncsgd_conv_backend", default=None)


def _known(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"{what}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    """The form asked for: `using(...)` if active, else `$ASYNCSGD_CONV`, else `auto`."""
    return _BACKEND.get() or _known(os.environ.get("ASYNCSGD_CONV") or "auto", "ASYNCSGD_CONV")


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Convolutions traced inside take form `name` (auto, onednn or xla)."""
    token = _BACKEND.set(_known(name, "convolution form"))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def backend_for(dtype) -> str:
    """`onednn` or `xla` for a convolution of `dtype` traced now (see the module docstring)."""
    requested = requested_backend()
    if requested == "xla" or _COUNTING_FLOPS.get():
        return "xla"
    if jax.default_backend() != "cpu":
        reason = f"oneDNN convolutions run on the CPU only (JAX's backend is {jax.default_backend()})"
    elif jnp.dtype(dtype) != jnp.float32:
        reason = f"oneDNN convolutions are built for float32 only (got {jnp.dtype(dtype)})"
    else:
        available, reason = onednn.status()
        if available:
            return "onednn"
    if requested == "onednn":
        raise ConfigError(f"ASYNCSGD_CONV=onednn: {reason}")
    return "xla"


def conv2d(x_BxHxWxC: jax.Array, w_KhxKwxCxO: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """NHWC / HWIO convolution with explicit padding, in the form `backend_for` picks."""
    form = backend_for(x_BxHxWxC.dtype)
    if form == "onednn":
        CHOICES[_shape_key(x_BxHxWxC.shape, w_KhxKwxCxO.shape[-1], w_KhxKwxCxO.shape[:2], strides)] = "onednn"
    return _conv2d(x_BxHxWxC, w_KhxKwxCxO, tuple(strides), tuple(map(tuple, padding)), form)


def _shape_key(input_shape, out_c, kernel, strides) -> tuple:
    """`CHOICES`' key: (batch, height, width, in channels, out channels, kernel h, kernel w, strides)."""
    return (*input_shape, out_c, *kernel, *strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x, w, strides, padding, form):
    return onednn.forward(x, w, strides, padding) if form == "onednn" else _conv(x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding, form):
    return _conv2d(x, w, strides, padding, form), (x, w)


# Bytes of one chunk's working set (its views, one row per output position and kernel offset, and its
# output gradient) that the chunked weight gradient aims at: a few MB, the size of this CPU's caches.
CHUNK_BYTES = 6 * 2 ** 20
# Fewer chunks than this, or output maps smaller than this many positions (7x7, 4x4), and the chunk
# loop costs as much as it saves or more (measured: 7x7 equal, 4x4 x 512 channels 20% slower).
MIN_CHUNKS = 4
MIN_POSITIONS = 64

# Every convolution shape traced in this process and its form: "onednn", or XLA's with the weight
# gradient over the "whole batch" or in "chunks of K" (the bench prints it).
CHOICES: dict[tuple, str] = {}

def describe_choices(batch: Optional[int] = None) -> dict[str, str]:
    """`CHOICES` with readable keys: "BxHxWxC_inxC_outxKhxKwxShxSw" -> form; only those of batch size
    `batch` when given (leaving out, say, the small batches units are first compiled at)."""
    return {"x".join(map(str, key)): form for key, form in sorted(CHOICES.items())
            if batch is None or key[0] == batch}


# XLA's cost analysis counts a loop's body once, not once per trip: FLOP counts trace the whole-batch
# form (the same arithmetic) under `counting_flops()`.
_COUNTING_FLOPS = contextvars.ContextVar("asyncsgd_counting_flops", default=False)


@contextlib.contextmanager
def counting_flops() -> Iterator[None]:
    """While tracing for a FLOP count: the weight gradient takes its loop-free form."""
    token = _COUNTING_FLOPS.set(True)
    try:
        yield
    finally:
        _COUNTING_FLOPS.reset(token)


def weight_grad_chunk(batch: int, out_hw: tuple[int, int], kernel: tuple[int, int], in_c: int, out_c: int) -> int:
    """Images per chunk of the weight gradient: the largest divisor of `batch` whose working set fits
    `CHUNK_BYTES`, or the whole batch when that leaves fewer than `MIN_CHUNKS` chunks or the output
    map has fewer than `MIN_POSITIONS` positions."""
    rows_per_image = out_hw[0] * out_hw[1]
    if rows_per_image < MIN_POSITIONS:
        return batch
    per_image = rows_per_image * (kernel[0] * kernel[1] * in_c + out_c) * 4
    chunk = max((d for d in range(1, batch + 1) if batch % d == 0 and d * per_image <= CHUNK_BYTES), default=1)
    return batch if batch // chunk < MIN_CHUNKS else chunk


def _offset_products(x_pad, dy_NxO, kernel, strides, out_hw):
    """[sum over rows of view_(kh,kw)^T dy for every kernel offset], stacked (Kh*Kw, C, O)."""
    (sh, sw), (out_h, out_w) = strides, out_hw
    in_c = x_pad.shape[-1]
    views = [x_pad[:, kh:kh + sh * (out_h - 1) + 1:sh, kw:kw + sw * (out_w - 1) + 1:sw, :].reshape(-1, in_c)
             for kh in range(kernel[0]) for kw in range(kernel[1])]
    return jnp.stack([view.T @ dy_NxO for view in views])


def weight_grad(x_BxHxWxC, dy_BxHoxWoxO, kernel: tuple[int, int], strides, padding) -> jax.Array:
    """d loss / d kernel as one matrix product per kernel offset over shifted input views, summed over
    chunks of `weight_grad_chunk` images (a loop in the compiled code, so a chunk stays in cache)."""
    pad_h, pad_w = padding
    x_pad = jnp.pad(x_BxHxWxC, ((0, 0), pad_h, pad_w, (0, 0)))
    batch, out_h, out_w, out_c = dy_BxHoxWoxO.shape
    in_c = x_BxHxWxC.shape[-1]
    counting = _COUNTING_FLOPS.get()
    chunk = batch if counting else weight_grad_chunk(batch, (out_h, out_w), kernel, in_c, out_c)
    if not counting:
        CHOICES[_shape_key(x_BxHxWxC.shape, out_c, kernel, strides)] = (
            "whole batch" if chunk == batch else f"chunks of {chunk}")
    if chunk == batch:
        grads = _offset_products(x_pad, dy_BxHoxWoxO.reshape(-1, out_c), kernel, strides, (out_h, out_w))
    else:
        x_chunks = x_pad.reshape(batch // chunk, chunk, *x_pad.shape[1:])
        dy_chunks = dy_BxHoxWoxO.reshape(batch // chunk, chunk * out_h * out_w, out_c)

        def add_chunk(index, total):
            return total + _offset_products(x_chunks[index], dy_chunks[index], kernel, strides, (out_h, out_w))

        grads = lax.fori_loop(0, batch // chunk, add_chunk,
                              jnp.zeros((kernel[0] * kernel[1], in_c, out_c), dy_BxHoxWoxO.dtype))
    return grads.reshape(kernel[0], kernel[1], in_c, out_c)


def _conv2d_bwd(strides, padding, form, residuals, dy):
    x, w = residuals
    # a FLOP count of a backward unit traces this rule again (with the form of the forward pass that
    # made the residuals): it takes the XLA form, which the cost analysis can see into
    if form == "onednn" and not _COUNTING_FLOPS.get():
        return (onednn.input_grad(dy, w, x.shape, strides, padding),
                onednn.weight_grad(x, dy, w.shape, strides, padding))
    _, pullback = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
    (dx,) = pullback(dy)
    return dx, weight_grad(x, dy, w.shape[:2], strides, padding).astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
    """Drop-in for `flax.linen.Conv` (NHWC, SAME padding, parameters `kernel` and `bias`)."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x_BxHxWxC.shape[-1], self.features))
        strides = tuple(self.strides)
        padding = (same_padding(x_BxHxWxC.shape[1], kh, strides[0]),
                   same_padding(x_BxHxWxC.shape[2], kw, strides[1]))
        y = conv2d(x_BxHxWxC, kernel, strides, padding)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias.reshape(1, 1, 1, self.features)
        return y
