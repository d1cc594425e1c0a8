"""CIFAR-10/100 and IMDb through the public loaders, on tiny archives generated in the real formats."""

import hashlib
import io
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from asyncsgd.data import DataFormatError, DatasetNotFound, iterate_batches, load_dataset, write_cifar_archive
from asyncsgd.data import cifar as cifar_module
from asyncsgd.data.imdb import OOV, PAD, build_vocab, encode, tokenize
from asyncsgd.data.sources import RemoteFile, Source


def _images(count, seed, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, count)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real data or cache leaks in: an empty cache and no $ASYNCSGD_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ASYNCSGD_DATA", raising=False)
    return tmp_path


def test_cifar10_archive_loads_exactly_what_was_written(isolated):
    train, test = _images(25, 0), _images(10, 1)
    write_cifar_archive(str(isolated / "cifar-10-python.tar.gz"), "cifar10", train, test)
    data = load_dataset("cifar10", data_dir=str(isolated), download=False)
    assert data.train_x.shape == (25, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.train_y.dtype == np.int32 and data.num_classes == 10 and data.augmentation == "crop_flip"
    np.testing.assert_array_equal(data.train_x, train[0])  # channel-major rows decoded to NHWC
    np.testing.assert_array_equal(data.train_y, train[1])
    np.testing.assert_array_equal(data.test_x, test[0])
    # The real archive's pickles: five training batches with the real keys and dtypes.
    with tarfile.open(isolated / "cifar-10-python.tar.gz") as tar:
        names = sorted(m.name for m in tar)
        batch = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_1"), encoding="bytes")
    assert names == sorted([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
                           + ["cifar-10-batches-py/test_batch"])
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"} and batch[b"data"].dtype == np.uint8


def test_cifar10_extracted_folder_is_found_too(isolated):
    train, test = _images(10, 0), _images(5, 1)
    write_cifar_archive(str(isolated / "a.tar.gz"), "cifar10", train, test)
    with tarfile.open(isolated / "a.tar.gz") as tar:
        tar.extractall(isolated / "data", filter="data")
    data = load_dataset("cifar10", data_dir=str(isolated / "data"), download=False)
    assert data.source.endswith("cifar-10-batches-py")
    np.testing.assert_array_equal(data.train_x, train[0])


@pytest.mark.parametrize("labels, classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_fine_and_coarse_labels(isolated, labels, classes):
    train, test = _images(30, 2, classes=100), _images(10, 3, classes=100)
    write_cifar_archive(str(isolated / "cifar-100-python.tar.gz"), "cifar100", train, test)
    data = load_dataset("cifar100", data_dir=str(isolated), download=False, cifar100_labels=labels)
    assert data.num_classes == classes
    expected = train[1] if labels == "fine" else train[1] // 5
    np.testing.assert_array_equal(data.train_y, expected)


def test_cifar_download_is_checksummed_into_the_cache(isolated, monkeypatch):
    remote = isolated / "remote"
    remote.mkdir()
    write_cifar_archive(str(remote / "cifar-10-python.tar.gz"), "cifar10", _images(10, 0), _images(5, 1))
    digest = hashlib.sha256((remote / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(cifar_module.SOURCES, "cifar10", Source(
        "cifar10", f"file://{remote}/", (RemoteFile("cifar-10-python.tar.gz", digest),)))
    data = load_dataset("cifar10", download=True)
    assert data.source == str(isolated / "cache" / "asyncsgd" / "cifar10" / "cifar-10-python.tar.gz")
    assert len(data.train_y) == 10


def test_cifar_offline_error_names_url_and_destination(isolated):
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("cifar10", download=False)
    message = str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/" in message and "cifar-10-python.tar.gz" in message
    assert str(isolated / "cache" / "asyncsgd" / "cifar10") in message and "\n" not in message


def _write_members(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("damage, message", [
    ("garbage", "corrupt or truncated archive"),
    ("truncated", "corrupt or truncated archive"),
    ("missing_member", "archive has no cifar-10-batches-py/test_batch"),
    ("wrong_key", "missing key"),
    ("bad_pickle", "not a readable CIFAR pickle"),
    ("code_in_pickle", "refusing to load"),
    ("label_range", "out of range"),
])
def test_corrupt_cifar_archives_give_clear_errors(isolated, damage, message):
    path = isolated / "cifar-10-python.tar.gz"
    write_cifar_archive(str(path), "cifar10", _images(10, 0), _images(5, 1))
    good = {m: tarfile.open(path).extractfile(m).read() for m in tarfile.open(path).getnames()}
    if damage == "garbage":
        path.write_bytes(b"not a tarball at all" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "missing_member":
        _write_members(path, {k: v for k, v in good.items() if not k.endswith("test_batch")})
    else:
        batch = pickle.loads(good["cifar-10-batches-py/data_batch_1"], encoding="bytes")
        if damage == "wrong_key":
            batch[b"labelz"] = batch.pop(b"labels")
            blob = pickle.dumps(batch)
        elif damage == "bad_pickle":
            blob = pickle.dumps(batch)[:100]
        elif damage == "code_in_pickle":
            blob = pickle.dumps({b"data": shutil.rmtree})
        else:
            batch[b"labels"][0] = 10
            blob = pickle.dumps(batch)
        _write_members(path, {**good, "cifar-10-batches-py/data_batch_1": blob})
    with pytest.raises(DataFormatError, match=message) as info:
        load_dataset("cifar10", data_dir=str(isolated), download=False)
    assert "\n" not in str(info.value)


def test_crop_flip_keeps_shapes_and_labels_and_is_seeded(isolated):
    # Every image is one constant colour that encodes its label: after crop-and-flip an image may
    # gain zero padding but its other pixels must still carry its own label.
    labels = np.arange(40) % 10
    images = np.broadcast_to((labels * 20 + 10).astype(np.uint8)[:, None, None, None], (40, 32, 32, 3)).copy()
    write_cifar_archive(str(isolated / "cifar-10-python.tar.gz"), "cifar10", (images, labels), (images[:5], labels[:5]))
    data = load_dataset("cifar10", data_dir=str(isolated), download=False)
    first = list(iterate_batches(data, 8, seed=3, epoch=0, first_seq=0, augment=True))
    again = list(iterate_batches(data, 8, seed=3, epoch=0, first_seq=0, augment=True))
    plain = list(iterate_batches(data, 8, seed=3, epoch=0, first_seq=0, augment=False))
    other = list(iterate_batches(data, 8, seed=4, epoch=0, first_seq=0, augment=True))
    padded_somewhere = False
    for (seq, x, y), (_, x2, y2), (_, xp, yp) in zip(first, again, plain):
        assert x.shape == xp.shape == (8, 32, 32, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, x2)  # seeded
        np.testing.assert_array_equal(y, yp)  # labels untouched and aligned
        for image, label in zip(x, y):
            values = set(np.unique(image)) - {0}
            assert values == {label * 20 + 10}
            padded_somewhere |= bool((image == 0).any())
    assert padded_somewhere
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))  # another seed, other crops


def test_crop_flip_is_an_exact_crop_of_the_padded_image():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (16, 32, 32, 3)).astype(np.uint8)
    out = cifar_module.crop_flip(x, np.random.default_rng(1))
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for image, result in zip(padded, out):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if np.array_equal((image[:, ::-1] if flip else image)[dy:dy + 32, dx:dx + 32], result)]
        assert matches, "not a crop of the padded image"
        flips += matches[0][2]
    assert 0 < flips < 16


# -- IMDb -----------------------------------------------------------------------------------------

_REVIEWS = {
    ("train", "pos"): ["A great film, great acting!<br /><br />Loved it.", "Great fun; I don't regret it."],
    ("train", "neg"): ["A dull film. Dull, dull plot.", "Awful acting, a waste."],
    ("test", "pos"): ["Great great movie"],
    ("test", "neg"): ["dull and awful zebra"],
}


def _write_imdb_tree(root):
    for (split, label), texts in _REVIEWS.items():
        directory = root / "aclImdb" / split / label
        directory.mkdir(parents=True)
        for index, text in enumerate(texts):
            (directory / f"{index}_{7 if label == 'pos' else 2}.txt").write_text(text, encoding="utf-8")
    (root / "aclImdb" / "train" / "unsup").mkdir()
    (root / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("unlabelled text", encoding="utf-8")
    (root / "aclImdb" / "imdb.vocab").write_text("great\n", encoding="utf-8")


def test_tokenizer_and_vocabulary_rules():
    assert tokenize("Great fun; I don't<br />regret IT.") == ["great", "fun", "i", "don't", "regret", "it"]
    vocab = build_vocab([["b", "a", "b", "c"], ["a", "b", "d"]], vocab_size=4, min_count=2)
    assert vocab == {"b": 2, "a": 3}  # most frequent first, ties alphabetical, min count, size - 2 words
    np.testing.assert_array_equal(encode(["x", "a", "b"], vocab, 5), [PAD, PAD, OOV, 3, 2])
    np.testing.assert_array_equal(encode(["a", "b", "a", "b"], vocab, 3), [2, 3, 2])  # keeps the end


@pytest.mark.parametrize("packed", [False, True])
def test_imdb_tree_and_archive_load_tokenised_and_cached(isolated, packed):
    _write_imdb_tree(isolated / "src")
    if packed:
        with tarfile.open(isolated / "aclImdb_v1.tar.gz", "w:gz") as tar:
            tar.add(isolated / "src" / "aclImdb", arcname="aclImdb")
        data_dir = isolated
    else:
        data_dir = isolated / "src"
    data = load_dataset("imdb", data_dir=str(data_dir), download=False, vocab_size=6, min_count=2, max_len=5)
    assert data.train_x.shape == (4, 5) and data.train_x.dtype == np.int32 and data.vocab_size == 6
    assert sorted(data.train_y.tolist()) == [0, 0, 1, 1] and data.num_classes == 2
    # Training vocabulary (count >= 2): dull 3, great 3, a 3, acting 2, film 2 -> 4 words kept.
    # Each row: the review's last 5 tokens (or fewer, left-padded), OOV = 1.
    rows = {tuple(r) for r in data.train_x.tolist()}
    assert len(rows) == 4 and all(r[-1] != PAD for r in rows)
    assert int(data.train_x.max()) <= 5
    cached = load_dataset("imdb", data_dir=str(data_dir), download=False, vocab_size=6, min_count=2, max_len=5)
    assert cached.source.startswith(str(isolated / "cache" / "asyncsgd" / "imdb")) and cached.source.endswith(".npz")
    np.testing.assert_array_equal(cached.train_x, data.train_x)
    np.testing.assert_array_equal(cached.test_y, data.test_y)
    other = load_dataset("imdb", data_dir=str(data_dir), download=False, vocab_size=6, min_count=2, max_len=7)
    assert other.train_x.shape == (4, 7) and not other.source.endswith(".npz")  # new settings, new tokens


def test_imdb_errors_are_clear(isolated):
    (isolated / "aclImdb_v1.tar.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(DataFormatError, match="corrupt or truncated archive"):
        load_dataset("imdb", data_dir=str(isolated), download=False)
    os.remove(isolated / "aclImdb_v1.tar.gz")
    with pytest.raises(DatasetNotFound, match="ai.stanford.edu"):
        load_dataset("imdb", data_dir=str(isolated), download=False)
