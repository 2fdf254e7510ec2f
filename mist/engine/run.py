"""Drive the scan: compiled chunks of steps, repeated until every request has completed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from .state import EngineState, init_state
from .step import cost_tables, step
from .tables import ClientTable, EngineDims, Topology, Workload


@partial(jax.jit, static_argnums=(0, 1))
def run_chunk(dims: EngineDims, length: int, cl: ClientTable, topo: Topology, wl: Workload, n_valid,
              st: EngineState, tabs=None) -> EngineState:
    """`length` scan steps (steps after completion are no-ops). `tabs`: the `cost_tables` of `cl`
    (computed here when not given; a caller running many chunks computes them once)."""
    tabs = cost_tables(dims, cl) if tabs is None else tabs

    def body(s, _):
        return step(dims, cl, topo, wl, n_valid, s, tabs), None

    out, _ = jax.lax.scan(body, st, None, length=length)
    return out


@partial(jax.jit, static_argnums=(0, 1))
def run_chunk_batched(dims: EngineDims, length: int, cl: ClientTable, topo: Topology, wl: Workload, n_valid,
                      st: EngineState, tabs=None) -> EngineState:
    """`run_chunk` vmapped over a leading config axis of every argument."""
    if tabs is None:
        return jax.vmap(lambda c, t, w, n, s: run_chunk.__wrapped__(dims, length, c, t, w, n, s))(
            cl, topo, wl, n_valid, st)
    return jax.vmap(lambda c, t, w, n, s, tb: run_chunk.__wrapped__(dims, length, c, t, w, n, s, tb))(
        cl, topo, wl, n_valid, st, tabs)


@partial(jax.jit, static_argnums=(0, 1))
def tables(dims: EngineDims, batched: bool, cl: ClientTable):
    """`cost_tables` of one config's clients, or of every config's (`batched`)."""
    return jax.vmap(lambda c: cost_tables(dims, c))(cl) if batched else cost_tables(dims, cl)


def compiler_options() -> dict:
    """XLA options for the engine's programs. On CPU, copy insertion with region analysis: without it
    XLA keeps a copy of a client's whole ready-time queue every step (the queue is read by kernels
    it cannot order before the step's writes), work that grows with the workload's length."""
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if jax.default_backend() == "cpu" else {}


class SimulationStuck(RuntimeError):
    """The scan made no progress although requests remain (a deployment that cannot serve them)."""


@dataclass
class RunStats:
    compile_s: float
    run_s: float
    steps: int
    chunks: int


def default_chunk(dims: EngineDims, batched: bool = True) -> int:
    """Scan steps per compiled call. A run takes about one to three steps per request and stage,
    and every step of its last chunk is executed (after the last completion as a no-op costing a
    full step), so chunks are a fraction of the expected length: short for one config (a call
    costs well under a millisecond), longer for vmapped batches (whose calls carry more state)."""
    if not batched:
        return int(min(max(dims.num_requests * dims.stages // 32, 64), 256))
    return int(min(max(dims.num_requests * dims.stages // 4, 256), 2048))


def simulate_arrays(dims: EngineDims, cl: ClientTable, topo: Topology, wl: Workload, key=None,
                    chunk: int | None = None, max_steps: int | None = None, batched: bool = False,
                    progress: bool = False) -> tuple[EngineState, RunStats]:
    """Run the engine to completion. With `batched`, every argument has a leading config axis."""
    chunk = chunk or default_chunk(dims, batched)
    n_valid = jnp.sum(wl.valid, axis=-1).astype(jnp.int32)
    key = jax.random.PRNGKey(0) if key is None else key
    if batched:
        B = n_valid.shape[0]
        keys = key if key.ndim == 2 else jax.random.split(key, B)
        st = jax.vmap(lambda k: init_state(dims, k))(keys)
        fn = run_chunk_batched
    else:
        st = init_state(dims, key)
        fn = run_chunk
    max_steps = max_steps or 64 * (dims.num_requests + 16) * dims.stages
    t0 = time.perf_counter()
    tabs = tables(dims, batched, cl)
    compiled = fn.lower(dims, chunk, cl, topo, wl, n_valid, st, tabs).compile(compiler_options=compiler_options())
    compile_s = time.perf_counter() - t0
    total = int(jnp.sum(n_valid))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="req", desc="simulating", leave=False)
    t0 = time.perf_counter()
    chunks = 0
    prev_steps = -1
    while True:
        st = compiled(cl, topo, wl, n_valid, st, tabs)
        chunks += 1
        completed = jnp.sum(st.completed)
        steps = int(jnp.max(st.steps))
        if bar is not None:
            bar.n = int(completed)
            bar.refresh()
        if int(completed) >= total:
            break
        if steps == prev_steps:
            raise SimulationStuck(
                f"{total - int(completed)} requests can neither be served nor rejected: a client waits for "
                "work that never comes (check that every stage has a client and the static-batch size can fill)")
        if steps > max_steps:
            raise SimulationStuck(f"no completion after {steps} steps (max_steps={max_steps})")
        prev_steps = steps
    jax.block_until_ready(st.o_finish)
    if bar is not None:
        bar.close()
    return st, RunStats(compile_s=compile_s, run_s=time.perf_counter() - t0, steps=steps, chunks=chunks)


__all__ = ["run_chunk", "run_chunk_batched", "simulate_arrays", "SimulationStuck", "RunStats"]
