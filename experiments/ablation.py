"""Ablation: layer-wise updates (PD-ASGD) against block updates (D-ASGD), beside synchronous backprop.

Claim (PAPER.md): committing each layer as soon as its gradient exists (PD-ASGD) beats committing the
whole model after the full backward pass (D-ASGD, the paper's ablation): fresher updates for the
layers near the output, and no waiting for the slowest layer.

Command:  python experiments/ablation.py --quick       (this CPU: MLP on Fashion-MNIST, 2 epochs, 3 seeds)
          python experiments/ablation.py --full        (ResNet-18 on CIFAR-10, 30 epochs; a GPU)
Hardware: --quick the 2-core CPU, about 2 minutes; --full a GPU, hours.
Expected: PD-ASGD's accuracy at or above D-ASGD's with lower staleness on the top layers; both a little
below sync. Our --quick numbers are in experiments/README.md.
"""

import sys
import time

from asyncsgd.config import TrainConfig
from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms

QUICK = dict(model="mlp", dataset="fashion_mnist", epochs=2, batch_size=128, lr=0.02, warmup_steps=50)
FULL = dict(model="resnet18", dataset="cifar10", epochs=30, batch_size=128, lr=0.1, warmup_steps=400,
            schedule="cosine", weight_decay=5e-4)


def main(argv=None) -> int:
    args = experiment_parser(__doc__, "ablation").parse_args(argv)
    preset = FULL if args.full else QUICK
    base = TrainConfig(**preset, data_dir=args.data_dir, progress=False, momentum=0.9)
    arms = [Arm(name, TrainConfig(**{**base.to_dict(), "trainer": trainer}), {"commits": commits})
            for name, trainer, commits in [("sync", "sync", "whole step"), ("pdasgd", "pdasgd", "per layer"),
                                           ("dasgd", "dasgd", "whole model after backward")]]
    started = time.perf_counter()
    rows = run_arms(arms, args.seeds, args.out)
    finish(args, rows, f"layer-wise vs block updates: {base.model} on {base.dataset}", ["commits"], started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
