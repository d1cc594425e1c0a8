"""Datasets: IDX (MNIST, Fashion-MNIST), CIFAR-10/100, IMDb, synthetic; batching and prefetch."""

from __future__ import annotations

import os
from typing import Optional

from asyncsgd.data.cifar import load_cifar, write_cifar_archive
from asyncsgd.data.dataset import Batch, Dataset, eval_batches, iterate_batches, steps_per_epoch
from asyncsgd.data.imdb import load_imdb
from asyncsgd.data.idx import read_idx, write_idx
from asyncsgd.data.mnist import load_idx_dataset
from asyncsgd.errors import ChecksumError, DataFormatError, DatasetNotFound
from asyncsgd.data.synthetic import synthetic, synthetic_text


def load_dataset(name: str, data_dir: Optional[str] = None, download: Optional[bool] = None,
                 cifar100_labels: str = "fine", vocab_size: int = 20000, min_count: int = 2,
                 max_len: int = 256) -> Dataset:
    """Loads a dataset by name (raw, not normalised).

    Args:
      download: allow downloading missing files (default: yes, unless `$ASYNCSGD_OFFLINE` is set).
      cifar100_labels: "fine" (100 classes) or "coarse" (20).
      vocab_size, min_count, max_len: IMDb tokenisation (see `asyncsgd.data.imdb`).
    """
    if download is None:
        download = os.environ.get("ASYNCSGD_OFFLINE", "") in ("", "0")
    if name == "synthetic":
        return synthetic()
    if name == "synthetic_text":
        return synthetic_text()
    if name in ("fashion_mnist", "mnist"):
        return load_idx_dataset(name, data_dir, download=download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, download=download, labels=cifar100_labels)
    if name == "imdb":
        return load_imdb(data_dir, download=download, vocab_size=vocab_size, min_count=min_count, max_len=max_len)
    raise ValueError(f"unknown dataset {name!r}")


def synthetic_like(name: str, num_train: int, num_test: int, seed: int = 0, max_len: int = 256,
                   vocab_size: int = 20000) -> Dataset:
    """Synthetic data with the shapes and class count of dataset `name` (for benchmarks)."""
    if name in ("imdb", "synthetic_text"):
        return synthetic_text(num_train, num_test, max_len=max_len, vocab_size=vocab_size, seed=seed)
    shape, classes = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100)}.get(name, ((28, 28, 1), 10))
    return synthetic(num_train, num_test, input_shape=shape, num_classes=classes, seed=seed)


__all__ = ["Batch", "ChecksumError", "DataFormatError", "Dataset", "DatasetNotFound", "eval_batches",
           "iterate_batches", "load_cifar", "load_dataset", "load_imdb", "read_idx", "steps_per_epoch", "synthetic",
           "synthetic_like", "synthetic_text", "write_cifar_archive", "write_idx"]
