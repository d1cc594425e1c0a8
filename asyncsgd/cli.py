"""Command line: `asyncsgd train | compare | bench`.

User errors (bad flags or values, missing or corrupt data, an output directory holding a finished
run) print one line `asyncsgd: error: ...` and exit 2 (usage) or 1 (data and runtime); Ctrl+C or
SIGTERM stops a run, writes what it has, and exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from typing import Optional, Sequence

from asyncsgd import trainers
from asyncsgd.config import (BACKENDS, CIFAR100_LABELS, CLOCKS, DATASETS, MODELS, NORMS, OPTIMIZERS, PLACEMENTS,
                             RESIDUAL_MODES, SCHEDULES, WINDOW_SCOPES, TrainConfig)
from asyncsgd.errors import RUNTIME_ERRORS, USAGE_ERRORS, ConfigError
from asyncsgd.staleness import CORRECTIONS

_DEFAULTS = TrainConfig()


class _Parser(argparse.ArgumentParser):
    """One-line errors (exit 2), and a record of every flag added through `flag()` (`flags`: dest ->
    the argparse action), so the CLI can map configurations back to flags without argparse's internals."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flags: dict = {}
        self.subcommands: dict = {}

    def error(self, message: str) -> None:  # one line, exit 2
        raise ConfigError(message)

    def flag(self, group, *names: str, **kwargs) -> argparse.Action:
        action = (group or self).add_argument(*names, **kwargs)
        self.flags[action.dest] = action
        return action


def _trainer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in trainers.TRAINERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown trainer(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(trainers.names())}")
    return names


def _trainer_help() -> str:
    return "; ".join(f"{name}: {spec.description}" for name, spec in trainers.TRAINERS.items())


def _model_list(text: str) -> list[str]:
    names = list(MODELS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(MODELS)} or 'all'")
    return names


def _add_run_flags(parser: _Parser, model_default: str, epochs_default: int) -> None:
    d = _DEFAULTS
    g = parser.add_argument_group("what to train")
    parser.flag(g, "--model", choices=MODELS, default=model_default)
    parser.flag(g, "--dataset", choices=DATASETS, default=d.dataset)
    parser.flag(g, "--data-dir", default=None, help="directory with the dataset files (searched first)")
    parser.flag(g, "--train-subset", type=int, default=None, help="use only the first N training examples")
    parser.flag(g, "--norm", choices=NORMS, default=d.norm,
                   help="ResNets: batch norm (running statistics kept in the store) or GroupNorm (stateless)")
    parser.flag(g, "--no-augment", action="store_false", dest="augment",
                   help="no training augmentation (CIFAR's default: pad-4 random crop and horizontal flip)")
    parser.flag(g, "--cifar100-labels", choices=CIFAR100_LABELS, default=d.cifar100_labels,
                   help="CIFAR-100: fine (100 classes) or coarse (20) labels")
    parser.flag(g, "--vocab-size", type=int, default=d.vocab_size, help="IMDb vocabulary size (with pad and OOV)")
    parser.flag(g, "--min-count", type=int, default=d.min_count, help="IMDb: least count of a vocabulary word")
    parser.flag(g, "--max-len", type=int, default=d.max_len, help="IMDb: tokens per review (longer keep their end)")
    g = parser.add_argument_group("how long")
    parser.flag(g, "--epochs", type=int, default=epochs_default)
    parser.flag(g, "--max-steps", type=int, default=None, help="stop after N steps")
    parser.flag(g, "--batch-size", type=int, default=d.batch_size)
    g = parser.add_argument_group("optimiser (applied per stage)")
    parser.flag(g, "--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    parser.flag(g, "--lr", type=float, default=d.lr)
    parser.flag(g, "--momentum", type=float, default=d.momentum)
    parser.flag(g, "--nesterov", action="store_true")
    parser.flag(g, "--weight-decay", type=float, default=d.weight_decay)
    parser.flag(g, "--schedule", choices=SCHEDULES, default=d.schedule)
    parser.flag(g, "--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up over the first N updates of each stage (default: 25 x "
                        "--devices for a trainer with stale updates to one shared store on several devices, "
                        "else 0)")
    parser.flag(g, "--staleness-correction", default=d.staleness_correction,
                help=f"how an update accounts for its gradient's staleness s, one of {{{','.join(CORRECTIONS)}}} "
                     "or several joined by commas: scale (lr / (1 + s)), dc (delay compensation), momentum "
                     "(momentum reduced by the mean staleness), predict (forward passes read the weights "
                     "extrapolated by the mean staleness); docs/usage.md")
    parser.flag(g, "--dc-lambda", type=float, default=d.dc_lambda, help="dc: lambda of g + lambda g*g (w_now - w_read)")
    _add_schedule_flags(parser, d)


def _add_schedule_flags(parser: _Parser, d: TrainConfig) -> None:
    """The flags of the asynchronous schedule, devices and delays, the clock and the run's plumbing."""
    g = parser.add_argument_group("asynchronous trainers")
    parser.flag(g, "--forward-threads", type=int, default=d.forward_threads, help="pdasgd/dasgd forward workers")
    parser.flag(g, "--backward-threads", type=int, default=d.backward_threads,
                   help="pdasgd/dasgd backward workers")
    parser.flag(g, "--max-inflight", type=int, default=d.max_inflight,
                   help="items a forward pass may run ahead of the oldest unfinished backward "
                        "(0: one at a time, deterministic with 1 forward and 1 backward thread); "
                        "staleness is at most 2x this")
    parser.flag(g, "--no-stage-sync", action="store_false", dest="stage_sync",
                   help="pdasgd/dasgd workers dispatch whole passes instead of waiting stage by stage")
    parser.flag(g, "--workers", type=int, default=d.workers, help="hogwild worker threads")
    parser.flag(g, "--residuals", choices=RESIDUAL_MODES, default=d.residuals,
                   help="stash the forward's pullback, or recompute it at the current parameters")
    parser.flag(g, "--conv-threads", type=int, default=d.conv_threads,
                   help="threads of each oneDNN convolution while training (0: all cores; 1: one core each, "
                        "so concurrent passes run side by side; docs/measurements.md)")
    g = parser.add_argument_group("devices and delays")
    parser.flag(g, "--devices", type=int, default=d.devices,
                   help="JAX devices, each with its own workers (" + ", ".join(trainers.multi_device_names())
                        + "); on a CPU, virtual devices sharing the cores")
    parser.flag(g, "--delay", default=d.delay,
                   help="extra latency, the same for every trainer: none | straggler:device=0,factor=4 | "
                        "exp:mean=0.02 | lognormal:mean=0.02,sigma=1 | periodic:every=50,stall=1.0 "
                        "(seconds; a straggler's compute steps take factor x longer, the random and periodic "
                        "delays follow each pushed update; see docs/usage.md, 'Devices and delays')")
    parser.flag(g, "--window", choices=WINDOW_SCOPES, default=d.window,
                   help="run-ahead bound on several devices: one window over all batches (global: hard staleness "
                        "bound; a straggler holds everyone back) or one per device (device)")
    parser.flag(g, "--placement", choices=PLACEMENTS, default=d.placement,
                help="replicated: every device runs every worker; split (pdasgd, dasgd): the first device runs the "
                     "forward workers, every other device backward workers (the paper's split of the work)")
    parser.flag(g, "--averaging-period", type=int, default=d.averaging_period,
                   help="lapsgd/lppsgd: average the device copies every N global steps (after the warm-up)")
    parser.flag(g, "--averaging-warmup", type=int, default=d.averaging_warmup,
                   help="lapsgd/lppsgd: average after every global step for the first N global steps")
    g = parser.add_argument_group("clock")
    parser.flag(g, "--clock", choices=CLOCKS, default=d.clock,
                help="wall: real time; simulated: virtual time on a device model, one thread at a time, "
                     "deterministic (figures are SIMULATED, labelled with the profile; docs/simulated-clock.md)")
    parser.flag(g, "--profile", default=None,
                help="with --clock simulated: a100 (default) | h100 | a JSON file (see 'asyncsgd profile')")
    parser.flag(g, "--sim-tie-seed", type=int, default=None,
                help="with --clock simulated: shuffle the order of simultaneous events with this seed "
                     "(default: device, then worker order)")
    g = parser.add_argument_group("backend")
    parser.flag(g, "--backend", choices=BACKENDS, default=d.backend,
                help="local: worker threads in this process; ray: a worker actor per --devices and stage-server "
                     "actors holding the parameters, on Ray (extra [ray]; pdasgd, dasgd, hogwild, lapsgd, lppsgd; "
                     "docs/usage.md)")
    parser.flag(g, "--ray-address", default=None,
                help="with --backend ray: join this cluster (auto: the one 'ray start --head' started here); "
                     "default: start a local Ray instance bound to 127.0.0.1")
    g = parser.add_argument_group("run")
    parser.flag(g, "--seed", type=int, default=d.seed)
    parser.flag(g, "--out", default=None, help="output directory (default runs/<trainer>-<model>-<dataset>)")
    parser.flag(g, "--overwrite", action="store_true", help="replace a finished run in --out")
    parser.flag(g, "--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs")
    parser.flag(g, "--eval-every-steps", type=int, default=None,
                   help="also evaluate every N steps while the workers run (on a snapshot; default with "
                        "--target-accuracy: a tenth of an epoch)")
    parser.flag(g, "--target-accuracy", type=float, default=None,
                   help="stop when the test accuracy reaches this (0-1); summary.json gets time_to_target_s")
    parser.flag(g, "--no-stop-at-target", action="store_false", dest="stop_at_target",
                   help="with --target-accuracy: record the time to the target but train to the end")
    parser.flag(g, "--log-every", type=int, default=d.log_every, help="train record every N steps")
    parser.flag(g, "--eval-batch-size", type=int, default=d.eval_batch_size, help="examples per evaluation batch")
    parser.flag(g, "--watchdog", type=float, default=d.watchdog_s, dest="watchdog_s",
                   help="seconds without progress before a run is declared stuck")
    parser.flag(g, "--no-progress", action="store_false", dest="progress", help="no progress bar")
    parser.flag(g, "--checkpoint-every", default=None,
                   help="write a checkpoint every N steps (500) or seconds (30s) into OUT/checkpoints; one is "
                        "always written on Ctrl+C / SIGTERM")
    parser.flag(g, "--keep-checkpoints", type=int, default=d.keep_checkpoints, help="keep the last K checkpoints")


def _config_from(args: argparse.Namespace, **overrides) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(overrides)
    return TrainConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asyncsgd", description="Asynchronous SGD with decoupled forward/backward passes "
                     "and layer-wise updates (PD-ASGD), with its baselines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train one model with one trainer")
    parser.subcommands["train"] = p
    p.flag(None, "--trainer", choices=trainers.names(), default=_DEFAULTS.trainer, help=_trainer_help())
    p.flag(None, "--resume", metavar="OUT", default=None,
                   help="continue the run in OUT from its latest checkpoint, with its saved configuration "
                        "(flags that would change what is computed are refused)")
    _add_run_flags(p, model_default="cnn", epochs_default=1)
    p = sub.add_parser("compare", help="train with several trainers one after another and print a table")
    parser.subcommands["compare"] = p
    p.flag(None, "--trainers", type=_trainer_list, default=trainers.default_comparison(),
           help="comma-separated (default: %(default)s)")
    _add_run_flags(p, model_default="mlp", epochs_default=1)
    p = sub.add_parser("bench", help="throughput of several trainers side by side on synthetic data "
                       "shaped like --dataset")
    parser.subcommands["bench"] = p
    p.flag(None, "--trainers", type=_trainer_list, default=trainers.default_comparison(),
           help="comma-separated (default: %(default)s)")
    p.flag(None, "--steps", type=int, default=20, help="timed steps per trainer and round")
    p.flag(None, "--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.flag(None, "--unit-times", action="store_true",
           help="also time each stage's units in isolation, with their GFLOP/s and MFU")
    p.flag(None, "--peer", choices=("torch",), default=None,
           help="also train the same model synchronously in PyTorch in the same rounds (extra [peer]); "
                "every row gets its ratio to it (models: mlp, cnn, resnet18)")
    p.flag(None, "--memory", action="store_true",
           help="trainers that keep residuals run once with stash and once with recompute; resident memory "
                "after each round and its growth (a leak grows it)")
    p.flag(None, "--models", type=_model_list, default=None,
                   help="instead of comparing trainers: size and time each of these models (comma-separated, "
                        "or 'all') on data shaped like its paper dataset")
    _add_run_flags(p, model_default="cnn", epochs_default=1)
    p = sub.add_parser("profile", help="measure this machine's per-unit seconds into a device profile for "
                       "--clock simulated (and, with --validate, compare its predictions with wall-clock runs)")
    parser.subcommands["profile"] = p
    p.flag(None, "--repeats", type=int, default=10, help="timed calls per unit")
    p.flag(None, "--validate", action="store_true",
           help="then run --trainers on the wall clock and on the simulated clock with this profile, side by side")
    p.flag(None, "--trainers", type=_trainer_list, default=trainers.default_comparison(),
           help="with --validate (default: %(default)s)")
    p.flag(None, "--steps", type=int, default=20, help="with --validate: timed steps per trainer and round")
    p.flag(None, "--rounds", type=int, default=3, help="with --validate: interleaved rounds")
    _add_run_flags(p, model_default="mlp", epochs_default=1)
    return parser


def config_to_argv(config: TrainConfig) -> list[str]:
    """`asyncsgd train` flags that reproduce `config` (fields left at their defaults are omitted)."""
    flags = build_parser().subcommands["train"].flags
    argv = ["train"]
    for field in dataclasses.fields(TrainConfig):
        value, default = getattr(config, field.name), field.default
        if value == default:
            continue
        action = flags[field.name]
        if action.nargs == 0:  # store_true / store_false: the flag flips the default
            argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def _default_out(config: TrainConfig, command: str) -> str:
    if command == "compare":
        return f"runs/compare-{config.model}-{config.dataset}"
    return f"runs/{config.trainer}-{config.model}-{config.dataset}"


def _explicit(parser: _Parser, command: str, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags given on the command line (not left at their defaults)."""
    by_flag = {flag: action.dest for action in parser.subcommands[command].flags.values()
               for flag in action.option_strings}
    return {by_flag[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in by_flag}


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "resume", None):
        from asyncsgd.outputs import resume_config
        explicit = _explicit(parser, "train", argv) - {"resume"}
        config = resume_config(args.resume, {name: getattr(args, name) for name in explicit})
        from asyncsgd.devices import local_device_count, request_cpu_devices
        request_cpu_devices(local_device_count(config))
        from asyncsgd.run import train
        return _report(train(config, resume=True), config)
    from asyncsgd.devices import local_device_count, request_cpu_devices
    request_cpu_devices(local_device_count(args))  # before anything starts JAX's backend
    if args.command == "bench" and args.models:
        from asyncsgd.bench import format_model_table, model_table
        config = _config_from(args, out=None)
        print(format_model_table(model_table(config, args.models, repeats=args.rounds, out=args.out)))
        return 0
    if args.command == "profile":
        from asyncsgd.bench import format_validation, measure_profile, validate_profile
        if not args.out:
            raise ConfigError("asyncsgd profile needs --out FILE (where to write the profile, JSON)")
        config = _config_from(args, out=None)
        profile = measure_profile(config, args.out, repeats=args.repeats)
        print(f"wrote {args.out}: {len(profile.units)} units measured (batch {config.batch_size})")
        if args.validate:
            print(format_validation(validate_profile(config, args.out, args.trainers, args.steps, args.rounds)))
        return 0
    if args.command == "bench":
        from asyncsgd.bench import bench, format_bench
        config = _config_from(args, out=None)  # --dataset only sets the shapes of the synthetic data
        result = bench(config, args.trainers, args.steps, out=args.out, with_units=args.unit_times,
                       rounds=args.rounds, peer=args.peer, memory=args.memory)
        print(format_bench(result))
        return 0
    config = _config_from(args, trainer=getattr(args, "trainer", "sync"))
    if config.out is None:
        config = dataclasses.replace(config, out=_default_out(config, args.command))
    if args.command == "compare":
        from asyncsgd.compare import compare
        result = compare(config, args.trainers)
        print(result["table"])
        print(f"\nresults: {config.out}/comparison.md, comparison.json and one folder per trainer")
        return 0
    from asyncsgd.run import train
    return _report(train(config), config)


def _report(summary: dict, config: TrainConfig) -> int:
    keys = ("trainer", "model", "dataset", "devices", "delay", "epochs_completed", "steps", "test_accuracy",
            "test_loss", "time_to_target_s", "samples_per_s", "wall_time_s", "compile_time_s", "mfu", "peak_rss_mb")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"results: {config.out}/summary.json, metrics.jsonl, updates.csv")
    if summary.get("learned_nothing"):
        from asyncsgd.outputs import divergence_advice
        print(f"warning: the run learned nothing (test accuracy {100 * summary['test_accuracy']:.2f}% is chance, "
              f"training loss {summary['train_loss']:.4f} that of a uniform guess); unless the learning rate is "
              f"tiny, early steps were too large (a stall with a finite loss): "
              f"{divergence_advice(config, trainers.get(config.trainer))}", file=sys.stderr)
    return 0


def _sigterm(signum, frame):
    """SIGTERM behaves like Ctrl+C (whatever SIGINT does right now): stop, write outputs, exit 130."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt()


def main(argv: Optional[Sequence[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack: what a stuck run is doing
        import faulthandler
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return _main(argv)
    except USAGE_ERRORS as exc:
        print(f"asyncsgd: error: {exc}", file=sys.stderr)
        return 2
    except RUNTIME_ERRORS as exc:
        print(f"asyncsgd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("asyncsgd: interrupted; outputs written so far are kept (status \"interrupted\")", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
