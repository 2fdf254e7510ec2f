"""Run a lowered sweep through one compiled, vmapped (and, on several devices, sharded) program,
chunk by chunk, each chunk sized to fit memory.

Every chunk has the same number of configs (the last is padded with copies of its first config,
whose results are dropped), so a whole sweep compiles exactly once per set of capacities. A config
whose simulation stops making progress, or runs past the step limit, is reported as stuck instead
of stopping the sweep.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..engine.run import compiler_options, default_chunk, run_chunk_batched, tables
from ..engine.state import init_state
from ..engine.tables import EngineDims
from .lowering import LoweredSweep, bytes_per_config
from .sharding import config_sharding, num_shards, place


@dataclass
class RunInfo:
    """Timing of a sweep run: compile once, then chunks of configs (seconds)."""

    compile_s: float = 0.0
    run_s: float = 0.0
    configs_per_chunk: int = 0
    chunks: int = 0
    steps: int = 0  # scan steps, summed over chunks (each chunk runs until its slowest config ends)
    devices: int = 1
    configs: int = 0
    bytes_per_config: int = 0
    per_chunk_s: list = field(default_factory=list)


@dataclass
class ChunkResult:
    rows: list[int]  # positions in LoweredSweep.feasible
    state: object  # host (numpy) EngineState with a leading config axis (len(rows) used rows first)
    steps: np.ndarray  # scan steps per config
    stuck: list[str]  # "" or why the config did not finish


_COMPILED: dict = {}


def _memory_budget(memory_gb: float | None) -> int:
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(0.5 * stats["bytes_limit"])
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 * 2**30
    return int(min(0.25 * avail, 4 * 2**30))


def chunk_size(dims: EngineDims, n_configs: int, *, configs_per_chunk: int | None = None,
               memory_gb: float | None = None, shards: int = 1, ls: LoweredSweep | None = None) -> int:
    """Configs per compiled chunk: what fits the memory budget (or the given number), never more
    than the sweep needs, and a multiple of the number of devices the chunk is sharded over."""
    if configs_per_chunk is None:
        per = bytes_per_config(dims, ls)
        configs_per_chunk = max(1, _memory_budget(memory_gb) // (per * shards)) * shards
        configs_per_chunk = min(configs_per_chunk, max(n_configs, 1))
    return int(-(-configs_per_chunk // shards) * shards)


def _programs(dims: EngineDims, length: int, sharding):
    key = (dims, length, None if sharding is None else (tuple(d.id for d in sharding.mesh.devices.flat)))
    if key not in _COMPILED:
        kw = {} if sharding is None else dict(in_shardings=sharding, out_shardings=sharding)
        run = jax.jit(partial(run_chunk_batched, dims, length), **kw)
        init = jax.jit(jax.vmap(lambda k: init_state(dims, k)), **kw)
        tabs = jax.jit(partial(tables.__wrapped__, dims, True), **kw)
        _COMPILED[key] = {"run": run, "init": init, "tables": tabs, "compiled": {}}
    return _COMPILED[key]


def config_keys(seed: int, plan_indices) -> np.ndarray:
    """One PRNG key per config from its plan index, so results do not depend on chunking."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(plan_indices, jnp.int32)))


def run_chunks(ls: LoweredSweep, *, seed: int = 0, configs_per_chunk: int | None = None,
               memory_gb: float | None = None, devices=None, progress: bool = True, length: int | None = None,
               info: RunInfo | None = None, rows: list[int] | None = None) -> Iterator[ChunkResult]:
    """Simulate feasible configs (`rows`: positions in `ls.feasible`, default all), yielding one
    `ChunkResult` per compiled chunk; `info` accumulates timings."""
    info = info if info is not None else RunInfo()
    rows = list(range(len(ls.feasible))) if rows is None else list(rows)
    if not rows:
        return
    dims = ls.dims
    sharding = config_sharding(devices)
    shards = num_shards(sharding)
    B = chunk_size(dims, len(rows), configs_per_chunk=configs_per_chunk, memory_gb=memory_gb, shards=shards, ls=ls)
    length = length or default_chunk(dims)
    prog = _programs(dims, length, sharding)
    info.configs_per_chunk, info.devices = B, shards
    info.bytes_per_config = bytes_per_config(dims, ls)
    max_steps = 64 * (dims.num_requests + 16) * dims.stages
    starts = list(range(0, len(rows), B))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), unit="config", desc=f"sweep ({B}/chunk)", leave=False)
    for s in starts:
        part = rows[s:s + B]
        padded = part + [part[0]] * (B - len(part))
        cl, topo, wl = ls.stack(padded)
        keys = config_keys(seed, [ls.feasible[r] for r in padded])
        n_valid = wl.valid.sum(axis=1).astype(np.int32)
        cl, topo, wl, n_valid_d, keys_d = place((cl, topo, wl, n_valid, keys), sharding)
        t0 = time.perf_counter()
        st = prog["init"](keys_d)
        tabs = prog["tables"](cl)  # cost tables, once per chunk of configs
        if B not in prog["compiled"]:
            prog["compiled"][B] = prog["run"].lower(cl, topo, wl, n_valid_d, st, tabs).compile(
                compiler_options=compiler_options())
            info.compile_s += time.perf_counter() - t0
            t0 = time.perf_counter()
        fn = prog["compiled"][B]
        prev = np.full(B, -1)
        stuck = np.zeros(B, bool)
        while True:
            st = fn(cl, topo, wl, n_valid_d, st, tabs)
            done = np.asarray(st.completed) >= n_valid
            steps = np.asarray(st.steps)
            stuck |= ~done & (steps == prev)
            if np.all(done | stuck) or steps.max() > max_steps:
                break
            prev = steps
        host = jax.tree.map(np.asarray, jax.device_get(st))
        dt = time.perf_counter() - t0
        info.run_s += dt
        info.per_chunk_s.append(dt)
        info.chunks += 1
        info.steps += int(steps.max())
        info.configs += len(part)
        why = []
        for i in range(len(part)):
            if done[i]:
                why.append("")
            elif stuck[i]:
                why.append(f"stuck: {int(n_valid[i] - host.completed[i])} requests can neither be served nor "
                           "rejected (a stage without a usable client, or a static batch that never fills)")
            else:
                why.append(f"unfinished after {int(steps[i])} scan steps")
        if bar is not None:
            bar.update(len(part))
        yield ChunkResult(rows=part, state=host, steps=steps[: len(part)], stuck=why)
    if bar is not None:
        bar.close()


__all__ = ["RunInfo", "ChunkResult", "run_chunks", "chunk_size", "config_keys"]
