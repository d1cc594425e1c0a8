"""Datasets: IDX (MNIST, Fashion-MNIST), synthetic; batching and prefetch."""

from __future__ import annotations

import os
from typing import Optional

from asyncsgd.data.dataset import Batch, Dataset, eval_batches, iterate_batches, steps_per_epoch
from asyncsgd.data.idx import DataFormatError, read_idx, write_idx
from asyncsgd.data.mnist import load_idx_dataset
from asyncsgd.data.sources import ChecksumError, DatasetNotFound
from asyncsgd.data.synthetic import synthetic


def load_dataset(name: str, data_dir: Optional[str] = None, download: Optional[bool] = None) -> Dataset:
    """Loads a dataset by name (raw, not normalised).

    Args:
      download: allow downloading missing files (default: yes, unless `$ASYNCSGD_OFFLINE` is set).
    """
    if download is None:
        download = os.environ.get("ASYNCSGD_OFFLINE", "") in ("", "0")
    if name == "synthetic":
        return synthetic()
    if name in ("fashion_mnist", "mnist"):
        return load_idx_dataset(name, data_dir, download=download)
    raise ValueError(f"unknown dataset {name!r}")


__all__ = ["Batch", "ChecksumError", "DataFormatError", "Dataset", "DatasetNotFound", "eval_batches",
           "iterate_batches", "load_dataset", "read_idx", "steps_per_epoch", "synthetic", "write_idx"]
