"""Finding, downloading and verifying dataset files.

Search order for a dataset's files (the first directory that holds all of them wins):
  1. `--data-dir` (the `data_dir` argument),
  2. `$ASYNCSGD_DATA` (and its `<dataset>/` subfolder),
  3. the user cache `~/.cache/asyncsgd/<dataset>` (`$XDG_CACHE_HOME` respected),
  4. the system location of the Debian package (e.g. `/usr/share/datasets/fashion-mnist`),
  5. a download from the canonical URL into the user cache, verified by SHA-256.
Offline with no files, one `DatasetNotFound` error names the URL and where to put the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import Optional, Sequence

from asyncsgd.errors import ChecksumError, DatasetNotFound


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a dataset's files come from."""

    name: str
    base_url: str
    files: tuple[RemoteFile, ...]
    system_dirs: tuple[str, ...] = ()


def cache_dir(dataset: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "asyncsgd", dataset)


def candidate_dirs(source: Source, data_dir: Optional[str]) -> list[str]:
    """The directories searched, in order (see the module docstring)."""
    dirs = []
    if data_dir:
        dirs += [data_dir, os.path.join(data_dir, source.name)]
    env = os.environ.get("ASYNCSGD_DATA")
    if env:
        dirs += [env, os.path.join(env, source.name)]
    dirs.append(cache_dir(source.name))
    dirs += list(source.system_dirs)
    return dirs


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: str, sha256: str, timeout_s: float = 30.0) -> None:
    """Downloads `url` to `dest` atomically, verifying the SHA-256 before the rename."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            shutil.copyfileobj(response, out)
        actual = sha256_of(tmp)
        if actual != sha256:
            raise ChecksumError(f"{url}: SHA-256 mismatch (expected {sha256}, got {actual}); "
                                "the download is corrupt or the file changed upstream")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def locate(source: Source, data_dir: Optional[str] = None, download: bool = True) -> str:
    """Returns a directory holding every file of `source`, downloading into the cache if needed.

    Raises:
      DatasetNotFound: no directory has the files and the download failed (or was disabled).
      ChecksumError: a download arrived with the wrong SHA-256.
    """
    names: Sequence[str] = [f.name for f in source.files]
    for directory in candidate_dirs(source, data_dir):
        if all(os.path.isfile(os.path.join(directory, n)) for n in names):
            return directory
    target = cache_dir(source.name)
    if download:
        try:
            for remote in source.files:
                dest = os.path.join(target, remote.name)
                if not os.path.isfile(dest):
                    _download(source.base_url + remote.name, dest, remote.sha256)
            return target
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DatasetNotFound(
                f"{source.name}: files not found and download from {source.base_url} failed ({reason}); "
                f"put {', '.join(names)} in {target} or pass --data-dir DIR") from None
    raise DatasetNotFound(f"{source.name}: files not found; download them from {source.base_url} "
                          f"({', '.join(names)}) into {target} or pass --data-dir DIR")


def locate_archive(source: Source, folder: str, required: Sequence[str], data_dir: Optional[str] = None,
                   download: bool = True) -> str:
    """Finds a dataset shipped as one archive: its extracted `folder`, or the archive itself.

    Each search directory (module docstring) is checked first for `folder/` holding every file or
    folder in `required` (or for being that folder), then for the archive file; failing both, the archive is
    downloaded into the cache and verified.

    Returns:
      The path of the extracted folder, or of the archive (`source.files[0]`).
    """
    for directory in candidate_dirs(source, data_dir):
        for base in (os.path.join(directory, folder), directory):
            if os.path.basename(os.path.normpath(base)) == folder and all(
                    os.path.exists(os.path.join(base, name)) for name in required):
                return base
    return os.path.join(locate(source, data_dir, download), source.files[0].name)
