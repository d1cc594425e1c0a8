"""Memory per method and residual mode: peak RSS and the bytes held in in-flight residuals.

Claim (PAPER.md and the reviewers' objections): decoupling forward and backward keeps several forward
passes' residuals alive at once; the cost must be measured, per method, and set against recomputing
the residuals in the backward pass.

Command:  python experiments/memory.py --quick      (this CPU: the residual CNN, batch 128, 30 steps)
          python experiments/memory.py --full       (ResNet-50 on CIFAR-10, batch 128; a GPU)
Hardware: --quick the 2-core CPU, about 4 minutes; --full a GPU.
Expected: stash mode holds (peak in-flight items) x (residual bytes per item) beyond the model;
recompute mode keeps only each stage's input (much less) and pays for it in backward time; the
synchronous trainers hold one step's activations. Our --quick numbers are in experiments/README.md.

Each run is its own process (`asyncsgd train`), since a process's peak RSS only grows; one seed by
default (memory does not depend on it).
"""

import sys
import time

from asyncsgd.config import TrainConfig
from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms

QUICK = dict(model="cnn", dataset="fashion_mnist", epochs=1, batch_size=128, lr=0.05, train_subset=3840,
             max_steps=30, warmup_steps=10)
FULL = dict(model="resnet50", dataset="cifar10", epochs=1, batch_size=128, lr=0.1, max_steps=200, warmup_steps=50)
ARMS = (("sync", "sync", "stash"), ("layerwise", "layerwise", "stash"), ("pdasgd stash", "pdasgd", "stash"),
        ("pdasgd recompute", "pdasgd", "recompute"), ("dasgd stash", "dasgd", "stash"), ("hogwild", "hogwild", "stash"))


def memory_table(rows) -> str:
    out = ["| arm | residuals | residual MB per item | peak items in flight | residual MB in flight (peak) | "
           "peak RSS MB | samples/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["seed"] != 0:
            continue
        items = r.get("peak_inflight_items") or 1
        per_item = r["residual_mb_per_item"] if r["trainer"] in ("pdasgd", "dasgd", "layerwise") else 0.0
        held = f"{per_item * items:.0f}" if per_item else "- (whole-step jit)"
        out.append(f"| {r['label']} | {r['config']['residuals'] if per_item else '-'} | "
                   f"{per_item:.1f} | {r.get('peak_inflight_items') or 1} | {held} | {r['peak_rss_mb']:.0f} | "
                   f"{r['samples_per_s']:.0f} |")
    return "Memory (seed 0):\n\n" + "\n".join(out)


def main(argv=None) -> int:
    args = experiment_parser(__doc__, "memory", seeds=1).parse_args(argv)
    preset = FULL if args.full else QUICK
    base = TrainConfig(**preset, data_dir=args.data_dir, progress=False, momentum=0.9)
    arms = [Arm(label, TrainConfig(**{**base.to_dict(), "trainer": trainer, "residuals": mode}), {"residuals": mode})
            for label, trainer, mode in ARMS]
    started = time.perf_counter()
    rows = run_arms(arms, args.seeds, args.out, isolate=True)
    finish(args, rows, f"memory: {base.model} on {base.dataset}, batch {base.batch_size}", ["residuals"],
           started=started, extra=lambda lines: memory_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
