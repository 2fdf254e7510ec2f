"""The sweep's results table: one row per config with its axis values, feasibility and the run
summary (`mist.results.summarize`) flattened to scalars, plus throughput per dollar, per device
and per watt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from ..lowering.deployment import Deployment, Lowered
from .lowering import LoweredSweep

#: columns every row has, before the summary metrics
ID_COLUMNS = ("config", "feasible", "reason", "deployment", "workload", "rate")


def describe(dep: Deployment | None) -> str:
    """Short label of a deployment: per pool, count x hardware and parallelism."""
    if dep is None:
        return ""
    parts = []
    for pool in dict.fromkeys(c.pool for c in dep.clients):
        cs = [c for c in dep.clients if c.pool == pool]
        c = cs[0]
        if c.kind != "llm":
            parts.append(f"{pool}: {len(cs)}x server")
            continue
        par = f"tp{c.tp}" + (f"pp{c.pp}" if c.pp > 1 else "") + (f"ep{c.ep}" if c.ep > 1 else "")
        parts.append(f"{pool}: {len(cs)}x {c.hardware} {par} {c.policy} seqs{c.max_num_seqs}")
    return " | ".join(parts)


def config_lowered(ls: LoweredSweep, row: int) -> Lowered:
    """The (unbatched, host) `Lowered` of feasible config `row` (a position in `ls.feasible`)."""
    d, w = ls.dep_id[row], ls.wl_id[row]
    return Lowered(dims=ls.dims, clients=ls.clients[d], topology=ls.topologies[d], workload=ls.workloads[w],
                   client_names=ls.client_names[d], pool_names=ls.pool_names[d],
                   pipeline_names=ls.pipeline_names[d], notes={})


def take(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def flatten_summary(s: dict) -> dict:
    """Scalars of a summary; failed SLO checks and rejection reasons as short strings."""
    out = {k: v for k, v in s.items() if isinstance(v, (bool, int, float, str, np.number)) or v is None}
    checks = (s.get("slo") or {}).get("checks", {})
    out["slo_failed"] = ",".join(k for k, c in checks.items() if not c.get("met", True))
    out["rejected_by_reason"] = json.dumps(s.get("rejected_by_reason", {}), sort_keys=True)
    return out


def derived_metrics(lo: Lowered, s: dict) -> dict:
    """Price of the deployment and throughput per dollar, per device and per watt."""
    cl = lo.clients
    en = np.asarray(cl.enabled, bool)
    price = float((np.asarray(cl.devices) * np.asarray(cl.price_per_hour))[en].sum())
    tdp = float((np.asarray(cl.devices) * np.asarray(cl.power_busy))[en].sum())
    devs = float(np.asarray(cl.devices)[en].sum())
    out_tps = float(s.get("output_throughput", math.nan))
    return {"price_per_hour_usd": price, "tdp_w": tdp,
            "output_tokens_per_dollar": out_tps * 3600.0 / price if price > 0 else math.nan,
            "output_throughput_per_device": out_tps / devs if devs > 0 else math.nan,
            "output_tokens_per_joule": out_tps / s["avg_power_w"] if s.get("avg_power_w") else math.nan}


def config_columns(plan) -> dict:
    return {"config": plan.index, "deployment": describe(plan.deployment), "workload": plan.workload,
            "rate": plan.rate if plan.rate is not None else math.nan,
            **{k: v for k, v in plan.point.items() if k not in ("rate", "workload")}}


def assemble(rows: list[dict], axes: list[str] = ()) -> pd.DataFrame:
    """Rows -> DataFrame ordered by config: id columns, axis columns, then metrics."""
    df = pd.DataFrame(rows)
    if "config" in df:
        df = df.sort_values("config").reset_index(drop=True)
    # each column once: axis names repeat (the spec's axes, then every config's point keys)
    first = list(dict.fromkeys([c for c in ID_COLUMNS if c in df] + [a for a in axes if a in df]))
    return df[first + [c for c in df if c not in first]]


def write_table(df: pd.DataFrame, out_dir: str | Path, stem: str = "sweep") -> list[Path]:
    """`<stem>.parquet` and `<stem>.csv` under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq, csv = out / f"{stem}.parquet", out / f"{stem}.csv"
    df.to_parquet(pq, index=False)
    df.to_csv(csv, index=False)
    return [pq, csv]


__all__ = ["describe", "config_lowered", "take", "flatten_summary", "derived_metrics", "config_columns",
           "assemble", "write_table"]
