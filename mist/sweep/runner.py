"""Run a lowered sweep through one compiled, vmapped (and, on several devices, sharded) program: a
batch of lanes sized to fit memory, each lane simulating one config at a time.

The batch has the same number of lanes whatever the sweep's size, so a whole sweep compiles exactly
once per set of capacities. When a lane's config ends, the lane takes the next waiting config
between two compiled calls (lanes without one idle with no requests), so the batch runs about the
configs' total steps divided by the lanes, not the slowest config's steps once per chunk of
configs. A config whose simulation stops making progress, or runs past the step limit, is reported
as stuck instead of stopping the sweep."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..engine.run import compiler_options, default_chunk, run_chunk_batched, tables
from ..engine.state import init_state
from ..engine.tables import EngineDims
from .lowering import LoweredSweep, bytes_per_config, stack_trees
from .sharding import config_sharding, num_shards, place


@dataclass
class RunInfo:
    """Timing of a sweep run: compile once, then compiled calls of a batch of lanes (seconds)."""

    compile_s: float = 0.0
    run_s: float = 0.0
    configs_per_chunk: int = 0  # lanes of the vmapped batch
    chunks: int = 0  # batches run (one per `run_chunks` call)
    steps: int = 0  # scan steps the batch ran (every lane runs each one, busy or idle), summed over batches
    devices: int = 1
    configs: int = 0
    bytes_per_config: int = 0


@dataclass
class ChunkResult:
    rows: list[int]  # positions in LoweredSweep.feasible
    state: object  # host (numpy) EngineState with a leading config axis, one row per entry of `rows`
    steps: np.ndarray  # scan steps per config
    stuck: list[str]  # "" or why the config did not finish


_COMPILED: dict = {}

# Lane refilling (see `run_chunks`). A batch of B lanes runs about (total steps of its configs) / B
# steps plus a tail (the configs started last), against (slowest config's steps) x (configs / B)
# without refilling. Fewer lanes waste fewer steps in the tail; more lanes share each kernel's fixed
# cost. Measured with experiments/bench_sweep.py's configs on the 2-core CPU: one device, 256 x 1k,
# 1,472 lane-steps per config with 64 lanes against 2,176 with 256 lanes run once (mean steps 1,175);
# two devices (one per core, 2026-12-03), a lane-step costs about the same from 16 lanes per device
# up (24-27 us at 10k requests from 8 to 126 lanes), so the tail decides: 1000 x 10k 292 s with 32
# lanes (about 32 configs per lane, 12,075 lane-steps per config) against 325 s with 126 (about 8,
# 12,918), 1000 x 1k 27.5 s against 26.9 s, 256 x 10k 82 s with 32 lanes against 91 s with 64.
# On a GPU a lane-step costs about the same up to thousands of lanes, so lanes are kept many there.
REFILLS = 8
REFILLS_CPU = 32
MIN_LANES = 32
# scan steps per compiled call (a lane idles from its config's end to the end of the call, half a call
# on average; a call costs one host synchronisation, ~1 ms against ~1 s of a 64-lane call)
REFILL_CALL = 128


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


def on_cpu_devices(devices=None) -> bool:
    """Whether the sweep runs on CPU devices: `devices`, or every local device when None."""
    return all(d.platform == "cpu" for d in (jax.local_devices() if devices is None else devices))


def chunk_size(dims: EngineDims, n_configs: int, *, configs_per_chunk: int | None = None,
               memory_gb: float | None = None, shards: int = 1, ls: LoweredSweep | None = None,
               on_cpu: bool | None = None) -> int:
    """Lanes of the compiled batch: the given number, else what fits the memory budget but no more
    than max(MIN_LANES, the configs / refills), so that a large sweep refills each lane about
    `REFILLS_CPU` times on CPU devices (`on_cpu`, default: the local devices are CPUs) and `REFILLS`
    times elsewhere (see `run_chunks`); never more than the sweep needs, and a multiple of the number
    of devices the batch is sharded over."""
    if configs_per_chunk is None:
        on_cpu = on_cpu_devices() if on_cpu is None else on_cpu
        refills = REFILLS_CPU if on_cpu else REFILLS
        per = bytes_per_config(dims, ls)
        configs_per_chunk = max(1, _memory_budget(memory_gb) // (per * shards)) * shards
        configs_per_chunk = min(configs_per_chunk, max(MIN_LANES, -(-n_configs // refills)), max(n_configs, 1))
    return int(-(-configs_per_chunk // shards) * shards)


def _devices_key(sharding):
    """The devices a compiled program is sharded over, as part of its cache key (None: unsharded)."""
    return None if sharding is None else tuple(d.id for d in sharding.mesh.devices.flat)


def _programs(dims: EngineDims, length: int, sharding):
    key = (dims, length, _devices_key(sharding))
    if key not in _COMPILED:
        kw = {} if sharding is None else dict(in_shardings=sharding, out_shardings=sharding)
        run = jax.jit(partial(run_chunk_batched, dims, length), **kw)
        init = jax.jit(jax.vmap(lambda k: init_state(dims, k)), **kw)
        _COMPILED[key] = {"run": run, "init": init, "compiled": {}}
    return _COMPILED[key]


def _cost_tables(ls: LoweredSweep, rows: list[int], cache: dict):
    """Stacked (numpy) cost tables (`engine.step.cost_tables`) of feasible configs `rows`. They
    depend on the deployment alone, so each is computed once per deployment (`cache`) and a refilled
    lane gets its config's tables with its other inputs: with admissions inside stretches
    (`dims.absorb`) a lane's tables span thousands of token counts, and recomputing every lane's at
    each refill cost more than the simulation."""
    for r in rows:
        d = ls.dep_id[r]
        if d not in cache:
            cache[d] = jax.tree.map(np.asarray, tables(ls.dims, False, ls.clients[d]))
    return stack_trees([cache[ls.dep_id[r]] for r in rows])


def config_keys(seed: int, plan_indices) -> np.ndarray:
    """One PRNG key per config from its plan index, so results do not depend on chunking."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(plan_indices, jnp.int32)))


def _lane_setter(sharding):
    """A compiled in-place update of some lanes (leading-axis rows) of every leaf of a PyTree: rows
    `idx` (out-of-range entries dropped) take `new`'s rows. The lane count is padded to a power of
    four, so a sweep compiles it a handful of times at most."""
    key = ("set_lanes", _devices_key(sharding))
    if key not in _COMPILED:
        kw = {} if sharding is None else dict(out_shardings=sharding)
        _COMPILED[key] = jax.jit(lambda tree, idx, new: jax.tree.map(
            lambda x, y: x.at[idx].set(y.astype(x.dtype), mode="drop"), tree, new), donate_argnums=0, **kw)
    return _COMPILED[key]


def _lane_getter(sharding):
    """A compiled gather of some lanes of every leaf of a PyTree (lane counts padded as in
    `_lane_setter`)."""
    key = ("get_lanes", _devices_key(sharding))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda tree, idx: jax.tree.map(lambda x: x[idx], tree))
    return _COMPILED[key]


def _host_rows(x, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of a leading-axis-sharded array on CPU devices, copied from each device's shard
    (np.asarray of the whole array would first assemble every lane, ~200 MB a call for 250 lanes
    of 10k requests)."""
    shards = x.addressable_shards
    if len(shards) == 1:
        return np.asarray(x)[rows]
    out = np.empty((len(rows),) + x.shape[1:], x.dtype)
    done = np.zeros(len(rows), bool)
    for sh in shards:
        sl = sh.index[0] if sh.index else slice(None)
        lo, hi, _ = sl.indices(x.shape[0])
        m = (rows >= lo) & (rows < hi) & ~done
        if m.any():
            out[m] = np.asarray(sh.data)[rows[m] - lo]
            done |= m
    assert done.all(), "lanes missing from the devices' shards"
    return out


def _pad_lanes(n: int, B: int) -> int:
    """Lanes written (or gathered) at once, padded to a power of four (at most B)."""
    p = 1
    while p < n:
        p *= 4
    return min(p, B)


def run_chunks(ls: LoweredSweep, *, seed: int = 0, configs_per_chunk: int | None = None,
               memory_gb: float | None = None, devices=None, progress: bool = True, length: int | None = None,
               info: RunInfo | None = None, rows: list[int] | None = None) -> Iterator[ChunkResult]:
    """Simulate feasible configs (`rows`: positions in `ls.feasible`, default all) in one compiled,
    vmapped batch of `configs_per_chunk` lanes, yielding a `ChunkResult` for the configs that end
    in each compiled call; `info` accumulates timings.

    When there are more configs than lanes, a lane whose config has ended takes the next waiting
    config between two calls (its tables, workload and a fresh state are written into that lane),
    so the batch runs for about the configs' total steps over the lane count instead of the
    slowest config's steps once per chunk of configs. Results do not depend on the lanes: every
    config runs with its own PRNG key (`config_keys`) and lanes never interact."""
    info = info if info is not None else RunInfo()
    rows = list(range(len(ls.feasible))) if rows is None else list(rows)
    if not rows:
        return
    dims = ls.dims
    sharding = config_sharding(devices)
    shards = num_shards(sharding)
    on_cpu = on_cpu_devices(devices)
    B = chunk_size(dims, len(rows), configs_per_chunk=configs_per_chunk, memory_gb=memory_gb, shards=shards, ls=ls,
                   on_cpu=on_cpu)
    refill = len(rows) > B
    # short calls: a lane idles from its config's end to the end of the call (one length for every
    # sweep of these capacities, refilled or not, so they share one compiled program)
    length = length or min(default_chunk(dims), REFILL_CALL)
    prog = _programs(dims, length, sharding)
    info.configs_per_chunk, info.devices = B, shards
    info.bytes_per_config = bytes_per_config(dims, ls)
    max_steps = 64 * (dims.num_requests + 16) * dims.stages
    # longest first (so the configs started last, which make the batch's tail, are short): by the
    # simulated span of arrivals, which bounds a config's decode iterations, hence its steps
    span = {r: float(np.max(np.where(ls.workloads[ls.wl_id[r]].valid, ls.workloads[ls.wl_id[r]].arrival, 0.0),
                            initial=0.0)) for r in rows}
    pending = sorted(rows, key=lambda r: (span[r], -r))  # popped from the end
    lane = [pending.pop() if pending else -1 for _ in range(B)]  # feasible position per lane, -1: none
    fill = [r if r >= 0 else rows[0] for r in lane]  # idle lanes hold a copy of a config, 0 valid requests
    cl, topo, wl = ls.stack(fill)
    tab_cache: dict = {}
    tabs = _cost_tables(ls, fill, tab_cache)
    key_of = dict(zip(rows, config_keys(seed, [ls.feasible[r] for r in rows])))
    keys = np.stack([key_of[r] for r in fill])
    n_valid = np.where(np.asarray(lane) >= 0, wl.valid.sum(axis=1), 0).astype(np.int32)
    cl, topo, wl, tabs, n_valid_d, keys_d = place((cl, topo, wl, tabs, n_valid, keys), sharding)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), unit="config", desc=f"sweep ({B} lanes)", leave=False)
    t0 = time.perf_counter()
    st = prog["init"](keys_d)
    if B not in prog["compiled"]:
        prog["compiled"][B] = prog["run"].lower(cl, topo, wl, n_valid_d, st, tabs).compile(
            compiler_options=compiler_options())
        info.compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
    fn = prog["compiled"][B]
    # one config's initial state (host), for refilled lanes: every leaf but the key is a constant
    template = jax.tree.map(lambda x: np.array(np.asarray(x)[0]), st) if refill else None
    prev = np.full(B, -1)
    seen_p: set = set()  # lane counts the setter (and getter) have been compiled for
    info.chunks += 1
    st = fn(cl, topo, wl, n_valid_d, st, tabs)
    info.steps += length
    while True:
        result = None
        live = np.asarray(lane) >= 0
        done = np.asarray(st.completed) >= n_valid
        steps = np.asarray(st.steps)
        stuck = live & ~done & (steps == prev)
        over = live & ~done & (steps > max_steps)
        ended = np.flatnonzero(live & (done | stuck | over))
        prev = steps.copy()
        if len(ended):
            if on_cpu:  # host memory already: views of each device's shard, copies of the ended lanes alone
                host = jax.tree.map(lambda x: _host_rows(x, ended), st)
            else:  # only the ended lanes leave the device (the first gather of P lanes compiles)
                P = _pad_lanes(len(ended), B)
                t_get = time.perf_counter()
                got = _lane_getter(sharding)(st, np.concatenate([ended, np.zeros(P - len(ended), ended.dtype)]))
                host = jax.tree.map(lambda x: np.asarray(x)[: len(ended)], jax.device_get(got))
                if ("get", P) not in seen_p:
                    seen_p.add(("get", P))
                    info.compile_s += time.perf_counter() - t_get
                    t0 += time.perf_counter() - t_get
            why = []
            for i in ended:
                if done[i]:
                    why.append("")
                elif stuck[i]:
                    why.append(f"stuck: {int(n_valid[i] - np.asarray(st.completed)[i])} requests can neither be "
                               "served nor rejected (a stage without a usable client, or a static batch that "
                               "never fills)")
                else:
                    why.append(f"unfinished after {int(steps[i])} scan steps")
            info.configs += len(ended)
            if bar is not None:
                bar.update(len(ended))
            result = ChunkResult(rows=[lane[i] for i in ended], state=host, steps=steps[ended], stuck=why)
            nxt = [pending.pop() if pending else -1 for _ in ended]
            for i, r in zip(ended, nxt):
                lane[i] = r
            new = np.asarray([i for i, r in zip(ended, nxt) if r >= 0], np.int32)
            idle = np.asarray([i for i, r in zip(ended, nxt) if r < 0], np.int32)
            if len(idle):  # nothing left for these lanes: no valid requests, every step a no-op
                n_valid = n_valid.copy()
                n_valid[idle] = 0
            if len(new):
                rs = [lane[i] for i in new]
                kn = np.stack([key_of[r] for r in rs])
                fresh = jax.tree.map(lambda x: np.broadcast_to(x, (len(rs),) + x.shape), template)
                fresh = dataclasses.replace(fresh, key=kn)
                new_inputs = (*ls.stack(rs), _cost_tables(ls, rs, tab_cache))
                n_valid = n_valid.copy()
                n_valid[new] = new_inputs[2].valid.sum(axis=1)
                P = _pad_lanes(len(new), B)
                idx = np.full(P, B, np.int32)
                idx[: len(new)] = new
                new_lanes = (fresh, *new_inputs)
                if P > len(new):
                    new_lanes = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], P - len(new), axis=0)]),
                                             new_lanes)
                # the new configs' state and tables go into their lanes in place: only those lanes
                # cross to the devices (re-placing every lane's tables cost ~100 MB a call at 10k requests)
                setter = _lane_setter(sharding)
                t_set = time.perf_counter()
                st, cl, topo, wl, tabs = setter((st, cl, topo, wl, tabs), idx, new_lanes)
                if P not in seen_p:  # the first write of P lanes compiled the setter: compile time
                    seen_p.add(P)
                    jax.block_until_ready(st)
                    info.compile_s += time.perf_counter() - t_set
                    t0 += time.perf_counter() - t_set
                prev[new] = -1
            n_valid_d = place(n_valid, sharding)
        more = any(r >= 0 for r in lane)
        if more:  # dispatched asynchronously: the lanes run while the consumer handles `result`
            st = fn(cl, topo, wl, n_valid_d, st, tabs)
            info.steps += length
        if result is not None:
            info.run_s += time.perf_counter() - t0  # the consumer's time between calls is not run time
            yield result
            t0 = time.perf_counter()
        if not more:
            break
    info.run_s += time.perf_counter() - t0
    if bar is not None:
        bar.close()


__all__ = ["RunInfo", "ChunkResult", "run_chunks", "chunk_size", "config_keys", "on_cpu_devices"]
