"""Side-by-side throughput of trainers in one process, and per-unit timings.

Every trainer runs on the same synthetic data with the shapes of `--dataset` (images or tokens), with its own freshly
initialised store, after a few untimed warm-up steps. Trainers are timed in interleaved rounds and the
median is reported, because this shared 2-core machine drifts by 10% and more between minutes; ratios
to `sync` are the numbers to quote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asyncsgd import trainers
from asyncsgd.assemble import build_session
from asyncsgd.config import TrainConfig, validate
from asyncsgd.data import synthetic_like
from asyncsgd.errors import ConfigError
from asyncsgd.metrics import current_rss_mb, measure_peak_flops, peak_rss_mb
from asyncsgd.models import conv
from asyncsgd.trainers import EpochPlan


class _Contender:
    """One trainer's compiled session, timed in rounds."""

    def __init__(self, config: TrainConfig, steps: int, warmup_steps: int):
        dataset = _bench_data(config, config.batch_size * max(steps, warmup_steps))
        self.config = config
        self.session, _ = build_session(config, dataset)
        self.run_epoch = trainers.get(config.trainer).run_epoch
        self.next_seq, self.rounds = 0, 0
        self.samples_per_s: list[float] = []
        self.rss_mb: list[float] = []  # resident memory after each timed round: a leak grows it
        self._run(warmup_steps)  # untimed: first dispatches, thread start-up

    def _run(self, steps: int) -> tuple[int, float]:
        recorder, clock = self.session.recorder, self.session.clock
        done_before = recorder.steps
        start = clock.now()  # real seconds, or simulated ones on a simulated clock
        self.run_epoch(self.session, EpochPlan(self.rounds, self.next_seq, steps))
        elapsed = clock.now() - start
        recorder.tick()
        self.next_seq += steps
        self.rounds += 1
        return recorder.steps - done_before, elapsed

    def time_round(self, steps: int) -> None:
        done, elapsed = self._run(steps)
        self.samples_per_s.append(done * self.config.batch_size / elapsed)
        self.rss_mb.append(current_rss_mb())

    def row(self) -> dict:
        session = self.session
        staleness = session.recorder.staleness()
        return {
            "trainer": self.config.trainer,
            "residuals": self.config.residuals if session.units.residual_bytes else "",  # "": keeps none
            "rss_mb_rounds": self.rss_mb,
            "samples_per_s": float(np.median(self.samples_per_s)),
            "samples_per_s_rounds": self.samples_per_s,
            "staleness_mean": max((s["mean"] for s in staleness.values()), default=0.0),
            "staleness_max": max((s["max"] for s in staleness.values()), default=0),
            "residual_mb_per_item": session.units.residual_bytes / 2 ** 20,
            "max_trace_count": session.units.max_trace_count(),
            "conv_threads": session.conv_threads,  # each oneDNN convolution's threads (0: all cores)
        }


def _bench_data(config: TrainConfig, num_train: int):
    return synthetic_like(config.dataset, num_train, config.batch_size, seed=config.seed, max_len=config.max_len,
                          vocab_size=config.vocab_size).normalized()


def unit_timings(config: TrainConfig, repeats: int = 10, session_out: Optional[list] = None) -> list[dict]:
    """Mean seconds of each stage's forward and fused backward+update unit, run in isolation, then
    their sums (one batch's forward and backward through the units) and the whole sync step."""
    dataset = _bench_data(config, config.batch_size)
    session, _ = build_session(config, dataset, unit_groups=("stages", "train_step"))
    if session_out is not None:
        session_out.append(session)
    units, store = session.units, session.store
    x = jnp.asarray(dataset.train_x[: config.batch_size])
    inputs, residuals = [], []
    for index in range(len(store)):
        inputs.append(x)
        slot = store.read(index)
        x, res, _ = units.forward[index](slot.params, slot.state, x)
        residuals.append(res)
    _, dy = units.loss_grad(x, jnp.asarray(dataset.train_y[: config.batch_size]))
    douts = [None] * len(store)
    for index in reversed(range(len(store))):
        douts[index] = dy
        slot = store.read(index)
        _, _, dy = units.backward_update[index](slot.params, slot.opt_state, residuals[index], dy, 0, slot.params)

    def timed(fn) -> float:
        jax.block_until_ready(fn())
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        jax.block_until_ready(out)  # blocks: timing the device
        return (time.perf_counter() - start) / repeats

    rows = []
    for index, name in enumerate(session.model.stage_names):
        slot = store.read(index)
        rows.append({
            "stage": name,
            "forward_s": timed(lambda: units.forward[index](slot.params, slot.state, inputs[index])),
            "backward_update_s": timed(lambda: units.backward_update[index](
                slot.params, slot.opt_state, residuals[index], douts[index], 0, slot.params)),
            "forward_flops": units.unit_flops(f"forward/{name}"),
            "backward_update_flops": units.unit_flops(f"backward_update/{name}"),
        })
    rows.append({"stage": "(all stages)", "forward_s": sum(r["forward_s"] for r in rows),
                 "backward_update_s": sum(r["backward_update_s"] for r in rows),
                 "forward_flops": sum(r["forward_flops"] for r in rows),
                 "backward_update_flops": sum(r["backward_update_flops"] for r in rows)})
    params, opts, states = store.params(), store.opt_states(), store.states()
    xb = jnp.asarray(dataset.train_x[: config.batch_size])
    yb = jnp.asarray(dataset.train_y[: config.batch_size])
    rows.append({"stage": "(whole step, sync)", "forward_s": float("nan"),
                 "backward_update_s": timed(lambda: units.train_step(params, opts, states, xb, yb)),
                 "forward_flops": float("nan"), "backward_update_flops": units.step_flops(
                     params, opts, states, config.batch_size)})
    return rows


def add_unit_mfu(rows: list[dict], peak_flops: float) -> None:
    """Each unit's achieved FLOP/s and its fraction of this machine's matmul peak (`*_mfu`), in place."""
    for row in rows:
        for kind in ("forward", "backward_update"):
            seconds, flops = row[f"{kind}_s"], row[f"{kind}_flops"]
            rate = flops / seconds if seconds > 0 and flops == flops else float("nan")
            row[f"{kind}_flops_per_s"], row[f"{kind}_mfu"] = rate, rate / peak_flops


def _contender_configs(base: TrainConfig, names: Sequence[str], memory: bool) -> list[TrainConfig]:
    """One config per trainer; with `memory`, trainers that keep residuals once per residual mode."""
    configs = []
    for name in names:
        config = dataclasses.replace(base, trainer=name, progress=False)
        validate(config)
        modes = ("stash", "recompute") if memory and "stages" in trainers.get(name).units(config, 1)[0] else ()
        configs += [dataclasses.replace(config, residuals=mode) for mode in modes] or [config]
    return configs


def bench(base: TrainConfig, names: Sequence[str], steps: int, out: Optional[str] = None,
          with_units: bool = False, rounds: int = 3, peer: Optional[str] = None, memory: bool = False) -> dict:
    """Benchmarks `trainers` side by side and returns rows with ratios to `sync` and MFU.

    Every trainer is compiled first; then `rounds` rounds each time `steps` steps of every trainer in
    turn, so slow drifts of a shared machine hit all trainers alike. Reported: the median per trainer.

    Args:
      peer: "torch": the same model trained synchronously in PyTorch joins the rounds
        (`asyncsgd.peer`); every row gets its ratio to it.
      memory: trainers that keep residuals run once per residual mode (stash, recompute); every row
        reports resident memory after each round, and its growth from the first round to the last.
    """
    if steps < 1 or rounds < 1:
        raise ConfigError(f"--steps and --rounds must be >= 1, got {steps} and {rounds}")
    configs = _contender_configs(base, names, memory)
    peer_class = None
    if peer is not None:
        from asyncsgd.peer import make_peer
        peer_class = make_peer(peer, base.model)
    peak = measure_peak_flops()
    contenders = [_Contender(config, steps, warmup_steps=3) for config in configs]
    if peer_class is not None:
        model = contenders[0].session.model
        contenders.append(peer_class(base.model, model.input_shape, model.num_classes, base.batch_size, base.lr,
                                     base.momentum, seed=base.seed))
    for _ in range(rounds):
        for contender in contenders:
            contender.time_round(steps)
    rows = [c.row() for c in contenders]
    for row in rows:
        row["rss_growth_mb"] = row["rss_mb_rounds"][-1] - row["rss_mb_rounds"][0] if row["rss_mb_rounds"] else 0.0
    # One FLOP count per model and batch, the same for every trainer (DESIGN.md).
    store = contenders[0].session.store
    flops = contenders[0].session.units.step_flops(store.params(), store.opt_states(), store.states(),
                                                   base.batch_size)
    for row in rows:
        row["flops_per_step"] = flops
        row["mfu"] = flops * row["samples_per_s"] / base.batch_size / peak
    reference = next((r["samples_per_s"] for r in rows if r["trainer"] == "sync"), None)
    peer_speed = next((r["samples_per_s"] for r in rows if "peer" in r), None)
    for row in rows:
        row["ratio_to_sync"] = row["samples_per_s"] / reference if reference else float("nan")
        if peer_speed:
            row["ratio_to_peer"] = row["samples_per_s"] / peer_speed
    result = {"model": base.model, "dataset_shape": base.dataset, "batch_size": base.batch_size,
              "flops_per_example": flops / base.batch_size,
              "stages": len(contenders[0].session.model.stages), "steps": steps, "rounds": rounds,
              "peak_flops": peak, "residuals": base.residuals, "peak_rss_mb": peak_rss_mb(), "rows": rows,
              "config": dataclasses.asdict(base),
              # how each convolution was computed (asyncsgd/models/conv.py): "onednn", or XLA's with the
              # weight gradient over the "whole batch" or in "chunks of K"; by
              # (batch, height, width, in channels, out channels, kernel h, kernel w, stride h, stride w),
              # at the benched batch size
              "convolutions": conv.describe_choices(base.batch_size)}
    if peer_speed:
        result["peer"] = next(r["peer"] for r in rows if "peer" in r)
    if with_units:
        result["units"] = unit_timings(base)
        add_unit_mfu(result["units"], peak)
    if out:
        _write(out, "bench", result, format_bench(result))
    return result


def _write(out: str, stem: str, result: dict, table: str) -> None:
    """`out/<stem>.json` (the result) and `out/<stem>.md` (its table)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")


NATURAL_DATASET = {"mlp": "fashion_mnist", "cnn": "fashion_mnist", "resnet18": "cifar10", "resnet34": "cifar10",
                   "resnet50": "cifar10", "lstm": "imdb"}


def model_table(base: TrainConfig, models: Sequence[str], repeats: int = 3, out: Optional[str] = None) -> dict:
    """Per model, on synthetic data shaped like its paper dataset: stages, parameters, FLOPs per
    example (XLA's count of one training step / batch), and the time of one batch's forward and
    backward+update through the per-stage units, and of the whole synchronous step."""
    rows = []
    for name in models:
        config = dataclasses.replace(base, model=name, dataset=NATURAL_DATASET[name], trainer="sync", progress=False)
        validate(config)
        sessions: list = []
        units = unit_timings(config, repeats=repeats, session_out=sessions)
        session = sessions[0]
        store = session.store
        flops = session.units.step_flops(store.params(), store.opt_states(), store.states(), config.batch_size)
        total = next(u for u in units if u["stage"] == "(all stages)")
        step = next(u for u in units if u["stage"] == "(whole step, sync)")
        rows.append({"model": name, "dataset_shape": config.dataset, "input_shape": list(session.model.input_shape),
                     "stages": len(session.model.stages),
                     "params": int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(store.params()))),
                     "flops_per_example": flops / config.batch_size,
                     "forward_s": total["forward_s"], "backward_update_s": total["backward_update_s"],
                     "sync_step_s": step["backward_update_s"],
                     "residual_mb_per_item": session.units.residual_bytes / 2 ** 20,
                     "compile_s": session.units.compile_time_s, "units": units})
    result = {"batch_size": base.batch_size, "repeats": repeats, "norm": base.norm, "rows": rows,
              "peak_rss_mb": peak_rss_mb()}
    if out:
        _write(out, "models", result, format_model_table(result))
    return result


def format_model_table(result: dict) -> str:
    lines = [f"batch {result['batch_size']}, mean of {result['repeats']} calls per unit, ResNet norm "
             f"{result['norm']}; times are one batch through the per-stage units (forward; backward with "
             "the fused update) and the whole-model sync step", "",
             "| model | input (like) | stages | params (M) | MFLOP/example | forward ms | backward+update ms "
             "| sync step ms | residual MB/item |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} ({r['dataset_shape']}) | {r['stages']} | "
                     f"{r['params'] / 1e6:.2f} | {r['flops_per_example'] / 1e6:.1f} | {1e3 * r['forward_s']:.1f} | "
                     f"{1e3 * r['backward_update_s']:.1f} | {1e3 * r['sync_step_s']:.1f} | "
                     f"{r['residual_mb_per_item']:.1f} |")
    if any(r["model"] == "lstm" for r in result["rows"]):
        lines += ["", "lstm: XLA's cost analysis counts the body of the recurrent loop once, so its MFLOP/example "
                      "is understated by about the sequence length (and so is its MFU)."]
    return "\n".join(lines)


def format_bench(result: dict) -> str:
    """The bench result as a markdown table."""
    lines = [f"model {result['model']} ({result['stages']} stages, shapes of {result['dataset_shape']}, "
             f"{result['flops_per_example'] / 1e6:.1f} MFLOP per example per training step), "
             f"batch {result['batch_size']}, median of {result['rounds']} rounds of "
             f"{result['steps']} steps per trainer, "
             f"residuals {result['residuals']}, peak {result['peak_flops'] / 1e9:.0f} GFLOP/s (matmul)",
             "",
             "| trainer | residuals | conv threads | samples/s | ratio to sync | ratio to peer | MFU "
             "| staleness mean/max | residual MB/item | RSS MB (growth) | rounds (samples/s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    convolutions = bool(result.get("convolutions"))
    for r in result["rows"]:
        to_peer = f"{r['ratio_to_peer']:.2f}x" if "ratio_to_peer" in r else ""
        rss = f"{r['rss_mb_rounds'][-1]:.0f} ({r['rss_growth_mb']:+.0f})" if r["rss_mb_rounds"] else ""
        threads = r.get("conv_threads")
        threads = "" if threads is None or not convolutions else (str(threads) if threads else "all")
        lines.append(f"| {r['trainer']} | {r['residuals']} | {threads} | {r['samples_per_s']:.0f} | "
                     f"{r['ratio_to_sync']:.2f}x | "
                     f"{to_peer} | {100 * r['mfu']:.1f}% | {r['staleness_mean']:.2f}/{r['staleness_max']} | "
                     f"{r['residual_mb_per_item']:.1f} | {rss} | "
                     f"{' '.join(f'{v:.0f}' for v in r['samples_per_s_rounds'])} |")
    if "peer" in result:
        peer = result["peer"]
        lines += ["", f"peer: {peer['framework']} {peer['version']}, eager, {peer['layout']}, "
                      f"{peer['threads']} threads, SGD with the same lr and momentum, same batch shape"]
    if "units" in result:
        lines += ["", "| stage | forward ms | forward GFLOP/s (MFU) | backward+update ms | backward+update GFLOP/s (MFU) |",
                  "|---|---:|---:|---:|---:|"]
        for u in result["units"]:
            cells = []
            for kind in ("forward", "backward_update"):
                seconds, rate = u[f"{kind}_s"], u.get(f"{kind}_flops_per_s", float("nan"))
                cells.append("" if seconds != seconds else f"{1e3 * seconds:.2f}")
                cells.append("" if rate != rate else f"{rate / 1e9:.0f} ({100 * u[f'{kind}_mfu']:.0f}%)")
            lines.append(f"| {u['stage']} | " + " | ".join(cells) + " |")
        lines.append(f"MFU: XLA's FLOP count of the unit / its time / the matmul peak "
                     f"({result['peak_flops'] / 1e9:.0f} GFLOP/s)")
    if result.get("convolutions"):
        lines += ["", "convolutions (batch x H x W x C_in x C_out x kernel x stride: onednn, or XLA's with the weight "
                  "gradient over the whole batch or in chunks): " + "; ".join(
            f"{key} {form}" for key, form in result["convolutions"].items())]
    return "\n".join(lines)


# -- device profiles for the simulated clock ---------------------------------------------------------
def _link_bandwidth(nbytes: int = 64 * 2 ** 20, repeats: int = 5) -> float:
    """Bytes per second of copying a host array onto the default device (best of `repeats`): the link
    of this machine's (virtual) devices, which share its memory."""
    data = np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.device_put(data).block_until_ready()  # blocks: timing the copy
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_profile(config: TrainConfig, path: Optional[str] = None, repeats: int = 10):
    """Times every unit of `config.model` at `config.batch_size` on this machine (each alone, on zeros
    of its real shapes) and returns a profile whose `units` map holds those seconds (the simulated
    clock then uses them instead of the FLOP formula); written to `path` as JSON when given."""
    from asyncsgd.sim import Profile
    from asyncsgd.sim.costs import profile_key
    from asyncsgd.units import UNIT_GROUPS
    config = dataclasses.replace(config, clock="wall", profile=None, sim_tie_seed=None, devices=1, trainer="sync")
    validate(config)
    dataset = _bench_data(config, config.batch_size)
    session, _ = build_session(config, dataset, unit_groups=UNIT_GROUPS)
    units = session.units
    seconds = {}
    for name, signature in sorted(units.signatures.items()):
        args = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), signature)
        fn = units.jitted[name]
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)  # blocks: timing the device
        seconds[profile_key(name)] = (time.perf_counter() - start) / repeats
    profile = Profile(name=f"measured-{config.model}-b{config.batch_size}", peak_flops=measure_peak_flops(),
                      efficiency=1.0, launch_s=0.0, bandwidth_bytes_per_s=_link_bandwidth(), latency_s=0.0,
                      units=seconds, note=f"measured on this machine by asyncsgd profile: {config.model}, batch "
                      f"{config.batch_size}, {repeats} calls per unit, jax {jax.__version__}")
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(profile.to_json(), handle, indent=2)
    return profile


def validate_profile(config: TrainConfig, profile: str, names: Sequence[str], steps: int = 20,
                     rounds: int = 3) -> dict:
    """Each trainer of `names` on the wall clock and on the simulated clock with `profile`, side by side
    in interleaved rounds: measured and predicted samples/s, their error and the two rankings."""
    base = dataclasses.replace(config, devices=1, progress=False, out=None)
    pairs = []
    for name in names:
        wall = dataclasses.replace(base, trainer=name, clock="wall", profile=None)
        sim = dataclasses.replace(base, trainer=name, clock="simulated", profile=profile)
        validate(wall), validate(sim)
        pairs.append((_Contender(wall, steps, warmup_steps=3), _Contender(sim, steps, warmup_steps=3)))
    for _ in range(rounds):
        for measured, predicted in pairs:
            measured.time_round(steps)
            predicted.time_round(steps)
    rows = []
    for name, (measured, predicted) in zip(names, pairs):
        real, model = float(np.median(measured.samples_per_s)), float(np.median(predicted.samples_per_s))
        rows.append({"trainer": name, "measured_samples_per_s": real, "predicted_samples_per_s": model,
                     "error": model / real - 1.0, "measured_rounds": measured.samples_per_s})
    def rank(key: str) -> str:
        """Trainers from fastest to slowest; within 0.5% of each other they tie (`a = b`)."""
        ordered = sorted(rows, key=lambda r: -r[key])
        text = ordered[0]["trainer"]
        for before, row in zip(ordered, ordered[1:]):
            text += (" = " if row[key] >= 0.995 * before[key] else " > ") + row["trainer"]
        return text

    return {"model": config.model, "batch_size": config.batch_size, "profile": profile, "steps": steps,
            "rounds": rounds, "rows": rows, "measured_ranking": rank("measured_samples_per_s"),
            "predicted_ranking": rank("predicted_samples_per_s")}


def format_validation(result: dict) -> str:
    lines = [f"{result['model']}, batch {result['batch_size']}, profile {result['profile']}: median of "
             f"{result['rounds']} interleaved rounds of {result['steps']} steps", "",
             "| trainer | measured samples/s | predicted (simulated) samples/s | error |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['trainer']} | {r['measured_samples_per_s']:.0f} | {r['predicted_samples_per_s']:.0f} | "
                     f"{100 * r['error']:+.1f}% |")
    lines += ["", f"ranking measured: {result['measured_ranking']}; predicted: {result['predicted_ranking']} "
                  "(a = b: within 0.5%)"]
    return "\n".join(lines)
