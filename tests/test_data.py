"""Data: IDX parsing on generated files, corrupt files, the search order, downloads and checksums."""

import gzip
import hashlib
import os

import numpy as np
import pytest
from conftest import FASHION_DIR, has_fashion_mnist

from asyncsgd.data import (ChecksumError, DataFormatError, DatasetNotFound, iterate_batches, load_dataset,
                           read_idx, synthetic, write_idx)
from asyncsgd.data.dataset import eval_batches
from asyncsgd.data.mnist import load_idx_dataset
from asyncsgd.data.sources import RemoteFile, Source, locate

_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
          "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _write_fake_mnist(directory, train=60, test=20, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = (rng.integers(0, 256, (train, 28, 28)), rng.integers(0, 10, train),
              rng.integers(0, 256, (test, 28, 28)), rng.integers(0, 10, test))
    for name, array in zip(_NAMES, arrays):
        write_idx(os.path.join(directory, name), array.astype(np.uint8))
    return arrays


def test_idx_round_trip_gzip_and_raw(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        path = str(tmp_path / f"a{compress}.idx")
        write_idx(path, array, compress=compress)
        np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x01\x02" + raw[2:], "bad magic"),
    (lambda raw: raw[:-5], "truncated or corrupt IDX data"),
    (lambda raw: raw[:6], "truncated IDX header"),
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "unknown IDX type code"),
])
def test_corrupt_idx_files_give_clear_errors(tmp_path, damage, message):
    path = str(tmp_path / "x.idx")
    write_idx(path, np.zeros((3, 4, 4), np.uint8), compress=False)
    with open(path, "rb") as handle:
        raw = handle.read()
    with open(path, "wb") as handle:
        handle.write(damage(raw))
    with pytest.raises(DataFormatError, match=message):
        read_idx(path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = str(tmp_path / "x.idx.gz")
    write_idx(path, np.zeros((50, 28, 28), np.uint8))
    with open(path, "rb") as handle:
        raw = handle.read()
    with open(path, "wb") as handle:
        handle.write(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated gzip"):
        read_idx(path)


def test_loader_uses_data_dir_first_and_checks_label_count(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    arrays = _write_fake_mnist(str(tmp_path / "mine"))
    dataset = load_idx_dataset("fashion_mnist", data_dir=str(tmp_path / "mine"), download=False)
    assert dataset.train_x.shape == (60, 28, 28, 1) and dataset.test_x.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(dataset.train_y, arrays[1])
    assert dataset.source == str(tmp_path / "mine")
    write_idx(str(tmp_path / "mine" / _NAMES[1]), np.zeros(59, np.uint8))
    with pytest.raises(DataFormatError, match="60 images but 59 labels"):
        load_idx_dataset("fashion_mnist", data_dir=str(tmp_path / "mine"), download=False)


def test_env_var_is_searched_before_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_fake_mnist(str(tmp_path / "cache" / "asyncsgd" / "mnist"), train=30)
    _write_fake_mnist(str(tmp_path / "env" / "mnist"), train=40)
    monkeypatch.setenv("ASYNCSGD_DATA", str(tmp_path / "env"))
    assert len(load_idx_dataset("mnist", download=False).train_y) == 40
    monkeypatch.delenv("ASYNCSGD_DATA")
    assert len(load_idx_dataset("mnist", download=False).train_y) == 30


def _source_at(url_dir, payloads, sha=None):
    files = tuple(RemoteFile(name, sha or hashlib.sha256(payloads[name]).hexdigest()) for name in payloads)
    return Source("fakeset", f"file://{url_dir}/", files)


def test_download_verifies_sha256_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    remote = tmp_path / "remote"
    remote.mkdir()
    payloads = {"a.gz": gzip.compress(b"hello"), "b.gz": gzip.compress(b"world")}
    for name, data in payloads.items():
        (remote / name).write_bytes(data)
    directory = locate(_source_at(remote, payloads), data_dir=None)
    assert directory == str(tmp_path / "cache" / "asyncsgd" / "fakeset")
    assert (tmp_path / "cache" / "asyncsgd" / "fakeset" / "a.gz").read_bytes() == payloads["a.gz"]


def test_checksum_mismatch_is_rejected_and_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.gz").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        locate(_source_at(remote, {"a.gz": b"tampered"}, sha="0" * 64))
    assert not (tmp_path / "cache" / "asyncsgd" / "fakeset" / "a.gz").exists()


def test_offline_error_names_url_and_destination(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = Source("fakeset", f"file://{tmp_path}/nowhere/", (RemoteFile("a.gz", "0" * 64),))
    with pytest.raises(DatasetNotFound) as info:
        locate(source)
    message = str(info.value)
    assert "nowhere" in message and str(tmp_path / "cache" / "asyncsgd" / "fakeset") in message
    assert "\n" not in message


def test_batches_are_seeded_and_cover_the_epoch_once():
    data = synthetic(num_train=100, num_test=10, input_shape=(2, 2, 1))
    first = list(iterate_batches(data, 10, seed=3, epoch=0, first_seq=5))
    again = list(iterate_batches(data, 10, seed=3, epoch=0, first_seq=5))
    other = list(iterate_batches(data, 10, seed=3, epoch=1, first_seq=5))
    assert [seq for seq, _, _ in first] == list(range(5, 15))
    for (_, x1, y1), (_, x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
    assert any(not np.array_equal(a[2], b[2]) for a, b in zip(first, other))
    labels = np.concatenate([y for _, _, y in first])
    np.testing.assert_array_equal(np.sort(labels), np.sort(data.train_y))


def test_normalization_uses_training_statistics():
    data = synthetic(num_train=500, num_test=100, input_shape=(4, 4, 2)).normalized()
    np.testing.assert_allclose(data.train_x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(data.train_x.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_eval_batches_pad_and_mask_the_tail():
    x = np.arange(7, dtype=np.float32)[:, None]
    y = np.arange(7, dtype=np.int32)
    batches = list(eval_batches(x, y, 3))
    assert [len(b[1]) for b in batches] == [3, 3, 3]
    assert batches[-1][2].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.skipif(not has_fashion_mnist(), reason=f"Fashion-MNIST not installed in {FASHION_DIR}")
def test_real_fashion_mnist_loads_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = load_dataset("fashion_mnist", download=False)
    assert data.train_x.shape == (60000, 28, 28, 1) and data.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(data.train_y).tolist() == [6000] * 10
