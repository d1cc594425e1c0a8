"""Forward:backward thread ratio sweep: throughput and accuracy of PD-ASGD at 1:1, 1:2, 1:3, 2:4.

Claim (PAPER.md): the backward pass costs about twice the forward, so 1 forward : 2 backward threads
hide the backward behind back-to-back forward passes (ideal speed-up 1 + backward/forward cost).

Command:  python experiments/thread_ratio.py --quick     (this CPU: the residual CNN on 3840 Fashion-MNIST
                                                          images, 1 epoch, 3 seeds)
          python experiments/thread_ratio.py --full      (ResNet-18 on CIFAR-10, 10 epochs; a GPU)
Hardware: --quick the 2-core CPU, about 6 minutes; --full a GPU.
Expected: on a GPU, 1:2 or 1:3 fastest; on this CPU XLA already keeps both cores busy per op, so
ratios differ little (README, "Why PD-ASGD gains little on this CPU"). Our numbers: experiments/README.md.
"""

import sys
import time

from asyncsgd.config import TrainConfig
from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms

QUICK = dict(model="cnn", dataset="fashion_mnist", epochs=1, batch_size=128, lr=0.05, train_subset=3840,
             warmup_steps=10)
FULL = dict(model="resnet18", dataset="cifar10", epochs=10, batch_size=128, lr=0.1, warmup_steps=400)
RATIOS = ((1, 1), (1, 2), (1, 3), (2, 4))


def main(argv=None) -> int:
    args = experiment_parser(__doc__, "thread_ratio").parse_args(argv)
    preset = FULL if args.full else QUICK
    base = TrainConfig(**preset, data_dir=args.data_dir, progress=False, momentum=0.9)
    arms = [Arm("sync", TrainConfig(**{**base.to_dict(), "trainer": "sync"}), {"threads": "-"})]
    arms += [Arm(f"pdasgd {f}:{b}", TrainConfig(**{**base.to_dict(), "trainer": "pdasgd", "forward_threads": f,
                                                    "backward_threads": b}), {"threads": f"{f}:{b}"})
             for f, b in RATIOS]
    started = time.perf_counter()
    rows = run_arms(arms, args.seeds, args.out)
    finish(args, rows, f"forward:backward threads: {base.model} on {base.dataset}", ["threads"], started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
