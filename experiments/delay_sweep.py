"""Synchronous data parallelism under delays, sweeping the delay size: DDP against PD-ASGD.

Claim (PAPER.md, v2/v3): in the presence of delays PD-ASGD is up to 5.95x faster than synchronous data
parallelism, because DDP waits for the slowest device at every step while PD-ASGD's devices go on.

Command:  python experiments/delay_sweep.py --quick     (this CPU: MLP on Fashion-MNIST, 4 virtual devices)
          python experiments/delay_sweep.py --full      (ResNet-18 on CIFAR-10, 4 GPUs)
Hardware: --quick the 2-core CPU, about 8 minutes with 3 seeds; --full 4 GPUs, hours.
Expected: DDP's time to the target grows about linearly with the straggler factor, PD-ASGD's barely;
the ratio DDP/PD-ASGD grows with the delay. Our --quick numbers are in experiments/README.md.
"""

import sys
import time

from asyncsgd.config import TrainConfig
from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms

QUICK = dict(model="mlp", dataset="fashion_mnist", epochs=3, batch_size=32, lr=0.01, warmup_steps=100,
             target_accuracy=0.80, eval_every_samples=3200)
FULL = dict(model="resnet18", dataset="cifar10", epochs=60, batch_size=128, lr=0.1, warmup_steps=400,
            target_accuracy=0.90, eval_every_samples=12500)
DELAYS = ("none", "straggler:device=0,factor=2", "straggler:device=0,factor=4", "straggler:device=0,factor=8",
          "exp:mean=0.005", "exp:mean=0.02")


def ratios(lines) -> str:
    by = {(line["delay"], line["trainer"]): line for line in lines}
    out = ["| delay | DDP s | PD-ASGD s | DDP / PD-ASGD |", "|---|---:|---:|---:|"]
    for delay in DELAYS:
        ddp, pd = by.get((delay, "ddp")), by.get((delay, "pdasgd"))
        if not ddp or not pd:
            continue
        a, b = ddp["time_to_target_s"], pd["time_to_target_s"]
        ratio = f"{a / b:.2f}x" if a and b else "target not reached"
        out.append(f"| {delay} | {a or float('nan'):.1f} | {b or float('nan'):.1f} | {ratio} |")
    return "Time to the target (mean over seeds):\n\n" + "\n".join(out)


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, "delay_sweep")
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args(argv)
    from asyncsgd.devices import request_cpu_devices
    request_cpu_devices(args.devices)
    preset = dict(FULL if args.full else QUICK)
    every = preset.pop("eval_every_samples")
    arms = []
    for delay in DELAYS:
        for trainer in ("ddp", "pdasgd"):
            batch = preset["batch_size"] * (args.devices if trainer == "ddp" else 1)
            config = TrainConfig(**{**preset, "batch_size": batch,
                                    "warmup_steps": preset["warmup_steps"] * preset["batch_size"] // batch},
                                 trainer=trainer, devices=args.devices, delay=delay, window="device", max_inflight=1,
                                 eval_every_steps=max(1, every // batch), momentum=0.9, data_dir=args.data_dir,
                                 progress=False)
            arms.append(Arm(f"{trainer} {delay}", config, {"delay": delay}))
    started = time.perf_counter()
    rows = run_arms(arms, args.seeds, args.out)
    finish(args, rows, f"DDP vs PD-ASGD under delays: {preset['model']} on {preset['dataset']}, {args.devices} devices, "
           f"per-device batch {preset['batch_size']}", ["delay"], target=preset["target_accuracy"], started=started,
           extra=ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
