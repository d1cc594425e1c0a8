"""A 2-D convolution whose weight gradient is computed as shifted matrix products, in cache-sized chunks.

Why: on XLA's CPU backend the weight gradient of a convolution (the "backward filter" convolution,
which contracts over batch x height x width) is the slow part of a training step. Its form here: one
(rows x C_in)^T (rows x C_out) matrix product per kernel offset over shifted views of the padded input,
summed over chunks of the batch small enough that a chunk's views and output gradient stay in cache
(`weight_grad_chunk`). Measured on this 2-core machine (jax 0.10.2, Xeon with AVX-512), batch 128,
28x28, 32 -> 32 channels, 3x3: XLA's own weight gradient 54 ms, the nine shifted products over the
whole batch at once 49 ms (XLA materialises every 12.8 MB view: the products themselves take 1.5 ms
each), the same in chunks of 4 images 23 ms; 32x32, 64 -> 64 (ResNet-18's first group) 220 -> 110 ms.
Where a chunk would hold most of the batch (small feature maps: 7x7, 4x4) the whole-batch form is
as fast and is kept. The chunk size is a fixed function of the shapes (not timed at compile time), so
the same model always computes the same sums in the same order on every machine.

The forward convolution and the input gradient keep XLA's own: every matrix-product form of them
measured (shifted products, im2col, in chunks or not) was slower, by 1.2-4x (docs/measurements.md).

`conv2d` is exact up to float32 summation order: the tests compare its value and both gradients with
`lax.conv_general_dilated`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding (low, high) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x_BxHxWxC: jax.Array, w_KhxKwxCxO: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """NHWC / HWIO convolution with explicit padding; see the module docstring for its gradient."""
    return _conv(x_BxHxWxC, w_KhxKwxCxO, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


# Bytes of one chunk's working set (its views, one row per output position and kernel offset, and its
# output gradient) that the chunked weight gradient aims at: a few MB, the size of this CPU's caches.
CHUNK_BYTES = 6 * 2 ** 20
# Fewer chunks than this, or output maps smaller than this many positions (7x7, 4x4), and the chunk
# loop costs as much as it saves or more (measured: 7x7 equal, 4x4 x 512 channels 20% slower).
MIN_CHUNKS = 4
MIN_POSITIONS = 64

# Every weight-gradient shape traced in this process and the form chosen for it (the bench prints it).
CHOICES: dict[tuple, str] = {}

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
        CHOICES[(batch, *x_BxHxWxC.shape[1:], out_c, *kernel, *strides)] = (
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


def _conv2d_bwd(strides, padding, residuals, dy):
    x, w = residuals
    _, pullback = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
    (dx,) = pullback(dy)
    return dx, weight_grad(x, dy, w.shape[:2], strides, padding).astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


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
