"""Analysis of a sweep table: Pareto frontiers, the best config under SLOs, the maximum rate each
config sustains under SLOs (a bisection over rate run for all configs at once), and plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

#: throughput normalisations: "per dollar", "per device" (GPU), "per watt"
THROUGHPUT_PER = {"dollar": "output_tokens_per_dollar", "device": "output_throughput_per_device",
                  "gpu": "output_throughput_per_device", "watt": "output_tokens_per_joule"}
DEFAULT_LATENCY = ("p99_ttft_ms", "p99_tpot_ms")


def objectives_for(per: str = "dollar", latency=DEFAULT_LATENCY) -> dict[str, str]:
    if per not in THROUGHPUT_PER:
        raise ValueError(f"per must be one of {', '.join(THROUGHPUT_PER)}")
    return {THROUGHPUT_PER[per]: "max", **{c: "min" for c in latency}}


def _runnable(df: pd.DataFrame, cols) -> pd.DataFrame:
    ok = df["feasible"].astype(bool) if "feasible" in df else pd.Series(True, index=df.index)
    for c in cols:
        ok &= np.isfinite(pd.to_numeric(df[c], errors="coerce"))
    return df[ok]


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Rows of `values` (n x d, all objectives to minimise) that no other row dominates (another
    row at least as good in every objective and better in one)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    keep = np.ones(n, bool)
    for s in range(0, n, 512):
        blk = v[s:s + 512]
        le = (v[None, :, :] <= blk[:, None, :]).all(-1)
        lt = (v[None, :, :] < blk[:, None, :]).any(-1)
        keep[s:s + 512] = ~(le & lt).any(1)
    return keep


def pareto_front(df: pd.DataFrame, objectives: dict[str, str] | None = None, *, per: str = "dollar",
                 slo_only: bool = False) -> pd.DataFrame:
    """Non-dominated configs. `objectives` maps a column to "max" or "min" (default: output tokens
    per dollar, or per device / per watt with `per`, against p99 TTFT and p99 TPOT)."""
    obj = objectives or objectives_for(per)
    d = _runnable(df, obj)
    if slo_only and "slo_met" in d:
        d = d[d["slo_met"].astype(bool)]
    if d.empty:
        return d
    vals = np.stack([(-1.0 if how == "max" else 1.0) * d[c].to_numpy(np.float64) for c, how in obj.items()], 1)
    return d[pareto_mask(vals)].sort_values(next(iter(obj)), ascending=obj[next(iter(obj))] == "min")


def meets_slo(df: pd.DataFrame, slo=None) -> pd.Series:
    """Whether each row meets `slo` (a `mist.results.SLO` or a dict of its fields), recomputed from
    the table's percentile columns (so a sweep can be re-judged under other SLOs); None: the
    sweep's own `slo_met` column."""
    from ..results import SLO

    if slo is None:
        return df["slo_met"].fillna(False).astype(bool) & df["feasible"].astype(bool)
    slo = slo if isinstance(slo, SLO) else SLO(**slo)
    ok = df["feasible"].astype(bool) & (pd.to_numeric(df.get("completed", 0), errors="coerce") > 0)
    for p, fx, fy in zip(slo.percentiles, slo.ttft_slowdown, slo.tpot_slowdown):
        name = "median" if p == 50 else f"p{p:g}"
        for metric, base, mult in (("ttft", slo.ttft_ms, fx), ("tpot", slo.tpot_ms, fy)):
            col = f"{name}_{metric}_ms"
            if col not in df:
                raise KeyError(f"the table has no {col}: judge with the sweep's own SLO (slo=None)")
            v = pd.to_numeric(df[col], errors="coerce")
            ok &= (v <= base * mult) | (v.isna() & (metric == "tpot"))
    rej = pd.to_numeric(df["rejected"], errors="coerce") / pd.to_numeric(df["num_requests"], errors="coerce")
    return ok & (rej <= slo.max_rejected_fraction)


def best_under_slo(df: pd.DataFrame, slo=None, objective: str = "output_tokens_per_dollar", maximize: bool = True,
                   k: int = 1) -> pd.DataFrame:
    """The `k` best configs by `objective` among those that meet the SLOs (empty if none does)."""
    d = df[meets_slo(df, slo)]
    d = d[np.isfinite(pd.to_numeric(d[objective], errors="coerce"))]
    return d.sort_values(objective, ascending=not maximize).head(k)


def max_sustainable_rate(prep, slo=None, *, low: float | None = None, high: float | None = None, rounds: int = 8,
                         devices=None, progress: bool = False) -> pd.DataFrame:
    """Highest arrival rate (requests/s) at which each feasible config of a prepared sweep
    (`mist.sweep.prepare`) still meets the SLOs, by bisection in log-rate.

    Every round runs the configs at their own midpoint rate as one vmapped batch (the workload's
    arrivals rescaled; the compiled program is shared across rounds). The bracket defaults to
    [own rate / 16, own rate x 16] around each config's rate. Only configs whose bracket is still
    open are simulated: all at `low`, those that passed at `high`, then the undecided ones each
    round. Columns: config, max_rate (the highest rate that passed; 0 if even `low` fails), upper
    (lowest rate that failed: `low` itself if it fails, inf if even `high` passes), and the
    passing run's output_tokens_per_dollar, output_throughput and p99 TTFT / TPOT.
    """
    from .configs import mean_rate
    from .runner import chunk_size, config_sharding, num_shards, on_cpu_devices
    from .sweep import slo_of, summarize_rows

    ls = prep.lowered
    slo = slo_of(prep.spec) if slo is None else (slo if not isinstance(slo, dict) else slo_of(slo))
    n = len(ls.feasible)
    if n == 0:
        return pd.DataFrame(columns=["config", "max_rate", "upper"])
    own = np.array([mean_rate(ls.workloads[w].arrival) for w in ls.wl_id])
    lo = np.full(n, low) if low is not None else own / 16
    hi = np.full(n, high) if high is not None else own * 16
    B = prep.spec.run.configs_per_chunk or chunk_size(ls.dims, n, memory_gb=prep.spec.run.memory_gb,
                                                      shards=num_shards(config_sharding(devices)), ls=ls,
                                                      on_cpu=on_cpu_devices(devices))
    keep = ["output_tokens_per_dollar", "output_throughput", "request_throughput", "p99_ttft_ms", "p99_tpot_ms",
            "price_per_hour_usd"]

    nan_row = {k: math.nan for k in keep}

    def judge(rates: np.ndarray, run: np.ndarray):
        """Run the configs where `run` is set at their `rates`; the others are not simulated (met
        False, rows nan), so each round costs only the configs whose bracket is still open."""
        from .runner import run_chunks

        todo = [int(j) for j in np.flatnonzero(run)]
        lr = ls.with_rates({j: float(rates[j]) for j in todo})
        rows = summarize_rows(lr, run_chunks(lr, configs_per_chunk=B, devices=devices, progress=progress,
                                             info=prep.info, seed=prep.spec.base.engine.seed, rows=todo), slo)
        met = np.zeros(n, bool)
        got = [nan_row] * n
        for j in todo:
            met[j] = bool(rows[ls.feasible[j]].get("slo_met"))
            got[j] = {k: rows[ls.feasible[j]].get(k, math.nan) for k in keep}
        return met, got

    met_lo, best = judge(lo, np.ones(n, bool))
    met_hi, at_hi = judge(hi, met_lo)  # a config that fails at `low` is not tried at `high`
    passed = np.where(met_lo, lo, 0.0)
    failed = np.where(met_hi, np.inf, np.where(met_lo, hi, lo))
    best = [at_hi[j] if met_hi[j] else best[j] if met_lo[j] else dict(nan_row) for j in range(n)]
    passed = np.where(met_hi, hi, passed)
    active = met_lo & ~met_hi
    a, b = lo.copy(), hi.copy()
    for _ in range(rounds):
        if not active.any():
            break
        mid = np.sqrt(a * b)
        met, rows = judge(mid, active)
        up = active & met
        down = active & ~met
        a = np.where(up, mid, a)
        b = np.where(down, mid, b)
        for j in np.flatnonzero(up):
            best[j] = rows[j]
        passed = np.where(up, mid, passed)
        failed = np.where(down, mid, failed)
    out = pd.DataFrame({"config": [ls.feasible[j] for j in range(n)], "max_rate": passed, "upper": failed})
    for k in keep:
        out[k] = [b_[k] for b_ in best]
    return out


def plot_pareto(df: pd.DataFrame, path: str | Path, *, per: str = "dollar", latency: str = "p99_ttft_ms",
                front: pd.DataFrame | None = None, label: str | None = None) -> Path:
    """PNG: every runnable config (SLO-meeting ones filled) and the Pareto frontier of throughput
    `per` dollar/device/watt against `latency`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ycol = THROUGHPUT_PER[per]
    d = _runnable(df, [ycol, latency])
    front = pareto_front(df, {ycol: "max", latency: "min"}) if front is None else front
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    met = d["slo_met"].fillna(False).astype(bool) if "slo_met" in d else pd.Series(False, index=d.index)
    ax.scatter(d.loc[~met, latency], d.loc[~met, ycol], s=14, facecolors="none", edgecolors="0.5", label="misses SLO")
    ax.scatter(d.loc[met, latency], d.loc[met, ycol], s=14, color="tab:blue", label="meets SLO")
    f = front.sort_values(latency)
    ax.plot(f[latency], f[ycol], "-o", color="tab:red", ms=4, label="Pareto frontier")
    if label and label in f:
        for _, r in f.iterrows():
            ax.annotate(str(r[label]), (r[latency], r[ycol]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(latency.replace("_", " "))
    ax.set_ylabel(ycol.replace("_", " "))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_heatmap(df: pd.DataFrame, x: str, y: str, metric: str, path: str | Path, *, agg: str = "max") -> Path:
    """PNG heatmap of `metric` over two axis columns (`agg` over the other axes: max, min, mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = _runnable(df, [metric])
    tab = d.pivot_table(index=y, columns=x, values=metric, aggfunc=agg)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(tab.columns), 2), 1.2 + 0.5 * max(len(tab.index), 2)))
    im = ax.imshow(tab.to_numpy(np.float64), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(tab.columns)), [str(c) for c in tab.columns], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(tab.index)), [str(i) for i in tab.index], fontsize=7)
    for (i, j), v in np.ndenumerate(tab.to_numpy(np.float64)):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{agg} {metric}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


__all__ = ["pareto_front", "pareto_mask", "meets_slo", "best_under_slo", "max_sustainable_rate", "plot_pareto",
           "plot_heatmap", "objectives_for", "THROUGHPUT_PER"]


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=130)
    plt.close(fig)
    return p
