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

from asyncsgd.config import (CIFAR100_LABELS, DATASETS, MODELS, NORMS, OPTIMIZERS, RESIDUAL_MODES, SCHEDULES, TRAINERS,
                             WINDOW_SCOPES, ConfigError, TrainConfig)

_DEFAULTS = TrainConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise ConfigError(message)


def _trainer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRAINERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown trainer(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(TRAINERS)}")
    return names


def _model_list(text: str) -> list[str]:
    names = list(MODELS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(MODELS)} or 'all'")
    return names


def _add_run_flags(parser: argparse.ArgumentParser, model_default: str, epochs_default: int) -> None:
    d = _DEFAULTS
    g = parser.add_argument_group("what to train")
    g.add_argument("--model", choices=MODELS, default=model_default)
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    g.add_argument("--data-dir", default=None, help="directory with the dataset files (searched first)")
    g.add_argument("--train-subset", type=int, default=None, help="use only the first N training examples")
    g.add_argument("--norm", choices=NORMS, default=d.norm,
                   help="ResNets: batch norm (running statistics kept in the store) or GroupNorm (stateless)")
    g.add_argument("--no-augment", action="store_false", dest="augment",
                   help="no training augmentation (CIFAR's default: pad-4 random crop and horizontal flip)")
    g.add_argument("--cifar100-labels", choices=CIFAR100_LABELS, default=d.cifar100_labels,
                   help="CIFAR-100: fine (100 classes) or coarse (20) labels")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help="IMDb vocabulary size (with pad and OOV)")
    g.add_argument("--min-count", type=int, default=d.min_count, help="IMDb: least count of a vocabulary word")
    g.add_argument("--max-len", type=int, default=d.max_len, help="IMDb: tokens per review (longer keep their end)")
    g = parser.add_argument_group("how long")
    g.add_argument("--epochs", type=int, default=epochs_default)
    g.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g = parser.add_argument_group("optimiser (applied per stage)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up over the first N updates of each stage")
    g = parser.add_argument_group("asynchronous trainers")
    g.add_argument("--forward-threads", type=int, default=d.forward_threads, help="pdasgd/dasgd forward workers")
    g.add_argument("--backward-threads", type=int, default=d.backward_threads,
                   help="pdasgd/dasgd backward workers")
    g.add_argument("--max-inflight", type=int, default=d.max_inflight,
                   help="items a forward pass may run ahead of the oldest unfinished backward "
                        "(0: one at a time, deterministic with 1 forward and 1 backward thread); "
                        "staleness is at most 2x this")
    g.add_argument("--no-stage-sync", action="store_false", dest="stage_sync",
                   help="pdasgd/dasgd workers dispatch whole passes instead of waiting stage by stage")
    g.add_argument("--workers", type=int, default=d.workers, help="hogwild worker threads")
    g.add_argument("--residuals", choices=RESIDUAL_MODES, default=d.residuals,
                   help="stash the forward's pullback, or recompute it at the current parameters")
    g = parser.add_argument_group("devices and delays")
    g.add_argument("--devices", type=int, default=d.devices,
                   help="JAX devices, each with its own workers (pdasgd, dasgd, hogwild, ddp, lapsgd, lppsgd); on "
                        "a CPU, virtual devices sharing the cores")
    g.add_argument("--delay", default=d.delay,
                   help="extra latency, the same for every trainer: none | straggler:device=0,factor=4 | "
                        "exp:mean=0.02 | lognormal:mean=0.02,sigma=1 | periodic:every=50,stall=1.0 "
                        "(seconds; a straggler's compute steps take factor x longer, the random and periodic "
                        "delays follow each pushed update; see README 'Devices and delays')")
    g.add_argument("--window", choices=WINDOW_SCOPES, default=d.window,
                   help="run-ahead bound on several devices: one window over all batches (global: hard staleness "
                        "bound; a straggler holds everyone back) or one per device (device)")
    g.add_argument("--averaging-period", type=int, default=d.averaging_period,
                   help="lapsgd/lppsgd: average the device copies every N global steps (after the warm-up)")
    g.add_argument("--averaging-warmup", type=int, default=d.averaging_warmup,
                   help="lapsgd/lppsgd: average after every global step for the first N global steps")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--out", default=None, help="output directory (default runs/<trainer>-<model>-<dataset>)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs")
    g.add_argument("--eval-every-steps", type=int, default=None,
                   help="also evaluate every N steps while the workers run (on a snapshot; default with "
                        "--target-accuracy: a tenth of an epoch)")
    g.add_argument("--target-accuracy", type=float, default=None,
                   help="stop when the test accuracy reaches this (0-1); summary.json gets time_to_target_s")
    g.add_argument("--no-stop-at-target", action="store_false", dest="stop_at_target",
                   help="with --target-accuracy: record the time to the target but train to the end")
    g.add_argument("--log-every", type=int, default=d.log_every, help="train record every N steps")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="examples per evaluation batch")
    g.add_argument("--watchdog", type=float, default=d.watchdog_s, dest="watchdog_s",
                   help="seconds without progress before a run is declared stuck")
    g.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    g.add_argument("--checkpoint-every", default=None,
                   help="write a checkpoint every N steps (500) or seconds (30s) into OUT/checkpoints; one is "
                        "always written on Ctrl+C / SIGTERM")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="keep the last K checkpoints")


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
    p.add_argument("--trainer", choices=TRAINERS, default=_DEFAULTS.trainer)
    p.add_argument("--resume", metavar="OUT", default=None,
                   help="continue the run in OUT from its latest checkpoint, with its saved configuration "
                        "(flags that would change what is computed are refused)")
    _add_run_flags(p, model_default="cnn", epochs_default=1)
    p = sub.add_parser("compare", help="train with several trainers one after another and print a table")
    p.add_argument("--trainers", type=_trainer_list, default=["sync", "pdasgd", "dasgd", "hogwild"])
    _add_run_flags(p, model_default="mlp", epochs_default=1)
    p = sub.add_parser("bench", help="throughput of several trainers side by side on synthetic data "
                       "shaped like --dataset")
    p.add_argument("--trainers", type=_trainer_list, default=["sync", "layerwise", "pdasgd", "dasgd", "hogwild"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per trainer and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.add_argument("--unit-times", action="store_true", help="also time each stage's units in isolation")
    p.add_argument("--models", type=_model_list, default=None,
                   help="instead of comparing trainers: size and time each of these models (comma-separated, "
                        "or 'all') on data shaped like its paper dataset")
    _add_run_flags(p, model_default="cnn", epochs_default=1)
    return parser


def config_to_argv(config: TrainConfig) -> list[str]:
    """`asyncsgd train` flags that reproduce `config` (fields left at their defaults are omitted)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    by_dest = {action.dest: action for action in sub._actions if action.option_strings}
    argv = ["train"]
    for field in dataclasses.fields(TrainConfig):
        value, default = getattr(config, field.name), field.default
        if value == default:
            continue
        action = by_dest[field.name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv.append(action.option_strings[0])  # the flag flips the default
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def _default_out(config: TrainConfig, command: str) -> str:
    if command == "compare":
        return f"runs/compare-{config.model}-{config.dataset}"
    return f"runs/{config.trainer}-{config.model}-{config.dataset}"


def _explicit(parser: argparse.ArgumentParser, command: str, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags given on the command line (not left at their defaults)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    by_flag = {flag: action.dest for action in sub._actions for flag in action.option_strings}
    return {by_flag[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in by_flag}


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "resume", None):
        from asyncsgd.run import resume_config
        explicit = _explicit(parser, "train", argv) - {"resume"}
        config = resume_config(args.resume, {name: getattr(args, name) for name in explicit})
        from asyncsgd.devices import request_cpu_devices
        request_cpu_devices(config.devices)
        from asyncsgd.run import train
        return _report(train(config, resume=True), config)
    from asyncsgd.devices import request_cpu_devices
    request_cpu_devices(args.devices)  # before anything starts JAX's backend
    if args.command == "bench" and args.models:
        from asyncsgd.bench import format_model_table, model_table
        config = _config_from(args, out=None)
        print(format_model_table(model_table(config, args.models, repeats=args.rounds, out=args.out)))
        return 0
    if args.command == "bench":
        from asyncsgd.bench import bench, format_bench
        config = _config_from(args, out=None)  # --dataset only sets the shapes of the synthetic data
        result = bench(config, args.trainers, args.steps, out=args.out, with_units=args.unit_times,
                       rounds=args.rounds)
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
    return 0


def _sigterm(signum, frame):
    """SIGTERM behaves like Ctrl+C (whatever SIGINT does right now): stop, write outputs, exit 130."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from asyncsgd.data import ChecksumError, DataFormatError, DatasetNotFound
    from asyncsgd.metrics import NonFiniteLoss
    from asyncsgd.workers import StallError, WorkerError

    signal.signal(signal.SIGTERM, _sigterm)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack: what a stuck run is doing
        import faulthandler
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"asyncsgd: error: {exc}", file=sys.stderr)
        return 2
    except (DatasetNotFound, DataFormatError, ChecksumError, WorkerError, StallError, NonFiniteLoss) as exc:
        print(f"asyncsgd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("asyncsgd: interrupted; outputs written so far are kept (status \"interrupted\")", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
