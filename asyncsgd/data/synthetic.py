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


def synthetic_text(num_train: int = 2048, num_test: int = 512, max_len: int = 32, vocab_size: int = 64,
                   num_classes: int = 2, seed: int = 0) -> Dataset:
    """A learnable token-sequence dataset shaped like IMDb: each class draws its tokens from its own
    random distribution over the vocabulary (ids >= 2; 0 is padding, 1 out-of-vocabulary), and each
    sequence is left-padded to `max_len` after a random length of at least `max_len // 2`."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(num_classes, vocab_size - 2))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    def split(count: int):
        labels = rng.integers(0, num_classes, size=count).astype(np.int32)
        tokens = np.zeros((count, max_len), np.int32)
        for row, label in enumerate(labels):
            length = int(rng.integers(max(1, max_len // 2), max_len + 1))
            tokens[row, max_len - length:] = 2 + rng.choice(vocab_size - 2, size=length, p=probs[label])
        return tokens, labels

    train_x, train_y = split(num_train)
    test_x, test_y = split(num_test)
    return Dataset("synthetic_text", train_x, train_y, test_x, test_y, num_classes, source="generated",
                   vocab_size=vocab_size)
