"""Staleness against depth and against thread counts, and the measured gradient bias against the
paper's bound.

Claims (PAPER.md): (1) in PD-ASGD the layers near the output are updated almost fresh and staleness
grows with distance from the output and with the number of backward threads; (2) the bias of an
asynchronous gradient is bounded, ||b|| <= G a eta tau / (1 - a eta tau) (tau: staleness, eta: the
learning rate, G: a gradient-norm bound, a: the gradient's Lipschitz constant).

Command:  python experiments/staleness.py --quick     (this CPU: the residual CNN on 2560 Fashion-MNIST
                                                       images; the bias on the MLP)
          python experiments/staleness.py --full      (ResNet-18 on CIFAR-10; a GPU)
Hardware: --quick the 2-core CPU, about 5 minutes; --full a GPU.
Expected: mean staleness falls from the first stage to the head and rises with backward threads; the
measured bias grows with tau and stays below the bound wherever the bound is finite (a eta tau < 1).
Found here: at lr 0.05 the estimated a is about 2 / lr (the edge of stability), so a eta >= 1 and the
bound is vacuous for every tau; at lr 0.005 and 0.001 it is finite for small tau and holds. Our --quick numbers are in experiments/README.md.

The bias is measured on plain SGD (momentum 0, as the bound assumes): parameters theta_t of a
synchronous run are kept for the last steps; for each tau, b = g(theta_{t-tau}; B_t) - g(theta_t; B_t)
on the same batch B_t (the gradient an update of staleness tau applies, minus the fresh one). G is
the largest fresh gradient norm seen, a the largest ||g(theta) - g(theta')|| / ||theta - theta'|| over
the same pairs.
"""

import json
import os
import sys
import time

import numpy as np

from asyncsgd.config import TrainConfig
from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms

QUICK = dict(model="cnn", dataset="fashion_mnist", epochs=1, batch_size=64, lr=0.05, train_subset=2560,
             warmup_steps=10)
FULL = dict(model="resnet18", dataset="cifar10", epochs=5, batch_size=128, lr=0.1, warmup_steps=400)
BACKWARD_THREADS = (1, 2, 4)
TAUS = (1, 2, 4, 8, 16)
# At 0.05 the MLP trains at the edge of stability (a ~ 2 / lr, so a eta tau >= 1 and the bound says
# nothing); the smaller rates are where the bound is finite and can be checked.
BIAS_LRS = (0.05, 0.005, 0.001)


def per_stage(lines) -> str:
    stages = list(lines[-1].get("stage_staleness", {}))
    out = ["Mean staleness per stage (input side first):", "",
           "| arm | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for line in lines:
        values = line.get("stage_staleness", {})
        out.append(f"| {line['label']} | " + " | ".join(f"{values.get(s, 0):.2f}" for s in stages) + " |")
    return "\n".join(out)


def gradient_bias(data_dir, steps: int = 120, keep: int = 48, lr: float = 0.05) -> dict:
    """The measured bias of stale gradients and the paper's bound (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from asyncsgd.data import iterate_batches
    from asyncsgd.assemble import build_session, prepare_dataset
    config = TrainConfig(trainer="sync", model="mlp", dataset="fashion_mnist", batch_size=128, lr=lr, momentum=0.0,
                         data_dir=data_dir, progress=False)
    dataset = prepare_dataset(config)
    session, _ = build_session(config, dataset,
                               unit_groups=("train_step", "model_grad"))
    units = session.units
    params, opts, states = session.store.params(), session.store.opt_states(), session.store.states()
    history, batches = [], []
    flat = lambda tree: jnp.concatenate([leaf.ravel() for leaf in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    for index, (_, x, y) in enumerate(iterate_batches(dataset, config.batch_size, 0, 0, 0, max_batches=steps)):
        x, y = jnp.asarray(x), jnp.asarray(y)
        if index >= steps - keep:  # keep theta_t and B_t of the last `keep` steps
            history.append(params)
            batches.append((x, y))
        params, opts, states, _ = units.train_step(params, opts, states, x, y)
    fresh_norms, pairs = [], {tau: [] for tau in TAUS}
    smooth = 0.0
    for t in range(max(TAUS), len(history)):
        x, y = batches[t]
        g_now = flat(units.model_grad(history[t], states, x, y)[0])
        fresh_norms.append(float(jnp.linalg.norm(g_now)))
        for tau in TAUS:
            g_old = flat(units.model_grad(history[t - tau], states, x, y)[0])
            bias = float(jnp.linalg.norm(g_old - g_now))
            dist = float(jnp.linalg.norm(flat(history[t]) - flat(history[t - tau])))
            pairs[tau].append(bias)
            smooth = max(smooth, bias / dist if dist > 0 else 0.0)
    big_g = max(fresh_norms)
    rows = []
    for tau in TAUS:
        x = smooth * lr * tau
        bound = big_g * x / (1 - x) if x < 1 else None
        rows.append({"tau": tau, "bias_mean": float(np.mean(pairs[tau])), "bias_max": float(np.max(pairs[tau])),
                     "a_eta_tau": x, "bound": bound})
    return {"G": big_g, "a": smooth, "lr": lr, "rows": rows}


def bias_table(result: dict) -> str:
    out = [f"Gradient bias of stale gradients (MLP, plain SGD, lr {result['lr']}; G = {result['G']:.3f}, "
           f"a = {result['a']:.3f}):", "",
           "| tau | measured mean ||b|| | measured max ||b|| | a eta tau | paper's bound |", "|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        bound = f"{r['bound']:.4f}" if r["bound"] is not None else "none (a eta tau >= 1)"
        out.append(f"| {r['tau']} | {r['bias_mean']:.4f} | {r['bias_max']:.4f} | {r['a_eta_tau']:.3f} | {bound} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = experiment_parser(__doc__, "staleness").parse_args(argv)
    preset = FULL if args.full else QUICK
    base = TrainConfig(**preset, data_dir=args.data_dir, progress=False, momentum=0.9, trainer="pdasgd")
    arms = [Arm("sync", TrainConfig(**{**base.to_dict(), "trainer": "sync"}), {"threads": "-"})]
    arms += [Arm(f"pdasgd 1:{b}", TrainConfig(**{**base.to_dict(), "backward_threads": b}), {"threads": f"1:{b}"})
             for b in BACKWARD_THREADS]
    started = time.perf_counter()
    rows = run_arms(arms, args.seeds, args.out)
    for row in rows:
        row["stage_staleness"] = {name: s["mean"] for name, s in row["staleness"].items()}
    biases = [gradient_bias(args.data_dir, lr=lr) for lr in BIAS_LRS]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gradient_bias.json"), "w", encoding="utf-8") as handle:
        json.dump(biases, handle, indent=2)

    def extra(lines):
        for line in lines:
            runs = [r for r in rows if r["label"] == line["label"]]
            line["stage_staleness"] = {k: float(np.mean([r["stage_staleness"][k] for r in runs]))
                                       for k in runs[0]["stage_staleness"]}
        return per_stage(lines) + "\n\n" + "\n\n".join(bias_table(bias) for bias in biases)
    finish(args, rows, f"staleness: {base.model} on {base.dataset}", ["threads"], started=started, extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
