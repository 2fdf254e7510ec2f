"""`mist.sweep`: expand a sweep, lower every config to shared capacities, run them chunk by chunk
through one compiled vmapped program, and tabulate one row per config."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..lowering.config import load_workload
from ..specs._toml import Fields
from .configs import ConfigPlan, apply_point
from .lowering import LoweredSweep, lower_sweep
from .runner import RunInfo, run_chunks
from .sampling import expand
from .sharding import host_shard, initialize_distributed, part_path
from .spec import SweepSpec, load_sweep, parse_sweep
from .table import (assemble, config_columns, config_lowered, derived_metrics, flatten_summary, take,
                    write_table)


@dataclass
class PreparedSweep:
    """A sweep ready to run: its spec, one plan per config and the lowered feasible configs."""

    spec: SweepSpec
    plans: list[ConfigPlan]
    lowered: LoweredSweep
    workloads: dict[str, dict]
    lower_s: float = 0.0
    info: RunInfo = field(default_factory=RunInfo)


def as_spec(path_or_spec) -> SweepSpec:
    if isinstance(path_or_spec, SweepSpec):
        return path_or_spec
    if isinstance(path_or_spec, dict):
        return parse_sweep(path_or_spec)
    return load_sweep(path_or_spec)


def slo_of(spec_or_dict):
    from ..results import SLO

    d = spec_or_dict.slo if isinstance(spec_or_dict, SweepSpec) else dict(spec_or_dict or {})
    return SLO(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_workloads(spec: SweepSpec, labels) -> dict[str, dict]:
    """Request arrays per workload label (the base config's requests for 'base')."""
    out = {}
    for label in labels:
        if label in spec.workloads:
            out[label] = load_workload(Fields(dict(spec.workloads[label]), spec.path, "workload."), spec.path,
                                       spec.base_dir)
        else:
            out[label] = spec.base.requests
    return out


def prepare(path_or_spec, *, indices=None) -> PreparedSweep:
    """Expand and lower a sweep (`indices`: only those configs, e.g. one host's shard)."""
    spec = as_spec(path_or_spec)
    points = spec.points if spec.points is not None else expand(spec.axes, spec.sampling)
    plans = [apply_point(spec, p, i) for i, p in enumerate(points)]
    if indices is not None:
        plans = [plans[i] for i in indices]
    workloads = load_workloads(spec, sorted({p.workload for p in plans}))
    t0 = time.perf_counter()
    r = spec.run
    ls = lower_sweep(plans, workloads, stretch=spec.base.engine.stretch, window=spec.base.engine.window,
                     queue=spec.base.engine.queue, absorb=spec.base.engine.absorb,
                     min_dims=dict(clients=r.clients, slots=max(r.slots, spec.base.engine.slots or 0), stages=r.stages,
                                   pools=r.pools, pipelines=r.pipelines, requests=r.requests))
    return PreparedSweep(spec, plans, ls, workloads, lower_s=time.perf_counter() - t0)


def summarize_rows(ls: LoweredSweep, chunks, slo) -> dict[int, dict]:
    """Summary row per feasible config, keyed by plan index."""
    from ..results import summarize

    out = {}
    for ch in chunks:
        for i, row in enumerate(ch.rows):
            lo = config_lowered(ls, row)
            s = summarize(lo, take(ch.state, i), None, slo)
            r = {**flatten_summary(s), **derived_metrics(lo, s), "scan_steps": int(ch.steps[i])}
            if ch.stuck[i]:
                r["slo_met"] = False
                r["stuck"] = ch.stuck[i]
            out[ls.feasible[row]] = r
    return out


def run_prepared(prep: PreparedSweep, *, devices=None, progress: bool | None = None, seed: int | None = None,
                 rows=None, slo=None) -> pd.DataFrame:
    """Simulate a prepared sweep; returns the table (infeasible configs included, not run)."""
    spec, ls = prep.spec, prep.lowered
    slo = slo_of(spec) if slo is None else slo
    progress = spec.run.progress if progress is None else progress
    seed = spec.base.engine.seed if seed is None else seed
    chunks = run_chunks(ls, seed=seed, configs_per_chunk=spec.run.configs_per_chunk, memory_gb=spec.run.memory_gb,
                        devices=devices, progress=progress, info=prep.info, rows=rows)
    summaries = summarize_rows(ls, chunks, slo)
    table = []
    for p in prep.plans:
        r = {**config_columns(p), "feasible": p.feasible, "reason": p.reason, "slo_met": False}
        if p.index in summaries:
            stuck = summaries[p.index].pop("stuck", "")
            r.update(summaries[p.index])
            if stuck:
                r["reason"] = stuck
        table.append(r)
    return assemble(table, [a.name for a in spec.axes] + sorted({k for p in prep.plans for k in p.point}))


def sweep(path_or_spec, *, out: str | Path | None = None, devices=None, progress: bool | None = None,
          distributed: bool = False, process: tuple[int, int] | None = None) -> pd.DataFrame:
    """Run a sweep (a file path, a parsed `SweepSpec`, or a mapping) and return one row per config.

    With `out`, writes `sweep.parquet` and `sweep.csv` there. With `distributed`, calls
    `jax.distributed.initialize()` and runs only this host's shard of configs, writing
    `part-<process_index>.parquet` under `out` (join them with `mist.sweep.merge_parts`);
    `process=(index, count)` picks a shard by hand (no initialisation).
    """
    spec = as_spec(path_or_spec)
    if distributed and process is None:
        process = initialize_distributed()
    indices = None
    if process is not None and process[1] > 1:
        points = spec.points if spec.points is not None else expand(spec.axes, spec.sampling)
        indices = host_shard(len(points), *process).tolist()
    prep = prepare(spec, indices=indices)
    df = run_prepared(prep, devices=devices, progress=progress)
    df.attrs["run"] = {"lower_s": prep.lower_s, "compile_s": prep.info.compile_s, "run_s": prep.info.run_s,
                       "configs_per_chunk": prep.info.configs_per_chunk, "chunks": prep.info.chunks,
                       "devices": prep.info.devices, "dims": prep.lowered.dims._asdict()}
    if out is not None:
        if process is not None and process[1] > 1:
            Path(out).mkdir(parents=True, exist_ok=True)
            df.to_parquet(part_path(out, process[0]), index=False)
        else:
            write_table(df, out)
    return df


__all__ = ["sweep", "prepare", "run_prepared", "PreparedSweep", "slo_of", "load_workloads"]
