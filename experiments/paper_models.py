"""Paper-scale comparison: PD-ASGD against LAP-SGD, LPP-SGD and synchronous backprop, final accuracy
and time to accuracy (CIFAR-10/100, ResNet-18/50 in the paper; IMDb with an LSTM).

Claims (PAPER.md): PD-ASGD reaches comparable accuracy faster: 2.14x (v2/v3) to 2.97x (v1) over
LPP-SGD on CIFAR; the LSTM on IMDb trains too.

Command:  python experiments/paper_models.py --quick                 (this CPU: MLP on Fashion-MNIST, 2 devices)
          python experiments/paper_models.py --quick --task imdb     (this CPU: the LSTM on generated text)
          python experiments/paper_models.py --full --task cifar10-resnet18   (also cifar100-resnet18,
                                                 cifar10-resnet50, cifar100-resnet50, imdb; 4 GPUs)
Hardware: --quick the 2-core CPU, about 3 minutes per task; --full 4 GPUs, hours per task.
Expected: the paper's ratios on GPUs; on this CPU see experiments/README.md for what --quick measured.
CIFAR-10/100 and IMDb cannot be downloaded on the machine that wrote this, so --quick uses stand-ins:
Fashion-MNIST with the MLP for the image tasks, `synthetic_text` for IMDb.
"""

import sys
import time

from asyncsgd.config import TrainConfig
from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms

QUICK = {
    "image": dict(model="mlp", dataset="fashion_mnist", epochs=2, batch_size=64, lr=0.02, warmup_steps=50,
                  target_accuracy=0.84),
    "imdb": dict(model="lstm", dataset="synthetic_text", epochs=2, batch_size=32, lr=0.05, warmup_steps=20,
                 target_accuracy=0.9),
}
FULL = {
    f"{data}-{model}": dict(model=model, dataset=data, epochs=100, batch_size=128, lr=0.1, warmup_steps=2000,
                            schedule="cosine", weight_decay=5e-4, nesterov=True,
                            target_accuracy=0.93 if data == "cifar10" else 0.73)
    for data in ("cifar10", "cifar100") for model in ("resnet18", "resnet50")
}
FULL["imdb"] = dict(model="lstm", dataset="imdb", epochs=10, batch_size=64, lr=0.05, target_accuracy=0.85)


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, "paper_models")
    parser.add_argument("--task", default=None, help=f"quick: {', '.join(QUICK)}; full: {', '.join(FULL)}")
    parser.add_argument("--devices", type=int, default=2, help="devices of the asynchronous trainers")
    args = parser.parse_args(argv)
    presets = FULL if args.full else QUICK
    task = args.task or next(iter(presets))
    if task not in presets:
        parser.error(f"--task {task!r}: choose one of {', '.join(presets)}")
    from asyncsgd.devices import request_cpu_devices
    request_cpu_devices(args.devices)
    preset = dict(presets[task])
    if args.out == "results/paper_models":
        args.out = f"results/paper_models/{task}"
    base = TrainConfig(**preset, data_dir=args.data_dir, progress=False, momentum=0.9, window="device",
                       stop_at_target=False)  # time to the target, and the final accuracy after all epochs
    arms = [Arm("sync", TrainConfig(**{**base.to_dict(), "trainer": "sync"}), {"devices": 1})]
    for trainer in ("pdasgd", "lapsgd", "lppsgd"):
        arms.append(Arm(trainer, TrainConfig(**{**base.to_dict(), "trainer": trainer, "devices": args.devices,
                                                 "max_inflight": 1}), {"devices": args.devices}))
    started = time.perf_counter()
    rows = run_arms(arms, args.seeds, args.out)
    finish(args, rows, f"{task}: {base.model} on {base.dataset}, target {100 * base.target_accuracy:.0f}%",
           ["devices"], target=base.target_accuracy, started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
