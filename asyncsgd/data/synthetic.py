"""A learnable synthetic dataset of any image shape, for tests and benchmarks.

Each class has a fixed random prototype image; an example is its prototype plus Gaussian noise, so
a model can learn it quickly but not trivially.
"""

from __future__ import annotations

import numpy as np

from asyncsgd.data.dataset import Dataset


def synthetic(num_train: int = 2048, num_test: int = 512, input_shape=(28, 28, 1), num_classes: int = 10,
              noise: float = 1.0, seed: int = 0) -> Dataset:
    """Builds the dataset (float32 images, int32 labels); deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(num_classes, *input_shape)).astype(np.float32)

    def split(count: int):
        labels = rng.integers(0, num_classes, size=count).astype(np.int32)
        images = prototypes[labels] + noise * rng.normal(size=(count, *input_shape)).astype(np.float32)
        return images.astype(np.float32), labels

    train_x, train_y = split(num_train)
    test_x, test_y = split(num_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, num_classes, source="generated")
