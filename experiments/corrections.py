"""Staleness corrections against synchronous SGD: how much accuracy staleness costs, and what each
correction (asyncsgd/staleness.py) wins back, on 1 and 4 devices, with the default flags.

Claim (issue "staleness-aware updates"; PAPER.md: accuracy close to the synchronous reference): with
the default flags PD-ASGD stays within 0.5 point of sync on one device and 1.0 point on 4 devices
(MLP, 3 epochs), and within 1.0 point on one device for the CNN (2 epochs); no default run diverges.

Command:  python experiments/corrections.py --quick            (MLP on Fashion-MNIST, 3 epochs, 3 seeds)
          python experiments/corrections.py --quick --model cnn (residual CNN, 2 epochs: hours here)
          python experiments/corrections.py --full             (ResNet-18 on CIFAR-10, 30 epochs; a GPU)
          python experiments/corrections.py --check-defaults --seeds 1   (every trainer, default flags,
                                                                1, 2, 4 devices: does any diverge?)
Hardware: --quick the 2-core CPU: MLP about 8 seconds per run (27 runs: 4 minutes), CNN about 3 minutes
          per run.
Expected: `none` trails sync most and may diverge on 4 devices; the default correction never diverges.
Every arm except the correction itself uses the trainer's default flags (lr, momentum, batch size,
max-inflight, window and warm-up as `asyncsgd train` picks them). Our numbers are in experiments/README.md.
"""

import dataclasses
import sys
import time

from asyncsgd.config import TrainConfig
from asyncsgd.staleness import CORRECTIONS, parse_corrections
from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms

QUICK = {"mlp": dict(model="mlp", dataset="fashion_mnist", epochs=3),
         "cnn": dict(model="cnn", dataset="fashion_mnist", epochs=2)}
FULL = dict(model="resnet18", dataset="cifar10", epochs=30, lr=0.1, schedule="cosine", weight_decay=5e-4)
DEVICES = (1, 4)
DEFAULT = TrainConfig.staleness_correction
CHECK_DEVICES = (1, 2, 4)  # --check-defaults


def arms(preset: dict, data_dir, devices=DEVICES, corrections=CORRECTIONS, placement="replicated") -> list[Arm]:
    """sync, then pdasgd under every correction, on each device count (sync: one device, the reference);
    `placement` applies to the runs on several devices (`split`: one forward device, the others backward)."""
    base = TrainConfig(**preset, data_dir=data_dir, progress=False)
    out = [Arm("sync", dataclasses.replace(base, trainer="sync"), {"devices": 1, "correction": "-"})]
    for count in devices:
        where = placement if count > 1 else "replicated"
        for correction in corrections:
            config = dataclasses.replace(base, trainer="pdasgd", devices=count, staleness_correction=correction,
                                         placement=where)
            label = f"pdasgd {correction} x{count}" + (f" {where}" if where != "replicated" else "")
            out.append(Arm(label, config, {"devices": count, "correction": correction}))
    return out


def gaps(lines) -> str:
    """Each arm's mean accuracy minus sync's, in points, and whether every seed finished."""
    sync = next(line for line in lines if line["label"] == "sync")
    out = ["Gap to sync (points of test accuracy, mean over seeds; negative: below sync):", "",
           "| arm | gap | diverged |", "|---|---:|---:|"]
    for line in lines[1:]:
        acc = line["test_accuracy"]
        gap = "-" if acc is None or sync["test_accuracy"] is None else f"{100 * (acc - sync['test_accuracy']):+.2f}"
        out.append(f"| {line['label']} | {gap} | {'yes' if 'diverged' in line['statuses'] else 'no'} |")
    return "\n".join(out)


def default_arms(preset: dict, data_dir, devices=CHECK_DEVICES, names=None) -> list[Arm]:
    """Every trainer with nothing but the model, dataset and length given (`--check-defaults`): the
    staleness correction, lr, max-inflight, window and warm-up are the defaults. ddp's batch is the global
    one and must divide by the device count (the default 128 does for 1, 2, 4)."""
    from asyncsgd import trainers
    out = []
    for name in names or trainers.names():
        for count in (devices if trainers.get(name).multi_device else (1,)):
            config = TrainConfig(**preset, trainer=name, devices=count, data_dir=data_dir, progress=False)
            out.append(Arm(f"{name} x{count}", config, {"devices": count, "correction": config.staleness_correction}))
    return out


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, "corrections")
    parser.add_argument("--model", choices=sorted(QUICK), default="mlp", help="--quick's model (default mlp)")
    parser.add_argument("--devices", default=None, help="device counts (default 1,4; --check-defaults 1,2,4)")
    parser.add_argument("--corrections", default=";".join(CORRECTIONS) + ";scale,momentum;" + DEFAULT,
                        help="corrections to compare, separated by ';' (default: each alone, then scale,momentum, "
                        f"then the default {DEFAULT})")
    parser.add_argument("--check-defaults", action="store_true",
                        help="instead: every trainer with default flags on 1, 2 and 4 devices (does any diverge?)")
    parser.add_argument("--trainers", default=None, help="--check-defaults: these trainers (default: all)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop every run after N steps")
    parser.add_argument("--max-inflight", type=int, default=None, help="instead of the default run-ahead per device")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default=None, help="instead of the default")
    parser.add_argument("--placement", choices=("replicated", "split"), default="replicated",
                        help="pdasgd's placement on several devices (split: the first device runs the forward "
                        "passes, the others the backward passes; default %(default)s)")
    args = parser.parse_args(argv)
    preset = dict(FULL if args.full else QUICK[args.model], max_steps=args.max_steps)
    preset.update({k: v for k, v in (("max_inflight", args.max_inflight), ("schedule", args.schedule))
                   if v is not None})
    devices = (tuple(int(d) for d in args.devices.split(",")) if args.devices
               else CHECK_DEVICES if args.check_defaults else DEVICES)
    corrections = tuple(c.strip() for c in args.corrections.split(";") if c.strip())
    for correction in corrections:
        try:
            parse_corrections(correction)
        except ValueError as exc:
            parser.error(f"--corrections: {exc}")
    from asyncsgd.devices import request_cpu_devices
    request_cpu_devices(max(devices))  # before JAX starts
    started = time.perf_counter()
    if args.check_defaults:
        names = args.trainers.split(",") if args.trainers else None
        rows = run_arms(default_arms(preset, args.data_dir, devices, names), args.seeds, args.out)
        finish(args, rows, f"every trainer with default flags: {preset['model']} on {preset['dataset']}",
               ["devices", "correction"], started=started)
        return 0
    rows = run_arms(arms(preset, args.data_dir, devices, corrections, args.placement), args.seeds, args.out)
    finish(args, rows, f"staleness corrections vs sync: {preset['model']} on {preset['dataset']}",
           ["devices", "correction"], started=started, extra=gaps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
