"""`mist.simulate`: run a deployment on a workload and summarise what users see and operators pay."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from .engine.run import RunStats, simulate_arrays
from .lowering.config import SimConfig, load_config
from .lowering.deployment import Deployment, Lowered, lower, stack_lowered


@dataclass
class SimulationResult:
    """Per-request table, summary metrics and run statistics of one simulation (seed 0 when
    several seeds ran; `seed_summaries` and `summary['seeds']` hold the rest)."""

    lowered: Lowered
    state: Any
    stats: RunStats
    requests: Any  # pandas.DataFrame
    summary: dict
    seed_summaries: list[dict] = field(default_factory=list)

    def write(self, out_dir: str | Path, max_trace_requests: int = 5000) -> Path:
        from .results import write_outputs

        out = Path(out_dir)
        write_outputs(out, self.lowered, self.state, self.summary, self.stats, max_requests=max_trace_requests)
        return out


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _slice_lowered(lo: Lowered, i: int) -> Lowered:
    return Lowered(dims=lo.dims, clients=_index(lo.clients, i), topology=_index(lo.topology, i),
                   workload=_index(lo.workload, i), client_names=lo.client_names, pool_names=lo.pool_names,
                   pipeline_names=lo.pipeline_names, notes=lo.notes)


def simulate(config: str | Path | SimConfig | None = None, *, deployment: Deployment | None = None,
             requests: Any = None, seeds: int | None = None, seed: int | None = None, stretch: int | None = None,
             slo: dict | None = None, progress: bool = False, workloads: list | None = None) -> SimulationResult:
    """Simulate a config file (None: the bundled default), or a `deployment` on `requests`.

    `seeds` > 1 runs that many seeds of the same config as one vmapped batch (different step-noise
    streams; with `workloads`, one workload per seed) and reports each metric's mean and 95% interval.
    """
    from .results import SLO, requests_frame, summarize, summarize_seeds

    if deployment is None:
        cfg = config if isinstance(config, SimConfig) else load_config(config)
        deployment, reqs, eng = cfg.deployment, cfg.requests, cfg.engine
        slo = {**cfg.slo, **(slo or {})}
        n_seeds = seeds or eng.seeds
        base_seed = eng.seed if seed is None else seed
        stretch = stretch or eng.stretch
        kw = dict(slots=eng.slots, window=eng.window, queue=eng.queue, absorb=eng.absorb)
    else:
        if requests is None and not workloads:
            raise ValueError("simulate(deployment=...) needs requests=")
        reqs = requests
        n_seeds = seeds or 1
        base_seed = seed or 0
        stretch = stretch or 64
        kw = {}
    wls = workloads or [reqs] * n_seeds
    if len(wls) != n_seeds:
        raise ValueError(f"{len(wls)} workloads for {n_seeds} seeds")
    n_max = max(len(w["arrival"]) if isinstance(w, dict) else int(w.num_valid) for w in wls)
    items = [lower(deployment, w, stretch=stretch, num_requests=n_max, **kw) for w in wls]
    key = jax.random.PRNGKey(base_seed)
    slo_obj = SLO(**slo) if slo else SLO()
    if n_seeds == 1:
        lo = items[0]
        st, stats = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload, key=key, progress=progress)
        st = jax.device_get(st)
        summary = summarize(lo, st, stats, slo_obj)
        return SimulationResult(lo, st, stats, requests_frame(lo, st), summary)
    lo_all = stack_lowered(items)
    keys = jax.random.split(key, n_seeds)
    st_all, stats = simulate_arrays(lo_all.dims, lo_all.clients, lo_all.topology, lo_all.workload, key=keys,
                                    batched=True, progress=progress)
    st_all = jax.device_get(st_all)
    sums = []
    for i in range(n_seeds):
        sums.append(summarize(_slice_lowered(lo_all, i), _index(st_all, i), stats, slo_obj))
    lo0, st0 = _slice_lowered(lo_all, 0), _index(st_all, 0)
    summary = dict(sums[0])
    summary["seeds"] = summarize_seeds(sums)
    summary["num_seeds"] = n_seeds
    return SimulationResult(lo0, st0, stats, requests_frame(lo0, st0), summary, sums)


__all__ = ["simulate", "SimulationResult"]
