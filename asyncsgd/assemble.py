"""Putting a run together: its dataset, and its `Session` (model, optimiser, compiled units, store,
recorder, the trainer's preparation), all built in the main thread before any worker starts."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from asyncsgd import trainers
from asyncsgd.clock import WALL, Clock
from asyncsgd.config import TrainConfig
from asyncsgd.data import Dataset, load_dataset, steps_per_epoch
from asyncsgd.delays import parse_delay
from asyncsgd.devices import local_device_count, run_devices, simulated_devices
from asyncsgd.errors import ConfigError
from asyncsgd.evaluation import eval_batch_size
from asyncsgd.metrics import Recorder
from asyncsgd.models import get_model, onednn
from asyncsgd.optim import make_optimizer
from asyncsgd.store import ParamStore
from asyncsgd.trainers import Session
from asyncsgd.sim import DeviceModel, SimClock, load_profile
from asyncsgd.units import Units


def load_for(config: TrainConfig) -> Dataset:
    """The raw dataset `config` names, with its loading options."""
    return load_dataset(config.dataset, config.data_dir, cifar100_labels=config.cifar100_labels,
                        vocab_size=config.vocab_size, min_count=config.min_count, max_len=config.max_len)


def prepare_dataset(config: TrainConfig, dataset: Optional[Dataset] = None) -> Dataset:
    """Loads (unless given), subsets and normalises the dataset; checks the batch fits."""
    if dataset is None:
        dataset = load_for(config)
    dataset = dataset.subset(config.train_subset).normalized()
    if config.batch_size > len(dataset.train_y):
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set "
                          f"({len(dataset.train_y)} examples)")
    return dataset


def planned_steps(config: TrainConfig, dataset: Dataset) -> int:
    """Training steps the run plans: epochs x batches per epoch, capped by `max_steps`."""
    total = config.epochs * steps_per_epoch(len(dataset.train_y), config.batch_size)
    return total if config.max_steps is None else min(total, config.max_steps)


def make_clock(config: TrainConfig) -> Clock:
    """The clock `config.clock` names: real time, or a fresh simulated clock on `config.profile`."""
    if config.clock == "simulated":
        return SimClock(load_profile(config.profile), tie_seed=config.sim_tie_seed)
    return WALL


def _bind_device_model(session: Session) -> None:
    """Gives a simulated clock its device model: FLOPs per compiled unit, the straggler of `--delay`."""
    units, store, delay = session.units, session.store, session.delay
    straggler = (delay.device, delay.factor) if delay.kind == "straggler" else None
    step: list = []

    def flops(unit: str) -> float:
        if unit == "train_step" and unit not in units.signatures:  # ddp: the whole-model step, counted apart
            if not step:
                step.append(units.step_flops(store.params(), store.opt_states(), store.states(),
                                             session.config.batch_size))
            return step[0]
        return units.unit_flops(unit)
    session.clock.bind(DeviceModel(session.clock.profile, flops, straggler))


def build_session(config: TrainConfig, dataset: Dataset, recorder_kwargs: Optional[dict] = None,
                  unit_groups: Optional[tuple[str, ...]] = None, clock: Optional[Clock] = None,
                  spec=None) -> tuple[Session, int]:
    """Model, optimiser, compiled units (compiled here, before any thread), the store and the trainer's
    preparation.

    Args:
      dataset: the prepared (normalised) dataset.
      recorder_kwargs: passed to `Recorder` (writer, log_every, progress, desc); default: no outputs.
      unit_groups: the units to compile (default: those the trainer's spec asks for).
      clock: the run's clock (default: the one `config.clock` names).
      spec: the trainer spec to prepare (default: `config.trainer`'s; a Ray run passes its own).
    Returns:
      The session and the number of steps the run plans.
    """
    spec = trainers.get(config.trainer) if spec is None else spec
    clock = make_clock(config) if clock is None else clock
    model = get_model(config.model, dataset.input_shape, dataset.num_classes, norm=config.norm,
                      vocab_size=dataset.vocab_size)
    total_steps = planned_steps(config, dataset)
    units = Units(model, make_optimizer(config, total_steps), config.residuals)
    if clock.simulated:
        devices = simulated_devices(config.devices)
    else:
        devices = run_devices(local_device_count(config))
    params, states = model.init(jax.random.PRNGKey(config.seed))
    opt_states = units.init_opt_states(params)
    real = list(dict.fromkeys(devices))  # simulated devices share one real device
    if len(real) > 1:
        # Committed to the home device from the start, as every array a transfer makes is: a compiled
        # unit is specialised to whether its inputs are committed, so a store that became committed at
        # its first pushed update would recompile every unit inside the worker threads (holding the GIL).
        params, opt_states, states = jax.device_put((params, opt_states, states), real[0])
    store = ParamStore(model.stage_names, params, opt_states, states)
    kwargs = dict(writer=None, progress=False, desc=config.trainer, log_every=config.log_every)
    kwargs.update(recorder_kwargs or {})
    recorder = Recorder(model.stage_names, config.batch_size, total_steps, clock=clock, **kwargs)
    threads = trainers.conv_threads(config)
    session = Session(config, model, units, store, dataset, recorder, devices=tuple(devices),
                      delay=parse_delay(config.delay, devices=len(devices)), clock=clock, conv_threads=threads)
    prepared = spec.prepare(session)  # may re-place the store (ddp) and compile the trainer's own units
    session = dataclasses.replace(session, kit=prepared.kit, replicas=tuple(prepared.replicas),
                                  model_view=prepared.model_view)
    every, home = ((tuple(unit_groups), ()) if unit_groups is not None else spec.units(config, len(devices)))
    trees = (store.params(), store.opt_states(), store.states())
    with onednn.threads_set(threads):  # oneDNN makes its primitives for the epochs' thread count now
        if every:
            units.warmup(*trees, config.batch_size, groups=every, devices=real if len(real) > 1 else None)
        units.warmup(*trees, config.batch_size, eval_batch_size(config, dataset), groups=home)
    if clock.simulated:
        _bind_device_model(session)
    return session, total_steps
