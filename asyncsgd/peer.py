"""The PyTorch peer: the same model trained synchronously in PyTorch, timed beside asyncsgd's trainers.

A CPU user who does not pick asyncsgd picks PyTorch, so the bench's speed claims are ratios to
PyTorch measured in the same process, on the same synthetic batches' shapes, in the same
interleaved rounds (`asyncsgd bench --peer torch`). The peer is plain eager PyTorch as its users
write it: NCHW tensors, `torch.nn` layers of the same widths, SGD with the same momentum, one
`optimizer.step()` per batch, all of PyTorch's intra-op threads (`torch.get_num_threads()`).

Models mirrored: `mlp`, `cnn` (both as in `asyncsgd.models`) and `resnet18` (CIFAR form, batch norm).
PyTorch is an optional extra (`pip install -e '.[peer]'`); without it the bench says so in one line.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from asyncsgd.errors import ConfigError
from asyncsgd.metrics import current_rss_mb

PEER_MODELS = ("mlp", "cnn", "resnet18")


def _require_torch():
    try:
        import torch
    except ImportError as error:
        raise ConfigError("--peer torch needs PyTorch: pip install -e '.[peer]'") from error
    return torch


def _build(model: str, input_shape, num_classes: int):
    """The torch.nn twin of asyncsgd's model `model` (same layers and widths)."""
    torch = _require_torch()
    nn = torch.nn
    height, width, channels = input_shape

    class Residual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, norm: bool):
            super().__init__()
            def bn(c):
                return nn.BatchNorm2d(c) if norm else nn.Identity()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)
            self.bn1 = bn(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm)
            self.bn2 = bn(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), bn(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    if model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(height * width * channels, 512), nn.ReLU(),
                             nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, num_classes))
    if model == "cnn":
        return nn.Sequential(nn.Conv2d(channels, 32, 3, 1, 1), nn.ReLU(), Residual(32, 32, 1, False),
                             Residual(32, 64, 2, False), Residual(64, 128, 2, False), Pool(),
                             nn.Linear(128, num_classes))
    if model == "resnet18":
        layers = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        cin = 64
        for group, cout in enumerate((64, 128, 256, 512)):
            for index in range(2):
                layers.append(Residual(cin, cout, 2 if group > 0 and index == 0 else 1, True))
                cin = cout
        return nn.Sequential(*layers, Pool(), nn.Linear(512, num_classes))
    raise ConfigError(f"--peer torch mirrors the models {', '.join(PEER_MODELS)}, not {model!r}")


class TorchPeer:
    """One PyTorch model, optimiser and fixed synthetic batch, timed in rounds like a bench contender."""

    name = "torch (peer)"

    def __init__(self, model: str, input_shape, num_classes: int, batch_size: int, lr: float, momentum: float,
                 seed: int = 0, warmup_steps: int = 3):
        torch = _require_torch()
        torch.manual_seed(seed)
        self.torch, self.batch_size = torch, batch_size
        self.module = _build(model, tuple(input_shape), num_classes)
        self.module.train()
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr, momentum=momentum)
        rng = np.random.default_rng(seed)
        height, width, channels = input_shape
        self.x = torch.from_numpy(rng.standard_normal((batch_size, channels, height, width), dtype=np.float32))
        self.y = torch.from_numpy(rng.integers(0, num_classes, batch_size))
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.samples_per_s: list[float] = []
        self.rss_mb: list[float] = []
        self.threads = torch.get_num_threads()
        self._steps(warmup_steps)  # untimed: allocator and oneDNN primitive caches warm up

    def _steps(self, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.module(self.x), self.y)
            loss.backward()
            self.optimizer.step()

    def time_round(self, steps: int) -> None:
        start = time.perf_counter()
        self._steps(steps)  # eager PyTorch on the CPU is synchronous: no device to wait for
        self.samples_per_s.append(steps * self.batch_size / (time.perf_counter() - start))
        self.rss_mb.append(current_rss_mb())

    def row(self) -> dict:
        return {"trainer": self.name, "residuals": "", "rss_mb_rounds": self.rss_mb,
                "samples_per_s": float(np.median(self.samples_per_s)),
                "samples_per_s_rounds": self.samples_per_s, "staleness_mean": 0.0, "staleness_max": 0,
                "residual_mb_per_item": 0.0, "max_trace_count": 0,
                "peer": {"framework": "torch", "version": self.torch.__version__, "threads": self.threads,
                         "layout": "NCHW", "eager": True}}


def make_peer(name: str, model: str) -> Callable[..., TorchPeer]:
    """The peer class for `--peer NAME` (only `torch`) and `model`, or a one-line error (checked before
    anything is compiled)."""
    if name != "torch":
        raise ConfigError(f"--peer must be 'torch', got {name!r}")
    if model not in PEER_MODELS:
        raise ConfigError(f"--peer torch mirrors the models {', '.join(PEER_MODELS)}, not {model!r}")
    _require_torch()
    return TorchPeer
