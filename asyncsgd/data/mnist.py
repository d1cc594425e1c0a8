"""MNIST and Fashion-MNIST from their IDX files."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from asyncsgd.data.dataset import Dataset
from asyncsgd.data.idx import read_idx
from asyncsgd.errors import DataFormatError
from asyncsgd.data.sources import RemoteFile, Source, locate

_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
          "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# SHA-256 of the files as the canonical servers distribute them (checked on download only: local
# copies, e.g. Debian's recompressed ones, are validated by parsing instead).
SOURCES = {
    "fashion_mnist": Source(
        "fashion_mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        tuple(RemoteFile(n, h) for n, h in zip(_FILES, (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"))),
        system_dirs=("/usr/share/datasets/fashion-mnist",)),
    "mnist": Source(
        "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/",
        tuple(RemoteFile(n, h) for n, h in zip(_FILES, (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"))),
        system_dirs=("/usr/share/datasets/mnist",)),
}


def _load_split(directory: str, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(os.path.join(directory, images))
    y = read_idx(os.path.join(directory, labels))
    if x.ndim != 3 or y.ndim != 1:
        raise DataFormatError(f"{directory}: expected images N x H x W and labels N, got {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataFormatError(f"{directory}: {x.shape[0]} images but {y.shape[0]} labels in {images}/{labels}")
    if y.size and y.max() > 9:
        raise DataFormatError(f"{directory}/{labels}: label {int(y.max())} out of range 0-9")
    return x, y


def load_idx_dataset(name: str, data_dir: Optional[str] = None, download: bool = True) -> Dataset:
    """Loads `fashion_mnist` or `mnist` (search order in `asyncsgd.data.sources`).

    Returns:
      A `Dataset` with raw uint8 images of shape N x 28 x 28 x 1 and int32 labels.
    """
    directory = locate(SOURCES[name], data_dir, download=download)
    train_x, train_y = _load_split(directory, _FILES[0], _FILES[1])
    test_x, test_y = _load_split(directory, _FILES[2], _FILES[3])
    return Dataset(name, train_x[..., None], train_y.astype(np.int32), test_x[..., None],
                   test_y.astype(np.int32), num_classes=10, source=directory)
