"""oneDNN convolutions under XLA on the CPU: build, load and call `onednn_conv.cc`'s FFI handlers.

The C++ file is compiled on first use (about 10 s, once per machine: the shared library is cached
under `$ASYNCSGD_CACHE`, else `$XDG_CACHE_HOME/asyncsgd`, else `~/.cache/asyncsgd`, named by a hash
of the source, jaxlib's version and oneDNN's path) with the system's C++ compiler (`$CXX`, else
`g++`), jaxlib's FFI headers and the oneDNN wheels `onednn-cpu-gomp` / `onednn-devel-cpu-gomp`
(dependencies of this package on Linux x86-64). Where any of these is missing, `status()` says
which, and `asyncsgd.models.conv` keeps XLA's convolutions.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np

SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGETS = {"forward": "AsyncsgdConvForward", "input_grad": "AsyncsgdConvInputGrad",
           "weight_grad": "AsyncsgdConvWeightGrad"}
BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_state: dict[str, object] = {}


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the Python package {dist} is not installed") from None
    for f in files:
        if ("/" + str(f)).endswith("/" + suffix):
            return Path(f.locate()).resolve()
    raise RuntimeError(f"the package {dist} has no {suffix}")


def _cache_dir() -> Path:
    root = os.environ.get("ASYNCSGD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asyncsgd")
    return Path(root)


def _build() -> Path:
    """The compiled library, built now if this source has not been built on this machine."""
    library = _dist_file("onednn-cpu-gomp", "libdnnl.so.3")
    header = _dist_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    include = header.parent.parent.parent
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) to build the oneDNN convolutions")
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{jax.__version__} {importlib.metadata.version('jaxlib')} {library}".encode())
    out = _cache_dir() / f"onednn_conv-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # another process may build beside us
        built = Path(tmp) / out.name
        cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", str(SOURCE), "-o", str(built),
               "-I", jax.ffi.include_dir(), "-I", str(include), str(library), f"-Wl,-rpath,{library.parent}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or ["no output"]
            raise RuntimeError(f"building the oneDNN convolutions failed: {errors[0].strip()}")
        os.replace(built, out)
    return out


def _target(name: str) -> str:
    """The FFI target name of handler `name` (a key of `TARGETS`)."""
    return f"asyncsgd_onednn_conv_{name}"


def _load() -> None:
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(_target(name), jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _state.update(available=True, reason=f"oneDNN ({path.name})", library=lib)
    except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as exc:
        _state.update(available=False, reason=f"oneDNN unavailable: {exc}")


def status() -> tuple[bool, str]:
    """(whether the oneDNN convolutions can be used, what was loaded or why not); builds on first call."""
    with _lock:
        if not _state:
            _load()
    return bool(_state["available"]), str(_state["reason"])


def set_threads(threads: int) -> None:
    """Every later oneDNN convolution runs on `threads` OpenMP threads (0: OpenMP's default, all cores or
    OMP_NUM_THREADS). Process-wide; takes effect from the next call, in every thread. Does nothing where
    oneDNN is unavailable."""
    if threads < 0:
        raise ValueError(f"convolution threads must be >= 0, got {threads}")
    available, _ = status()
    if available:
        _state["library"].AsyncsgdConvSetThreads(ctypes.c_int(int(threads)))


@contextlib.contextmanager
def threads_set(threads: int):
    """`set_threads(threads)` for the block, then the setting before it again. Leaves everything alone
    where no oneDNN convolution has been loaded in this process (a model without convolutions:
    `asyncsgd.models.conv` loads the library when it builds one), so it never builds the library."""
    if not _state.get("available"):
        yield
        return
    before = _state["library"].AsyncsgdConvRequestedThreads()
    if before == threads:
        yield
        return
    set_threads(threads)
    try:
        yield
    finally:
        set_threads(before)


def threads() -> int:
    """The thread count of the next oneDNN convolution (0 where oneDNN is unavailable)."""
    available, _ = status()
    return int(_state["library"].AsyncsgdConvThreads()) if available else 0


def _out_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _call(name: str, shape, dtype, first, second, strides, padding):
    """Handler `name` on (first, second), returning an array of `shape`."""
    (sh, sw), ((ph, ph2), (pw, pw2)) = strides, padding
    call = jax.ffi.ffi_call(_target(name), jax.ShapeDtypeStruct(tuple(shape), dtype))
    return call(first, second, sh=np.int64(sh), sw=np.int64(sw), ph=np.int64(ph), pw=np.int64(pw),
                ph2=np.int64(ph2), pw2=np.int64(pw2))


def forward(x_BxHxWxC, w_KhxKwxCxO, strides, padding):
    """The convolution (NHWC input, HWIO kernel, explicit padding), as `lax.conv_general_dilated`."""
    batch, height, width, _ = x_BxHxWxC.shape
    kh, kw, _, out_c = w_KhxKwxCxO.shape
    shape = (batch, _out_size(height, kh, strides[0], padding[0]), _out_size(width, kw, strides[1], padding[1]),
             out_c)
    return _call("forward", shape, x_BxHxWxC.dtype, x_BxHxWxC, w_KhxKwxCxO, strides, padding)


def input_grad(dy_BxHoxWoxO, w_KhxKwxCxO, input_shape, strides, padding):
    """d loss / d input, given d loss / d output."""
    return _call("input_grad", input_shape, dy_BxHoxWoxO.dtype, dy_BxHoxWoxO, w_KhxKwxCxO, strides, padding)


def weight_grad(x_BxHxWxC, dy_BxHoxWoxO, kernel_shape, strides, padding):
    """d loss / d kernel (HWIO), given the input and d loss / d output."""
    return _call("weight_grad", kernel_shape, dy_BxHoxWoxO.dtype, x_BxHxWxC, dy_BxHoxWoxO, strides, padding)
