"""The IDX file format of MNIST and Fashion-MNIST (optionally gzip-compressed).

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from asyncsgd.errors import DataFormatError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parses IDX bytes into an array.

    Raises:
      DataFormatError: wrong magic, unknown type code, or a size that does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataFormatError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    type_code, ndim = data[2], data[3]
    if type_code not in _DTYPES:
        raise DataFormatError(f"{source}: unknown IDX type code 0x{type_code:02x}")
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_len:
        raise DataFormatError(f"{source}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        raise DataFormatError(f"{source}: truncated or corrupt IDX data: header says shape {shape} "
                              f"({expected} bytes), file has {payload} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """Reads an `.idx` or `.idx.gz` file; gzip is detected from the content, not the name."""
    if not os.path.exists(path):
        raise DataFormatError(f"{path}: file not found")
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return parse_idx(raw, source=path)


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> None:
    """Writes `array` (uint8) as an IDX file; used to generate test files in the real format."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.tobytes()
    with open(path, "wb") as handle:
        handle.write(gzip.compress(data) if compress else data)
