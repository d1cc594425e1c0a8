"""The Ray backend (`--backend ray`): the same trainer across processes and machines.

What runs where:
  stage servers (`servers.py`): Ray actors, each holding the versioned parameters and optimiser state
    of a contiguous group of stages (split by size) and that group's compiled `update` units. A pushed
    gradient is applied under the local store's commit rule: staleness = the stage's version now minus
    the version the gradient's forward pass read; one update per push, in arrival order (an actor runs
    one call at a time), never retried (`max_task_retries=0`), so never applied twice. With a dc
    correction a server keeps the parameters it served for each stage's newest versions (what a
    pushed gradient was taken at: `StageServer.pull`), so the workers send nothing more.
  worker actors (`worker.py`): one per `--devices`, each its own process with its own JAX, compiled
    forward/backward units and the trainer's own threads (`asyncsgd.trainers`, unchanged), reading its
    own share of the batches from the dataset files. Its view of the model (`RemoteView`) pulls a stage
    only when the stage's version moved and pushes each gradient without waiting for it to be applied.
    A copies trainer's worker (`lapsgd`, `lppsgd`: `TrainerSpec.copies`) trains its own copy instead
    and trades its snapshot for the servers' average of every worker's latest snapshot when averaging
    is due (`StageServer.average`).
  the driver (`backend.py`, in the `asyncsgd train` process): the epoch loop, evaluation, checkpoints,
    metrics.jsonl / updates.csv / summary.json, exactly as for a local run (`asyncsgd.run.train`), plus
    `workers.json`. It hands each worker its batches in chunks; a worker that dies loses only its
    chunk's items in flight, is restarted by Ray and gets the next chunk.

Only the trainers whose spec lists "ray" in `backends` run on Ray: `pdasgd`, the paper's method
(layer-wise pushes); `dasgd` and `hogwild`, whose whole-model updates each server applies to its own
stages; `lapsgd` and `lppsgd`, whose copies the servers average. Ray is imported only when a run asks for it: `check` below needs no Ray.
"""

from __future__ import annotations

from asyncsgd.errors import ConfigError


def check(config) -> None:
    """What `--backend ray` refuses, each with a one-line error (called by `config.validate`)."""
    from asyncsgd import trainers
    able = [name for name, spec in trainers.TRAINERS.items() if "ray" in spec.backends]
    if config.trainer not in able:
        raise ConfigError(f"--backend ray runs --trainer {' or '.join(able)}, not {config.trainer} "
                          f"(use --backend local)")
    if config.clock != "wall":
        raise ConfigError("--backend ray runs on the wall clock; --clock simulated is for --backend local")
    if config.placement != "replicated":
        raise ConfigError("--backend ray places one worker actor per device (--placement replicated)")
    if config.model.startswith("resnet") and config.norm == "batch":
        raise ConfigError("--backend ray keeps no batch-norm statistics yet; use --norm group for a ResNet")
    if config.delay != "none":
        raise ConfigError("--backend ray has real delays (slow hosts and links); --delay is for --backend local")


def require_ray():
    """The `ray` module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError as error:
        raise ConfigError("--backend ray needs Ray: pip install -e '.[ray]'") from error
    return ray


def ray_spec(spec):
    """The trainer spec `spec` run on Ray (its epochs go to the worker actors)."""
    from asyncsgd.cluster.backend import ray_spec as build
    return build(spec)
