"""CIFAR-10 and CIFAR-100 from the standard Python-pickle archives, and their augmentation.

Files: `cifar-10-python.tar.gz` (folder `cifar-10-batches-py/`: `data_batch_1..5`, `test_batch`) and
`cifar-100-python.tar.gz` (folder `cifar-100-python/`: `train`, `test`), found with the search order
of `asyncsgd.data.sources` either as the archive or as its extracted folder, or downloaded from
the canonical URLs and checked against their SHA-256. The pickles are read with an unpickler that
only accepts NumPy arrays (a pickle can otherwise run arbitrary code).

Each pickle is a dict with bytes keys: `data` (uint8, N x 3072, channel-major 3 x 32 x 32 rows) and
`labels` (CIFAR-10) or `fine_labels` / `coarse_labels` (CIFAR-100).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from typing import Optional

import numpy as np

from asyncsgd.data.augment import crop_flip  # noqa: F401  (re-exported: the CIFAR augmentation)
from asyncsgd.data.dataset import Dataset
from asyncsgd.errors import DataFormatError
from asyncsgd.data.sources import RemoteFile, Source, locate_archive

SOURCES = {
    "cifar10": Source("cifar10", "https://www.cs.toronto.edu/~kriz/", (RemoteFile(
        "cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),)),
    "cifar100": Source("cifar100", "https://www.cs.toronto.edu/~kriz/", (RemoteFile(
        "cifar-100-python.tar.gz", "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),)),
}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
SPLITS = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
          "cifar100": (["train"], ["test"])}
NUM_CLASSES = {("cifar10", "fine"): 10, ("cifar10", "coarse"): 10,
               ("cifar100", "fine"): 100, ("cifar100", "coarse"): 20}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays; refuses every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        batch = _ArraysOnly(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # truncated or corrupt pickles raise many types
        raise DataFormatError(f"{where}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataFormatError(f"{where}: expected a dict, found {type(batch).__name__}")
    return batch


def _read_members(path: str, folder: str, names: list[str]) -> dict[str, bytes]:
    """The raw bytes of `names`, from an extracted folder or from the archive."""
    if os.path.isdir(path):
        out = {}
        for name in names:
            with open(os.path.join(path, name), "rb") as handle:
                out[name] = handle.read()
        return out
    try:
        with tarfile.open(path, "r:gz") as tar:
            out = {}
            for name in names:
                try:
                    member = tar.extractfile(f"{folder}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise DataFormatError(f"{path}: archive has no {folder}/{name}")
                out[name] = member.read()
            return out
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc}); "
                              "delete it to download it again") from None


def _split(blobs: dict[str, bytes], names: list[str], label_key: bytes, num_classes: int,
           where: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        batch = _unpickle(blobs[name], f"{where}/{name}")
        if b"data" not in batch or label_key not in batch:
            raise DataFormatError(f"{where}/{name}: missing key {b'data' if b'data' not in batch else label_key!r}")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataFormatError(f"{where}/{name}: expected uint8 data N x 3072 and N labels, got "
                                  f"{data.dtype} {data.shape} and {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataFormatError(f"{where}/{name}: label {int(labels.max())} out of range 0-{num_classes - 1}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels.astype(np.int32))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar(name: str, data_dir: Optional[str] = None, download: bool = True,
               labels: str = "fine") -> Dataset:
    """Loads `cifar10` or `cifar100` (`labels`: "fine" (100 classes) or "coarse" (20), CIFAR-100 only).

    Returns:
      A `Dataset` of raw uint8 images N x 32 x 32 x 3 and int32 labels, with crop-and-flip training
      augmentation declared (applied per batch by the prefetch worker).
    """
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    folder = FOLDERS[name]
    train_names, test_names = SPLITS[name]
    path = locate_archive(SOURCES[name], folder, train_names + test_names, data_dir, download)
    blobs = _read_members(path, folder, train_names + test_names)
    label_key = b"labels" if name == "cifar10" else labels.encode() + b"_labels"
    num_classes = NUM_CLASSES[(name, labels)]
    train_x, train_y = _split(blobs, train_names, label_key, num_classes, path)
    test_x, test_y = _split(blobs, test_names, label_key, num_classes, path)
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes=num_classes, source=path,
                   augmentation="crop_flip")


def write_cifar_archive(path: str, name: str, train: tuple[np.ndarray, np.ndarray],
                        test: tuple[np.ndarray, np.ndarray], batches: int = 5) -> None:
    """Writes images (N x 32 x 32 x 3 uint8) and labels as a CIFAR archive in the real format
    (used by the tests; `batches` training pickles for CIFAR-10, as published)."""
    folder = FOLDERS[name]

    def payload(x, y):
        data = np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072), dtype=np.uint8)
        if name == "cifar10":
            return {b"batch_label": b"batch", b"labels": [int(v) for v in y], b"data": data,
                    b"filenames": [b"x.png"] * len(y)}
        return {b"filenames": [b"x.png"] * len(y), b"batch_label": b"batch", b"fine_labels": [int(v) for v in y],
                b"coarse_labels": [int(v) // 5 for v in y], b"data": data}

    files = {}
    if name == "cifar10":
        for index, (xs, ys) in enumerate(zip(np.array_split(train[0], batches), np.array_split(train[1], batches))):
            files[f"data_batch_{index + 1}"] = payload(xs, ys)
        files["test_batch"] = payload(*test)
    else:
        files["train"], files["test"] = payload(*train), payload(*test)
    with tarfile.open(path, "w:gz") as tar:
        for member, content in files.items():
            blob = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
