"""Which JAX devices a run uses, and creating virtual CPU devices before JAX starts.

On a CPU host `--devices N` needs N CPU devices. XLA creates them when its backend starts, so the
CLI calls `request_cpu_devices` before any JAX computation; a library user (a notebook, a test) sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` or calls `request_cpu_devices` right after
`import jax`. The virtual devices share the machine's cores: they show scheduling, staleness and
straggler behaviour, not extra FLOPs (DESIGN.md).

The first device is the *home* device: the shared store's parameters live there, and the devices'
own copies are refreshed from it (see `asyncsgd.trainers.placement`).
"""

from __future__ import annotations

import jax

from asyncsgd.config import ConfigError


def request_cpu_devices(count: int) -> None:
    """Asks for at least `count` CPU devices if JAX's backend has not started yet (else a no-op;
    `run_devices` then says whether there are enough)."""
    if count <= 1:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass  # the backend already runs: whatever it has is checked by `run_devices`


def simulated_devices(count: int) -> list:
    """`count` simulated devices for a simulated clock: all compute on the one default device (each
    keeps its own copies and its own streams in the device model; no real devices are needed)."""
    return [jax.devices()[0]] * count


def local_device_count(config) -> int:
    """JAX devices this process needs for `config`: its `devices`, or one for a Ray run (whose devices
    are its worker actors; the driver only evaluates)."""
    return 1 if getattr(config, "backend", "local") == "ray" else config.devices


def run_devices(count: int) -> list:
    """The first `count` JAX devices; `ConfigError` if there are fewer."""
    available = jax.devices()
    if count > len(available):
        raise ConfigError(f"--devices {count}: only {len(available)} JAX device(s) available; on a CPU, set "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts "
                          "(the asyncsgd command does this itself)")
    return list(available[:count])
