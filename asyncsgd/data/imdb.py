"""IMDb movie-review sentiment (Maas et al. 2011) from the standard `aclImdb_v1.tar.gz` layout.

Layout: `aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt` (the archive, or its extracted folder,
found with the search order of `asyncsgd.data.sources`, or downloaded and SHA-256 checked).
`train/unsup` is ignored. Labels: neg 0, pos 1.

Tokenizer (`tokenize`): lower-case, HTML line breaks removed, then runs of letters and digits with an
optional apostrophe suffix (`don't`, `film's`) are the tokens; everything else separates them.
Vocabulary (`build_vocab`): from the training split only: words seen at least `min_count` times,
most frequent first (ties alphabetical), at most `vocab_size - 2` of them; id 0 is padding and id 1
out-of-vocabulary. Encoding: a review longer than `max_len` keeps its last `max_len` tokens (the end of
a review is where the verdict usually is); shorter ones are left-padded with 0, so the last position
is always the review's last token (what the LSTM's head reads).

The tokenised arrays are cached in the user cache under a key of the source file, its size and
modification time and the three settings, so a second run does not tokenise again.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import tarfile
from typing import Iterable, Iterator, Optional

import numpy as np

from asyncsgd.data.dataset import Dataset
from asyncsgd.errors import DataFormatError
from asyncsgd.data.sources import RemoteFile, Source, cache_dir, locate_archive

SOURCE = Source("imdb", "https://ai.stanford.edu/~amaas/data/sentiment/", (RemoteFile(
    "aclImdb_v1.tar.gz", "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"),))
FOLDER = "aclImdb"
PAD, OOV = 0, 1
TOKENIZER_VERSION = 1  # part of the cache key: bump when `tokenize` changes
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_LABELS = {"neg": 0, "pos": 1}


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("<br />", " "))


def _reviews_from_folder(root: str, split: str) -> Iterator[tuple[str, int]]:
    for label_name, label in _LABELS.items():
        directory = os.path.join(root, split, label_name)
        if not os.path.isdir(directory):
            raise DataFormatError(f"{root}: missing folder {split}/{label_name}")
        for name in sorted(os.listdir(directory)):
            if name.endswith(".txt"):
                with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
                    yield handle.read(), label


def _reviews_from_archive(path: str) -> dict[str, list[tuple[str, int]]]:
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = sorted((m for m in tar if m.isfile() and m.name.endswith(".txt")), key=lambda m: m.name)
            for member in members:
                parts = member.name.split("/")
                if len(parts) != 4 or parts[0] != FOLDER or parts[1] not in splits or parts[2] not in _LABELS:
                    continue
                blob = tar.extractfile(member).read()
                splits[parts[1]].append((blob.decode("utf-8", errors="replace"), _LABELS[parts[2]]))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc}); "
                              "delete it to download it again") from None
    for split, reviews in splits.items():
        if {label for _, label in reviews} != {0, 1}:
            raise DataFormatError(f"{path}: no {FOLDER}/{split}/pos and neg reviews in the archive")
    return splits


def build_vocab(token_lists: Iterable[list[str]], vocab_size: int, min_count: int) -> dict[str, int]:
    """Word -> id (ids from 2; see the module docstring)."""
    counts = collections.Counter()
    for tokens in token_lists:
        counts.update(tokens)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {word: index + 2 for index, word in enumerate(words[: vocab_size - 2])}


def encode(tokens: list[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
    ids = [vocab.get(token, OOV) for token in tokens][-max_len:]
    out = np.zeros(max_len, np.int32)
    if ids:
        out[max_len - len(ids):] = ids
    return out


def _cache_path(path: str, vocab_size: int, min_count: int, max_len: int) -> str:
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{vocab_size}|{min_count}|{max_len}|{TOKENIZER_VERSION}"
    return os.path.join(cache_dir("imdb"), f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")


def load_imdb(data_dir: Optional[str] = None, download: bool = True, vocab_size: int = 20000,
              min_count: int = 2, max_len: int = 256) -> Dataset:
    """Loads IMDb as token ids (N x max_len int32) and labels; see the module docstring."""
    required = [os.path.join(split, label) for split in ("train", "test") for label in _LABELS]
    path = locate_archive(SOURCE, FOLDER, required, data_dir, download)
    cache = _cache_path(path, vocab_size, min_count, max_len)
    if os.path.isfile(cache):
        try:
            with np.load(cache) as arrays:
                return Dataset("imdb", arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"],
                               num_classes=2, source=cache, vocab_size=vocab_size)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    if os.path.isdir(path):
        splits = {split: list(_reviews_from_folder(path, split)) for split in ("train", "test")}
    else:
        splits = _reviews_from_archive(path)
    tokens = {split: [tokenize(text) for text, _ in reviews] for split, reviews in splits.items()}
    vocab = build_vocab(tokens["train"], vocab_size, min_count)
    arrays = {}
    for split in ("train", "test"):
        arrays[f"{split}_x"] = np.stack([encode(t, vocab, max_len) for t in tokens[split]])
        arrays[f"{split}_y"] = np.array([label for _, label in splits[split]], np.int32)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + ".part.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
    return Dataset("imdb", arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"],
                   num_classes=2, source=path, vocab_size=vocab_size)
