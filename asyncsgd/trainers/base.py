"""What a trainer is to the rest of the program: one `TrainerSpec` per trainer module.

A spec says everything run.py, the configuration, the CLI, checkpoints and the summary need to know
about a trainer, so that none of them names one: its name and one-line description, whether it runs
on several devices, whether its checkpoint position is exact, its own configuration checks, the
compiled units it calls, its preparation (built once per run, before any thread), its staleness bound,
and its epoch function. `asyncsgd/trainers/__init__.py` collects the specs into the registry.

An epoch function `run_epoch(session, plan) -> EpochResult` trains the batches `plan` names and
returns what it did; it never writes into the session.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

UnitGroups = tuple[tuple[str, ...], tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Which batches one call of a trainer consumes."""

    epoch: int
    first_seq: int
    max_batches: Optional[int] = None
    skip: int = 0  # batches of the epoch already done (a resumed run starts after them)
    # (position, count): only every count-th of those batches (one Ray worker's share); their seqs
    # are consecutive from first_seq
    shard: tuple = (0, 1)

    def batches(self, steps_per_epoch: int) -> int:
        """How many batches this call consumes in an epoch of `steps_per_epoch` (its shard's share)."""
        end = steps_per_epoch if self.max_batches is None else min(steps_per_epoch, self.skip + self.max_batches)
        position, count = self.shard
        return len(range(self.skip + position, end, count))


@dataclasses.dataclass(frozen=True)
class EpochResult:
    """What one call of a trainer's epoch function did.

    Attributes:
      batches: batches whose updates were fully applied in this call.
      peak_inflight: the most batches in flight at once (what bounds the residual memory); None for a
        trainer without a run-ahead window.
      window_size: the window's size per scope (items), None without a window.
      averaging_rounds: model-averaging rounds run (LAP-SGD, LPP-SGD).
      delay_slept_s: seconds slept for `--delay`, per device.
    """

    batches: int
    peak_inflight: Optional[int] = None
    window_size: Optional[int] = None
    averaging_rounds: int = 0
    delay_slept_s: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a trainer's `prepare` builds once per run (in the main thread, before any worker starts).

    Attributes:
      kit: the trainer's own compiled pieces (read by its epoch function as `session.kit`).
      replicas: per-device model copies (`replicas[0]` is the store); checkpoints save every copy.
      model_view: `() -> (params, states)` on the home device: the model to evaluate, when it is not
        the store's snapshot (LAP-SGD: the average of the copies).
    """

    kit: Any = None
    replicas: tuple = ()
    model_view: Optional[Callable[[], tuple[list, list]]] = None


def fixed_units(*groups: str) -> Callable[[Any, int], UnitGroups]:
    """A `units` rule for a trainer that calls the same unit groups on every device."""
    return lambda config, devices: (tuple(groups), ())


def _no_checks(config: Any) -> None:
    return None


def _nothing_to_prepare(session: Any) -> Prepared:
    return Prepared()


def _no_staleness(config: Any) -> Optional[int]:
    return 0


def _all_cores(config: Any) -> int:
    return 0


def cores_per_pass(config: Any) -> int:
    """A `conv_threads` rule for a trainer whose workers each run whole passes at once (Hogwild!,
    LAP-SGD, LPP-SGD): the cores shared out among its `workers x devices` concurrent passes, at least
    one each; 0 (all cores) where one pass gets them all anyway.

    Measured on 2 cores, CNN (docs/measurements.md, "One core per convolution"): 4-10% more samples/s
    for Hogwild!, LAP-SGD and LPP-SGD with one core per convolution; PD-ASGD, whose concurrent passes
    run stage by stage, gains nothing from it and keeps all cores.
    """
    cores = os.cpu_count() or 1
    passes = max(1, config.workers) * max(1, config.devices)
    threads = max(1, cores // passes)
    return 0 if threads >= cores else threads


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """Everything the program needs to know about one trainer.

    Attributes:
      name: the `--trainer` value.
      description: one line, shown by `--help` and the README.
      run_epoch: `(session, plan) -> EpochResult`.
      multi_device: runs its workers on every one of `--devices` (the others use one device).
      exact_position: one commit of every stage per batch, so a checkpoint's position is the store's
        version and a resumed run continues exactly.
      compared_by_default: in the default trainer set of `compare` and `bench`.
      placements: the `--placement` values it runs (where its workers go on several devices).
      units: `(config, devices) -> (groups compiled on every device, groups on the home device only)`
        (see `Units.warmup`).
      check: `(config) -> None`; raises `ConfigError` for settings this trainer cannot run.
      prepare: `(session) -> Prepared`, once per run before any thread (also before a checkpoint is
        restored): per-device copies, meshes, the trainer's own compiled units (through `units.jit`).
      staleness_bound: `(config) -> int | None`, the largest staleness its window allows (None: no bound).
      backends: the `--backend` values it runs ("ray": its epochs can go to Ray worker actors; see
        asyncsgd/cluster/).
      summary: `(session) -> dict`, fields it adds to summary.json (the Ray backend: its workers).
      finish: `(session) -> None`, once at the end of the run whatever happened (stops what `prepare`
        started outside this process).
      conv_threads: `(config) -> int`, the OpenMP threads of each oneDNN convolution while its epochs run
        when `--conv-threads` is not given (0: all cores; `cores_per_pass`).
      copies: each device trains its own copy of the model (averaged now and then: LAP-SGD) rather
        than reading and updating the one store; a Ray worker then keeps its copy and averages it
        through the stage servers instead of pulling from and pushing to them.
    """

    name: str
    description: str
    run_epoch: Callable[[Any, EpochPlan], EpochResult]
    multi_device: bool = False
    exact_position: bool = False
    compared_by_default: bool = False
    placements: tuple[str, ...] = ("replicated",)
    units: Callable[[Any, int], UnitGroups] = fixed_units("stages")
    check: Callable[[Any], None] = _no_checks
    prepare: Callable[[Any], Prepared] = _nothing_to_prepare
    staleness_bound: Callable[[Any], Optional[int]] = _no_staleness
    conv_threads: Callable[[Any], int] = _all_cores
    backends: tuple[str, ...] = ("local",)
    summary: Callable[[Any], dict] = lambda session: {}
    finish: Callable[[Any], None] = lambda session: None
    copies: bool = False
