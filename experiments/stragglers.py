"""Stragglers and delays: PD-ASGD against DDP, LAP-SGD, LPP-SGD, Hogwild! and D-ASGD on N devices.

Claim (PAPER.md): with several devices and delays PD-ASGD is up to 5.95x faster than synchronous data
parallelism and 2.14x-2.97x faster than LPP-SGD (the paper's numbers, on A100 GPUs).

Command:  python experiments/stragglers.py --quick        (this CPU: 4 virtual devices on 2 cores)
          python experiments/stragglers.py --full         (meant for 4 GPUs: ResNet-18 on CIFAR-10)
Expected runtime: --quick about 10-15 minutes here; --full hours on 4 GPUs.
Expected numbers: see experiments/README.md for what --quick measured on this machine.

Every trainer runs the same model, optimiser, learning-rate schedule, per-device batch and seed, in
three scenarios: no delay, one 4x straggler (`straggler:device=0,factor=4`) and random exponential
delays after each pushed update (`exp:mean=...`). Each run stops when the periodic test evaluation
(on a snapshot, every `--eval-every-samples` training samples, workers not paused) reaches
`--target-accuracy`, or after `--epochs`. DDP's global batch is devices x the per-device batch (the
usual data-parallel setting), so it makes `devices` times fewer updates per sample; its evaluations
come after the same number of samples as the others'.

Writes into `--out` (default results/stragglers): one run folder per scenario/trainer/seed,
`results.json` (every summary plus the ratios), `results.md` (the table), and one PNG per scenario
of test accuracy against wall-clock time.

`--window device` (default) bounds each device's run-ahead separately, so a slow device holds back no
other one (the multi-device setting of the paper and of LAP-SGD); `--window global` keeps one window
over all batches, which bounds staleness but lets a straggler's oldest item stall every device
(measured: PD-ASGD's throughput under a 4x straggler fell to 0.49x of no delay with a global window,
0.91x with per-device windows).

The virtual devices of --quick share two cores: they show how each method copes with a slow or
delayed device (the others keep the cores busy while it sleeps), not multi-device FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from asyncsgd.sweep import mean_spread

QUICK = dict(model="mlp", dataset="fashion_mnist", batch_size=32, lr=0.01, momentum=0.9, warmup_steps=100,
             epochs=3, target_accuracy=0.82, random_delay="exp:mean=0.01", eval_every_samples=3200)
FULL = dict(model="resnet18", dataset="cifar10", batch_size=128, lr=0.1, momentum=0.9, warmup_steps=400,
            epochs=60, target_accuracy=0.90, random_delay="exp:mean=0.05", eval_every_samples=50000 // 4)
TRAINERS = ("pdasgd", "ddp", "lapsgd", "lppsgd", "hogwild", "dasgd")


def scenarios(random_delay: str) -> dict[str, str]:
    return {"none": "none", "straggler": "straggler:device=0,factor=4", "random": random_delay}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="this CPU, Fashion-MNIST MLP (the default)")
    size.add_argument("--full", action="store_true", help="the paper's setting, for GPUs")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--scenarios", default="none,straggler,random")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per run (mean and spread reported)")
    parser.add_argument("--target-accuracy", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="upper bound on each run's length")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-inflight", type=int, default=1, help="items in flight per device (async trainers)")
    parser.add_argument("--window", choices=("device", "global"), default="device",
                        help="run-ahead bound of the async trainers: per device (default; devices independent, "
                             "as on real hardware) or one global window (hard staleness bound; a straggler "
                             "holds every device back)")
    parser.add_argument("--out", default="results/stragglers")
    parser.add_argument("--overwrite", action="store_true", help="replace finished runs in --out")
    return parser.parse_args(argv)


def run_configs(args, preset: dict):
    """Yields (scenario, trainer, seed, TrainConfig) for every run of the experiment."""
    from asyncsgd.config import TrainConfig
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    table = scenarios(preset["random_delay"])
    unknown = [s for s in chosen if s not in table] + [t for t in trainers if t not in TRAINERS]
    if unknown:
        raise SystemExit(f"stragglers.py: error: unknown scenario(s)/trainer(s): {', '.join(unknown)}")
    for scenario in chosen:
        for trainer in trainers:
            for seed in range(args.seeds):
                per_device = preset["batch_size"]
                batch = per_device * args.devices if trainer == "ddp" else per_device
                yield scenario, trainer, seed, TrainConfig(
                    trainer=trainer, model=preset["model"], dataset=preset["dataset"], data_dir=args.data_dir,
                    train_subset=args.train_subset, epochs=args.epochs or preset["epochs"], batch_size=batch,
                    lr=preset["lr"], momentum=preset["momentum"],
                    warmup_steps=preset["warmup_steps"] * per_device // batch, devices=args.devices,
                    delay=table[scenario], max_inflight=args.max_inflight, window=args.window, forward_threads=1, backward_threads=2,
                    workers=2, seed=seed, target_accuracy=args.target_accuracy or preset["target_accuracy"],
                    eval_every_steps=max(1, preset["eval_every_samples"] // batch), eval_every=1, progress=True,
                    log_every=50, overwrite=args.overwrite,
                    out=os.path.join(args.out, scenario, trainer + (f"-seed{seed}" if args.seeds > 1 else "")))


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (scenario, trainer): means and half-ranges over seeds, and ratios to PD-ASGD."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["trainer"]), []).append(row)
    lines = []
    for (scenario, trainer), runs in groups.items():
        reached = [r for r in runs if r["time_to_target_s"] is not None]
        ttt, ttt_spread = mean_spread([r["time_to_target_s"] for r in runs])
        acc, acc_spread = mean_spread([r["test_accuracy"] for r in runs])
        sps, _ = mean_spread([r["samples_per_s"] for r in runs])
        lines.append(dict(scenario=scenario, trainer=trainer, runs=len(runs), reached=len(reached),
                          time_to_target_s=ttt, time_to_target_spread=ttt_spread,
                          samples_to_target=mean_spread([r["steps_to_target"] * r["config"]["batch_size"]
                                                   if r["steps_to_target"] else None for r in runs])[0],
                          final_accuracy=acc, final_accuracy_spread=acc_spread, samples_per_s=sps,
                          staleness_max=max(max((s["max"] for s in r["staleness"].values()), default=0) for r in runs),
                          statuses=sorted({r["status"] for r in runs})))
    for line in lines:
        ref = next((x for x in lines if x["scenario"] == line["scenario"] and x["trainer"] == "pdasgd"), None)
        base = next((x for x in lines if x["scenario"] == "none" and x["trainer"] == line["trainer"]), None)
        line["pdasgd_sooner_x"] = (line["time_to_target_s"] / ref["time_to_target_s"]
                                   if ref and ref["time_to_target_s"] and line["time_to_target_s"] else None)
        line["throughput_vs_no_delay"] = (line["samples_per_s"] / base["samples_per_s"]
                                          if base and base["samples_per_s"] else None)
    return lines


def _fmt(value, pattern="{:.1f}", spread=None):
    if value is None:
        return "not reached"
    text = pattern.format(value)
    return text + (f" ± {pattern.format(spread)}" if spread else "")


def format_table(lines: list[dict], header: str) -> str:
    out = [header, "",
           "| scenario | trainer | time to target s | PD-ASGD sooner | samples to target | final acc | samples/s | "
           "throughput vs no delay | max staleness | reached | status |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in lines:
        out.append(f"| {x['scenario']} | {x['trainer']} | {_fmt(x['time_to_target_s'], spread=x['time_to_target_spread'])} | "
                   f"{_fmt(x['pdasgd_sooner_x'], '{:.2f}x')} | {_fmt(x['samples_to_target'], '{:.0f}')} | "
                   f"{_fmt(100 * x['final_accuracy'], '{:.2f}%', 100 * (x['final_accuracy_spread'] or 0))} | "
                   f"{x['samples_per_s']:.0f} | {_fmt(x['throughput_vs_no_delay'], '{:.2f}x')} | "
                   f"{x['staleness_max']} | {x['reached']}/{x['runs']} | {', '.join(x['statuses'])} |")
    out += ["", "PD-ASGD sooner: the method's time to target / PD-ASGD's in the same scenario (>1: PD-ASGD "
            "got there first). Final acc: test accuracy when the run stopped (at the target or after the "
            "last epoch)."]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    from asyncsgd.devices import request_cpu_devices
    request_cpu_devices(args.devices)  # before JAX starts
    from asyncsgd.config import ConfigError
    from asyncsgd.data import load_dataset
    from asyncsgd.errors import DivergedError
    from asyncsgd.plots import plot_accuracy
    from asyncsgd.run import train

    preset = FULL if args.full else QUICK
    plan = list(run_configs(args, preset))
    print(f"stragglers: {len(plan)} runs ({'full' if args.full else 'quick'}), devices {args.devices}, "
          f"results in {args.out}", file=sys.stderr)
    first = plan[0][3]
    dataset = load_dataset(first.dataset, first.data_dir)
    rows, started = [], time.perf_counter()
    for number, (scenario, trainer, seed, config) in enumerate(plan, 1):
        print(f"[{number}/{len(plan)}] {scenario}: {trainer} seed {seed} (delay {config.delay})", file=sys.stderr)
        try:
            summary = train(config, dataset)
        except DivergedError as exc:
            summary = exc.summary
        except ConfigError as exc:
            print(f"stragglers.py: error: {exc}", file=sys.stderr)
            return 2
        rows.append(dict(summary, scenario=scenario, out=config.out))
    lines = aggregate(rows)
    header = (f"{first.model} on {first.dataset}, {args.devices} devices, {args.window} windows, "
              f"per-device batch {preset['batch_size']}, "
              f"lr {first.lr}, target {100 * first.target_accuracy:.0f}%, seeds {args.seeds}; "
              f"total {time.perf_counter() - started:.0f}s")
    table = format_table(lines, header)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"lines": lines, "runs": rows, "args": vars(args), "preset": preset}, handle, indent=2)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        runs = {f"{r['trainer']}" + (f" s{r['seed']}" if args.seeds > 1 else ""): r["out"]
                for r in rows if r["scenario"] == scenario}
        plot_accuracy(runs, os.path.join(args.out, f"accuracy_vs_time_{scenario}.png"), target=first.target_accuracy,
                      title=f"{first.model} / {first.dataset}, {args.devices} devices, delay: "
                            f"{scenarios(preset['random_delay'])[scenario]}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
