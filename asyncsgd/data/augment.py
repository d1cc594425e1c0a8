"""Training augmentations applied to NumPy batches in the prefetch worker (seeded per batch)."""

from __future__ import annotations

import numpy as np


def crop_flip(x_BxHxWxC: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Standard CIFAR augmentation, vectorised: zero-pad by `pad`, random crop back, random h-flip."""
    batch, height, width, _ = x_BxHxWxC.shape
    padded = np.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=batch)
    dx = rng.integers(0, 2 * pad + 1, size=batch)
    rows = dy[:, None] + np.arange(height)[None, :]            # B x H
    cols = dx[:, None] + np.arange(width)[None, :]             # B x W
    flip = rng.random(batch) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]
