"""In-memory datasets, normalisation, seeded batching and the prefetch worker."""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Optional

import jax
import numpy as np

from asyncsgd.data.augment import crop_flip


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory.

    Images are N x H x W x C (uint8 as loaded, float32 once normalised); token sequences are
    N x max_len int32 ids (`vocab_size` > 0); labels are int32. `augmentation` names the training
    augmentation the dataset calls for ("crop_flip" for CIFAR, "" for none).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    source: str = ""
    vocab_size: int = 0
    augmentation: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def subset(self, train_examples: Optional[int]) -> "Dataset":
        """The first `train_examples` training examples (the test split is kept whole)."""
        if train_examples is None or train_examples >= len(self.train_y):
            return self
        return dataclasses.replace(self, train_x=self.train_x[:train_examples],
                                   train_y=self.train_y[:train_examples])

    def normalized(self) -> "Dataset":
        """Scales to [0, 1] then standardises with the training split's per-channel mean and std
        (token ids are returned unchanged)."""
        if self.vocab_size:
            return self
        train = self.train_x.astype(np.float32)
        test = self.test_x.astype(np.float32)
        if self.train_x.dtype == np.uint8:
            train, test = train / 255.0, test / 255.0
        axes = tuple(range(train.ndim - 1))
        mean = train.mean(axis=axes, dtype=np.float64).astype(np.float32)
        std = train.std(axis=axes, dtype=np.float64).astype(np.float32) + 1e-6
        return dataclasses.replace(self, train_x=(train - mean) / std, test_x=(test - mean) / std)


class Batch(NamedTuple):
    """One training batch; `seq` numbers batches across the whole run, in order."""

    seq: int
    epoch: int
    x: jax.Array
    y: jax.Array


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped: units are compiled for one shape)."""
    return num_examples // batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of example indices for `epoch` (same seed and epoch, same order)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def augment_batch(dataset: Dataset, x: np.ndarray, seed: int, seq: int) -> np.ndarray:
    """The dataset's training augmentation of one batch, seeded by (seed, seq)."""
    if dataset.augmentation == "crop_flip":
        return crop_flip(x, np.random.default_rng([seed, seq, 7]))
    if dataset.augmentation:
        raise ValueError(f"unknown augmentation {dataset.augmentation!r}")
    return x


def iterate_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, first_seq: int,
                    max_batches: Optional[int] = None, augment: bool = False,
                    skip: int = 0, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields `(seq, x, y)` NumPy batches of one epoch in seeded order (augmented if `augment`).

    Args:
      first_seq: the seq of the first batch yielded.
      max_batches: yield at most this many.
      skip: start at this batch of the epoch (a resumed run): the batches and their augmentation are
        those an uninterrupted run would have had at the same place.
      shard: `(position, count)`: of those batches only every count-th, from the position-th (one
        worker's share when `count` workers split them); seqs stay consecutive from `first_seq`.
    """
    order = epoch_order(len(dataset.train_y), seed, epoch)
    end = steps_per_epoch(len(order), batch_size)
    if max_batches is not None:
        end = min(end, skip + max_batches)
    position, count = shard
    for seq, index in enumerate(range(skip + position, end, count), start=first_seq):
        idx = np.sort(order[index * batch_size:(index + 1) * batch_size])
        x = dataset.train_x[idx]
        if augment:
            x = augment_batch(dataset, x, seed, seq)
        yield seq, x, dataset.train_y[idx]


def prefetch_worker(worker, dataset: Dataset, batch_size: int, seed: int, epoch: int, first_seq: int,
                    max_batches: Optional[int], out, augment: bool = False, placement=None, skip: int = 0,
                    shard: tuple[int, int] = (0, 1)) -> None:
    """Worker body: gathers (and augments) batches on the host, copies them to the device (or the
    sharding `placement`; default: the default device), feeds `out`."""
    for seq, x, y in iterate_batches(dataset, batch_size, seed, epoch, first_seq, max_batches, augment, skip, shard):
        worker.beat(f"preparing batch {seq}")
        worker.put(out, Batch(seq, epoch, jax.device_put(x, placement), jax.device_put(y, placement)))


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """Yields `(x, y, mask)` batches of exactly `batch_size`, the last one zero-padded and masked."""
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        mask = np.ones(batch_size, np.float32)
        pad = batch_size - len(yb)
        if pad:
            mask[len(yb):] = 0.0
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        yield xb, yb, mask
