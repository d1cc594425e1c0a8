"""Run configuration: one frozen dataclass, validated in one place.

Every entry point (CLI, benchmarks, experiments, notebooks, tests) builds a `TrainConfig` and derives
variants with `dataclasses.replace`. `validate` raises `ConfigError` with a one-line message naming the
offending field, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from asyncsgd import trainers
from asyncsgd.delays import parse_delay
from asyncsgd.errors import ConfigError
from asyncsgd.staleness import parse_corrections

MODELS = ("mlp", "cnn", "resnet18", "resnet34", "resnet50", "lstm")
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imdb", "synthetic", "synthetic_text")
NORMS = ("batch", "group")
CIFAR100_LABELS = ("fine", "coarse")
TEXT_MODELS = ("lstm",)
TEXT_DATASETS = ("imdb", "synthetic_text")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
RESIDUAL_MODES = ("stash", "recompute")
BACKENDS = ("local", "ray")
CLOCKS = ("wall", "simulated")
PLACEMENTS = ("replicated", "split")
WINDOW_SCOPES = ("global", "device")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run.

    Attributes are grouped: what to train (trainer, model, dataset), how long (epochs, max_steps),
    the optimiser (optimizer, lr, momentum, nesterov, weight_decay, schedule), the asynchronous
    schedule (forward_threads, backward_threads, max_inflight, workers, residuals) and the run's
    plumbing (seed, data_dir, out, eval_every, log_every, watchdog_s, progress, overwrite).
    """

    trainer: str = "sync"
    model: str = "cnn"
    dataset: str = "fashion_mnist"
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    # None: the trainer's default (`trainers.default_warmup_steps`: 25 x devices for a shared-store
    # asynchronous trainer on several devices, else 0), filled in when a run starts.
    warmup_steps: Optional[int] = None
    # How an update accounts for its gradient's staleness (asyncsgd/staleness.py): none, scale, dc,
    # momentum; dc's lambda.
    staleness_correction: str = "scale,momentum,predict"
    dc_lambda: float = 0.04
    seed: int = 0
    data_dir: Optional[str] = None
    out: Optional[str] = None
    # Subsample the training split (None: all of it). Handy for quick runs and tests.
    train_subset: Optional[int] = None
    # The dataset's standard training augmentation (CIFAR: pad-4 random crop, horizontal flip; none
    # for the others).
    augment: bool = True
    cifar100_labels: str = "fine"
    # IMDb: vocabulary (most frequent training words, plus padding and out-of-vocabulary ids), the
    # minimum count for a word to enter it, and the sequence length (longer reviews keep their end).
    vocab_size: int = 20000
    min_count: int = 2
    max_len: int = 256
    # ResNets: batch norm (statistics through the store) or GroupNorm (stateless).
    norm: str = "batch"
    # Asynchronous trainers.
    forward_threads: int = 1
    backward_threads: int = 2
    # Items a forward worker may run ahead of the oldest unfinished backward (0: wait for each).
    max_inflight: int = 4
    workers: int = 2
    residuals: str = "stash"
    # OpenMP threads of each oneDNN convolution while a trainer runs (0: all cores; 1: one core per
    # convolution, so that concurrent passes run side by side instead of sharing every kernel). None:
    # the trainer's default (`trainers.conv_threads`), filled in when a run starts.
    conv_threads: Optional[int] = None
    # Devices: each hosts its own workers (JAX devices; on a CPU, virtual CPU devices sharing the cores).
    devices: int = 1
    # The run-ahead window on N devices: "global" (one over all batches: a hard staleness bound, but a
    # straggler's oldest item holds every device back) or "device" (each device bounds its own).
    window: str = "global"
    # Where a trainer's workers go on N devices: "replicated" (every device runs all of them) or, for the
    # decoupled trainers, "split" (the first device runs the forward workers, the others the backward ones).
    placement: str = "replicated"
    # Extra latency, seeded and applied the same way by every trainer (see `asyncsgd.delays`).
    delay: str = "none"
    # LAP-SGD / LPP-SGD: average the device copies after every global step for the first
    # `averaging_warmup` global steps, then every `averaging_period` global steps.
    averaging_period: int = 16
    averaging_warmup: int = 100
    # Stop when the periodic test evaluation reaches this accuracy (None: run to the end).
    target_accuracy: Optional[float] = None
    # Stop the run when the target is reached (False: record time_to_target_s and train on).
    stop_at_target: bool = True
    # Evaluate on a snapshot every this many steps while the workers run (None: once per epoch only;
    # with --target-accuracy it defaults to a tenth of an epoch).
    eval_every_steps: Optional[int] = None
    # Async workers wait for each stage's result before the next stage (True), or dispatch whole passes
    # and let XLA's runtime order them by data dependencies (False). Versions and staleness are exact
    # either way (they follow dispatch order); see docs/measurements.md.
    stage_sync: bool = True
    # The run's clock: "wall" (real time) or "simulated" (virtual time on a device model, one thread at a
    # time, deterministic; see docs/simulated-clock.md), its device profile (a built-in name or a JSON
    # file; default a100) and a seed for the order of simultaneous events (None: device, worker order).
    clock: str = "wall"
    profile: Optional[str] = None
    sim_tie_seed: Optional[int] = None
    # Where the workers run: "local" (threads of this process) or "ray" (a worker actor per device and
    # stage-server actors holding the parameters, on a Ray cluster: see asyncsgd/cluster/). With "ray",
    # `ray_address` joins a running cluster ("auto", or host:port); None starts a local Ray instance.
    backend: str = "local"
    ray_address: Optional[str] = None
    # Checkpoints: every N steps ("500") or seconds ("30s"), None: only on Ctrl+C / SIGTERM; keep the last K.
    checkpoint_every: Optional[str] = None
    keep_checkpoints: int = 2
    # Plumbing.
    eval_every: int = 1
    log_every: int = 20
    eval_batch_size: int = 1000
    watchdog_s: float = 120.0
    progress: bool = True
    overwrite: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"--{name.replace('_', '-')}: unknown value {value!r}; "
             f"choose one of {', '.join(choices)}")


def parse_every(text: Optional[str]) -> Optional[tuple[str, float]]:
    """`--checkpoint-every`: "500" -> ("steps", 500), "30s" -> ("seconds", 30.0), None -> None."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        if raw.endswith("s"):
            value, unit = float(raw[:-1]), "seconds"
        else:
            value, unit = int(raw), "steps"
    except ValueError:
        raise ConfigError(f"--checkpoint-every: expected a step count (500) or seconds (30s), got {text!r}") from None
    _require(math.isfinite(value) and value > 0, f"--checkpoint-every must be > 0, got {text!r}")
    return unit, value


def validate(config: TrainConfig) -> TrainConfig:
    """Checks every field, then asks the trainer's spec (`asyncsgd.trainers`) for its own checks;
    returns the config unchanged or raises `ConfigError`."""
    _choice("trainer", config.trainer, trainers.names())
    _choice("model", config.model, MODELS)
    _choice("dataset", config.dataset, DATASETS)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("schedule", config.schedule, SCHEDULES)
    _choice("residuals", config.residuals, RESIDUAL_MODES)
    _choice("norm", config.norm, NORMS)
    _choice("window", config.window, WINDOW_SCOPES)
    _choice("clock", config.clock, CLOCKS)
    try:
        parse_corrections(config.staleness_correction)
    except ValueError as exc:
        raise ConfigError(f"--staleness-correction: {exc}") from None
    _require(math.isfinite(config.dc_lambda) and config.dc_lambda >= 0,
             f"--dc-lambda must be a finite number >= 0, got {config.dc_lambda}")
    _choice("placement", config.placement, PLACEMENTS)
    _require(config.clock == "simulated" or (config.profile is None and config.sim_tie_seed is None),
             "--profile and --sim-tie-seed need --clock simulated")
    if config.clock == "simulated":
        from asyncsgd.sim.profiles import load_profile  # noqa: PLC0415  (raises ConfigError naming the problem)
        load_profile(config.profile)
    _choice("cifar100_labels", config.cifar100_labels, CIFAR100_LABELS)
    text_model, text_data = config.model in TEXT_MODELS, config.dataset in TEXT_DATASETS
    _require(text_model == text_data,
             f"--model {config.model} does not fit --dataset {config.dataset}: "
             + ("the lstm needs a text dataset (imdb, synthetic_text)" if text_model else
                f"{config.dataset} is text; use --model lstm"))
    _require(config.vocab_size >= 3, f"--vocab-size must be >= 3, got {config.vocab_size}")
    _require(config.min_count >= 1, f"--min-count must be >= 1, got {config.min_count}")
    _require(config.max_len >= 1, f"--max-len must be >= 1, got {config.max_len}")
    _require(config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}")
    _require(config.max_steps is None or config.max_steps >= 1,
             f"--max-steps must be >= 1, got {config.max_steps}")
    _require(config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}")
    _require(math.isfinite(config.lr) and config.lr > 0, f"--lr must be a finite number > 0, got {config.lr}")
    _require(0.0 <= config.momentum < 1.0, f"--momentum must be in [0, 1), got {config.momentum}")
    _require(math.isfinite(config.weight_decay) and config.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {config.weight_decay}")
    _require(config.warmup_steps is None or config.warmup_steps >= 0,
             f"--warmup-steps must be >= 0, got {config.warmup_steps}")
    _require(config.train_subset is None or config.train_subset >= 1,
             f"--train-subset must be >= 1, got {config.train_subset}")
    _require(config.forward_threads >= 1, f"--forward-threads must be >= 1, got {config.forward_threads}")
    _require(config.backward_threads >= 1, f"--backward-threads must be >= 1, got {config.backward_threads}")
    _require(config.forward_threads <= 64 and config.backward_threads <= 64,
             "--forward-threads and --backward-threads must be <= 64")
    _require(config.conv_threads is None or 0 <= config.conv_threads <= 1024, f"--conv-threads must be in [0, 1024], got {config.conv_threads}")
    _require(0 <= config.max_inflight <= 1024, f"--max-inflight must be in [0, 1024], got {config.max_inflight}")
    _require(1 <= config.workers <= 64, f"--workers must be in [1, 64], got {config.workers}")
    _require(1 <= config.devices <= 64, f"--devices must be in [1, 64], got {config.devices}")
    _require(config.averaging_period >= 1, f"--averaging-period must be >= 1, got {config.averaging_period}")
    _require(config.averaging_warmup >= 0, f"--averaging-warmup must be >= 0, got {config.averaging_warmup}")
    _require(config.target_accuracy is None or 0.0 < config.target_accuracy <= 1.0,
             f"--target-accuracy must be in (0, 1], got {config.target_accuracy}")
    _require(config.eval_every_steps is None or config.eval_every_steps >= 1,
             f"--eval-every-steps must be >= 1, got {config.eval_every_steps}")
    parse_every(config.checkpoint_every)
    _require(config.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {config.keep_checkpoints}")
    parse_delay(config.delay, devices=config.devices)
    _require(config.eval_every >= 1, f"--eval-every must be >= 1, got {config.eval_every}")
    _require(config.log_every >= 1, f"--log-every must be >= 1, got {config.log_every}")
    _require(config.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {config.eval_batch_size}")
    _require(config.watchdog_s > 0, f"--watchdog must be > 0 seconds, got {config.watchdog_s}")
    _choice("backend", config.backend, BACKENDS)
    _require(config.backend == "ray" or config.ray_address is None, "--ray-address needs --backend ray")
    trainers.check(config)
    if config.backend == "ray":
        from asyncsgd.cluster import check as check_ray  # the Ray backend's own rules (Ray not imported)
        check_ray(config)
    return config
