"""Scaling past one device and one host.

One host, several devices: the config axis of every stacked array is sharded over a 1-D `Mesh`
of the devices (`NamedSharding(mesh, P("configs"))`), so the same compiled, vmapped chunk runs each
device's share of configs; chunks hold a multiple of the device count. On CPU, `import mist` makes
one XLA device per usable core (see `mist._cpu_devices`; MIST_CPU_DEVICES=N to choose), so a sweep
uses every core: XLA runs one CPU device's kernels on one core.

Several hosts: start every host with the same sweep and call `jax.distributed.initialize()`
(arguments from the environment or the cluster's launcher) before anything else touches JAX. Each
host then takes `host_shard(n, jax.process_index(), jax.process_count())` of the configs, runs them
on its local devices as above, and writes `part-<process_index>.parquet`; `merge_parts(out_dir)`
joins the parts into one table (on any host, once all are written). Hosts never exchange arrays:
configs are independent, so there is nothing to all-gather but the result files.

    mist sweep SWEEP.yaml --out DIR --distributed     # on every host (e.g. one per SLURM task)
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "configs"


def config_sharding(devices=None) -> NamedSharding | None:
    """Sharding of the leading (config) axis over `devices` (default: this host's devices);
    None for a single device, where placement is left to JAX."""
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) <= 1:
        return None
    return NamedSharding(Mesh(np.array(devices), (AXIS,)), P(AXIS))


def num_shards(sharding: NamedSharding | None) -> int:
    return 1 if sharding is None else int(sharding.mesh.devices.size)


def place(tree, sharding: NamedSharding | None):
    """Put a stacked (leading config axis) PyTree on the devices, split along the config axis."""
    if sharding is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    return jax.device_put(tree, sharding)


def host_shard(n: int, process_index: int, process_count: int) -> np.ndarray:
    """Config positions host `process_index` of `process_count` runs: contiguous, balanced blocks
    (sizes differ by at most one) that together cover 0..n-1 exactly once."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    bounds = np.linspace(0, n, process_count + 1).round().astype(int)
    return np.arange(bounds[process_index], bounds[process_index + 1])


def initialize_distributed(**kwargs) -> tuple[int, int]:
    """`jax.distributed.initialize(**kwargs)` (a no-op when already initialised); returns
    (process_index, process_count)."""
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:  # already initialised
        if "already" not in str(e).lower():
            raise
    return jax.process_index(), jax.process_count()


def part_path(out_dir: str | Path, process_index: int) -> Path:
    return Path(out_dir) / f"part-{process_index:05d}.parquet"


def merge_parts(out_dir: str | Path, expected: int | None = None):
    """Join the per-host result files of a distributed sweep into one DataFrame, by config index."""
    import pandas as pd

    parts = sorted(Path(out_dir).glob("part-*.parquet"))
    if expected is not None and len(parts) != expected:
        raise FileNotFoundError(f"{out_dir}: {len(parts)} of {expected} host result files present")
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no part-*.parquet files")
    return pd.concat([pd.read_parquet(p) for p in parts]).sort_values("config").reset_index(drop=True)


__all__ = ["config_sharding", "num_shards", "place", "host_shard", "initialize_distributed", "part_path",
           "merge_parts"]
