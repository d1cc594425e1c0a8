"""The trainer registry: a trainer defined here, in the test, registered and trained end to end through
`train()`, the CLI and the configuration asking the registry, and the specs of the built-in trainers."""

import dataclasses
import os

import chex
import jax
import numpy as np
import pytest
from conftest import replace, run_steps

from asyncsgd import TrainConfig, trainers
from asyncsgd.cli import build_parser
from asyncsgd.config import validate
from asyncsgd.errors import ConfigError
from asyncsgd.models import onednn
from asyncsgd.optim import learning_rate_schedule
from asyncsgd.run import train
from asyncsgd.trainers import Epoch, EpochResult, TrainerSpec, fixed_units

pytestmark = pytest.mark.timeout(240)


def _plain_epoch(session, plan) -> EpochResult:
    """One thread: the whole-model gradient, then one whole-model commit (synchronous SGD through the
    store, in the shape every trainer has: an `Epoch`, a worker body, `run()`)."""
    epoch = Epoch(session, plan)
    units, store, recorder = session.units, session.store, session.recorder

    def body(worker):
        while True:
            batch = worker.get(epoch.batches)
            worker.beat(f"plain step (item {batch.seq})")
            slots = [store.read(stage) for stage in range(len(store))]
            grads, loss, _ = units.model_grad([s.params for s in slots], [s.state for s in slots], batch.x, batch.y)
            commits = store.commit_all(lambda p, o, s: (*units.model_update(
                p, o, grads, [store.staleness(i, slot.version) for i, slot in enumerate(slots)], p), s, None))
            recorder.committed_all(commits, worker.name, [s.version for s in slots])
            loss.block_until_ready()  # blocks: one step at a time
            recorder.item_done(batch.seq, loss)

    epoch.crew.spawn("plain", body)
    return epoch.run()


def _even_batch(config) -> None:
    if config.batch_size % 2:
        raise ConfigError(f"--batch-size {config.batch_size}: plain_sgd wants an even batch")


PLAIN = TrainerSpec(name="plain_sgd", description="synchronous SGD through the store (a test trainer)",
                    run_epoch=_plain_epoch, exact_position=True, units=fixed_units("model_grad"),
                    check=_even_batch)


@pytest.fixture
def plain_registered():
    trainers.register(PLAIN)
    try:
        yield PLAIN
    finally:
        trainers.unregister(PLAIN.name)


def test_a_trainer_defined_in_a_test_trains_end_to_end_through_train(tiny_config, tiny_data, plain_registered):
    config = replace(tiny_config, trainer="plain_sgd", epochs=2, momentum=0.9)
    summary = train(config, tiny_data)
    per_epoch = len(tiny_data.train_y) // config.batch_size
    assert summary["status"] == "complete" and summary["trainer"] == "plain_sgd"
    assert summary["steps"] == 2 * per_epoch and summary["epochs_completed"] == 2
    assert set(summary["updates_per_stage"].values()) == {2 * per_epoch}
    assert summary["staleness_bound"] == 0 and all(s["max"] == 0 for s in summary["staleness"].values())
    assert summary["test_accuracy"] > 0.5 and summary["max_trace_count"] == 1
    # Its math is sync's: the same parameters after the same steps.
    ours = run_steps(replace(config, out=None), tiny_data, 10)
    sync = run_steps(replace(config, trainer="sync", out=None), tiny_data, 10)
    chex.assert_trees_all_close(jax.device_get(ours.store.params()), jax.device_get(sync.store.params()),
                                rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.recorder.losses, sync.recorder.losses, rtol=1e-4)


def test_the_configuration_and_the_cli_ask_the_registry(tiny_config, plain_registered):
    validate(replace(tiny_config, trainer="plain_sgd"))
    with pytest.raises(ConfigError, match="plain_sgd wants an even batch"):  # the spec's own check
        validate(replace(tiny_config, trainer="plain_sgd", batch_size=15))
    with pytest.raises(ConfigError, match="runs on one device; --devices 2 needs one of pdasgd"):
        validate(replace(tiny_config, trainer="plain_sgd", devices=2))
    args = build_parser().parse_args(["train", "--trainer", "plain_sgd"])
    assert args.trainer == "plain_sgd"
    help_text = " ".join(build_parser().subcommands["train"].format_help().split())  # unwrapped
    assert "plain_sgd: synchronous SGD through the store" in help_text


def test_an_unregistered_trainer_is_unknown_everywhere(tiny_config):
    assert "plain_sgd" not in trainers.TRAINERS
    with pytest.raises(ConfigError, match="unknown value 'plain_sgd'; choose one of sync, layerwise"):
        validate(replace(tiny_config, trainer="plain_sgd"))
    with pytest.raises(ConfigError, match="invalid choice: 'plain_sgd'"):
        build_parser().parse_args(["train", "--trainer", "plain_sgd"])
    with pytest.raises(ValueError, match="already registered"):
        trainers.register(dataclasses.replace(PLAIN, name="sync"))
    with pytest.raises(ValueError, match="built in"):
        trainers.unregister("sync")


def test_the_built_in_specs():
    specs = trainers.TRAINERS
    assert list(specs) == ["sync", "layerwise", "pdasgd", "dasgd", "hogwild", "ddp", "lapsgd", "lppsgd"]
    assert all(name == spec.name and spec.description for name, spec in specs.items())
    assert [n for n, s in specs.items() if s.exact_position] == ["sync", "ddp"]
    assert trainers.multi_device_names() == ("pdasgd", "dasgd", "hogwild", "ddp", "lapsgd", "lppsgd")
    assert trainers.default_comparison() == ["sync", "layerwise", "pdasgd", "dasgd", "hogwild"]


@pytest.mark.parametrize("trainer, devices, expected", [
    ("pdasgd", 4, 100), ("dasgd", 2, 50), ("hogwild", 4, 100),  # stale updates on one shared store
    ("pdasgd", 1, 0),  # one device: as before
    ("sync", 1, 0), ("layerwise", 1, 0), ("ddp", 4, 0),  # staleness 0: equal to each other
    ("lapsgd", 4, 0), ("lppsgd", 2, 0),  # copies, stale only through averaging
])
def test_the_default_warm_up_grows_with_the_devices_for_shared_store_asynchronous_trainers(trainer, devices,
                                                                                          expected):
    config = TrainConfig(trainer=trainer, devices=devices)
    assert config.warmup_steps is None
    assert trainers.resolve_defaults(config).warmup_steps == expected
    # one given on the command line is kept, 0 included
    assert trainers.resolve_defaults(dataclasses.replace(config, warmup_steps=0)).warmup_steps == 0
    assert trainers.resolve_defaults(dataclasses.replace(config, warmup_steps=7)).warmup_steps == 7


def test_a_run_records_the_warm_up_it_resolved_and_ramps_its_rate(tiny_config, tiny_data):
    config = replace(tiny_config, trainer="hogwild", devices=2, max_steps=6)
    summary = train(config, tiny_data)
    assert summary["status"] == "complete" and summary["config"]["warmup_steps"] == 50
    schedule = learning_rate_schedule(config, total_steps=100)  # unresolved: resolved on the way
    assert float(schedule(0)) == 0.0 and float(schedule(25)) == pytest.approx(config.lr / 2)
    assert float(schedule(50)) == pytest.approx(config.lr)


@pytest.mark.parametrize("trainer, workers, devices", [
    ("sync", 2, 1), ("pdasgd", 2, 1), ("dasgd", 2, 4),  # stage-wise or one pass: every convolution on all cores
    ("hogwild", 2, 1), ("hogwild", 1, 1), ("hogwild", 2, 4), ("lapsgd", 2, 2), ("lppsgd", 1, 2),  # whole passes
])
def test_the_convolution_threads_are_the_cores_shared_among_concurrent_whole_passes(trainer, workers, devices):
    cores = os.cpu_count() or 1
    config = TrainConfig(trainer=trainer, workers=workers, devices=devices)
    assert config.conv_threads is None
    whole_passes = trainer in ("hogwild", "lapsgd", "lppsgd")
    share = max(1, cores // (workers * devices))
    expected = (0 if share >= cores else share) if whole_passes else 0
    assert trainers.conv_threads(config) == expected
    assert trainers.resolve_defaults(config).conv_threads == expected
    # given on the command line, it wins (0 included)
    assert trainers.conv_threads(dataclasses.replace(config, conv_threads=0)) == 0
    assert trainers.resolve_defaults(dataclasses.replace(config, conv_threads=3)).conv_threads == 3
    with pytest.raises(ConfigError, match="--conv-threads must be in"):
        validate(dataclasses.replace(config, conv_threads=-1))


def test_an_epoch_runs_its_workers_at_the_runs_convolution_threads_and_restores_them(tiny_config, tiny_data):
    available, reason = onednn.status()  # loads the library, as building a convolution does
    if not available:
        pytest.skip(reason)
    seen = []

    def recording_epoch(session, plan):
        epoch = Epoch(session, plan)

        def body(worker):  # takes every batch (EndOfStream ends it), noting the threads a convolution gets
            while True:
                worker.get(epoch.batches)
                seen.append(onednn.threads())

        epoch.crew.spawn("recording", body)
        return epoch.run()

    spec = dataclasses.replace(PLAIN, name="recording", run_epoch=recording_epoch)
    before = onednn.threads()
    trainers.register(spec)
    try:
        for threads in (1, 3):
            seen.clear()
            train(replace(tiny_config, trainer="recording", conv_threads=threads, max_steps=2, out=None), tiny_data)
            assert seen and set(seen) == {threads}
            assert onednn.threads() == before  # back to the setting before the run
    finally:
        trainers.unregister(spec.name)
