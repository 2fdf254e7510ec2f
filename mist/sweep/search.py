"""`mist search`: the cheapest deployment that meets the SLOs at a given arrival rate.

1. Grid: hardware x TP x replicas (powers of two up to `max_replicas`), all at the target rate, as
   one sweep.
2. Refinement: for each hardware x TP, the replica counts between the largest failing and the
   smallest passing power of two, as a second batch through the same compiled program.
3. The cheapest passing deployment ($/h) and its runners-up.
4. Optional gradient refinement of a continuous knob, the arrival rate, for the chosen deployment:
   the rate at which mean TTFT reaches the TTFT target, by Newton steps whose derivative
   d(mean TTFT)/d(rate) is taken by forward-mode AD (`jax.jvp`) through the whole scan (discrete
   scheduling decisions held fixed), next to the answer read off a grid of rates.
   Caveat, measured: with iteration-level batching this pathwise derivative is strongly biased (a
   request's first token is tied to iteration boundaries set by earlier arrivals, so holding those
   fixed makes its TTFT move with the whole busy period). Llama-3.1-8B / H100, 20 requests at
   2 req/s: jvp slope ~1000 ms per req/s, finite differences on the grid ~0.5-2. Trust the grid
   answer; the report prints both slopes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .sweep import prepare, run_prepared


@dataclass
class SearchResult:
    rate: float
    slo: dict
    table: pd.DataFrame  # every evaluated config
    best: pd.Series | None
    runners_up: pd.DataFrame
    refine: dict | None = None
    timing: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        rec = lambda d: json.loads(d.to_json(orient="records"))  # noqa: E731
        return {"rate": self.rate, "slo": self.slo,
                "best": None if self.best is None else rec(self.best.to_frame().T)[0],
                "runners_up": rec(self.runners_up), "refine": self.refine, "timing": self.timing,
                "evaluated": len(self.table)}

    def report(self) -> str:
        lines = [f"target: {self.rate:g} requests/s, SLO {self.slo}; evaluated {len(self.table)} deployments "
                 f"({int(self.table['feasible'].sum())} feasible) in {self.timing.get('total_s', 0):.1f} s"]
        if self.best is None:
            lines.append("no deployment meets the SLOs: raise max replicas, add hardware, or relax the SLOs")
        else:
            b = self.best
            lines.append(f"cheapest: {b['deployment']}  ${b['price_per_hour_usd']:.2f}/h, p99 TTFT "
                         f"{b['p99_ttft_ms']:.0f} ms, p99 TPOT {b['p99_tpot_ms']:.1f} ms, "
                         f"{b['output_tokens_per_dollar']:.3g} output tokens/$")
            for _, r in self.runners_up.iterrows():
                lines.append(f"  runner-up: {r['deployment']}  ${r['price_per_hour_usd']:.2f}/h, p99 TTFT "
                             f"{r['p99_ttft_ms']:.0f} ms, p99 TPOT {r['p99_tpot_ms']:.1f} ms")
        if self.refine:
            g = self.refine
            lines.append(f"rate where mean TTFT reaches {g['target_ms']:g} ms: gradient (Newton, jvp through the "
                         f"scan) {g['grad_rate']:.3f} req/s after {g['newton_steps']} steps; grid of "
                         f"{g['grid_points']} rates {g['grid_rate']:.3f} req/s")
            lines.append(f"  d(mean TTFT)/d(rate) at {self.rate:g} req/s: jvp through the scan "
                         f"{g['jvp_slope_ms_per_rate']:.4g} ms per req/s, finite differences on the grid "
                         f"{g['grid_slope_ms_per_rate']:.4g} (a large gap means the pathwise derivative, which holds "
                         "iteration boundaries fixed, is biased for this knob)")
        return "\n".join(lines)


def _base(model: str, hardware: str, trace: str, num_requests: int) -> dict:
    return {"workload": {"trace": trace, "first": num_requests},
            "clients": [{"name": "llm", "pool": "llm", "model": model, "hardware": hardware}],
            "routers": {"llm": "least-outstanding"}}


def search(model: str = "llama-3.1-8b", rate: float = 10.0, hardware=("h100", "h200"), tp=(1, 2),
           max_replicas: int = 8, trace: str = "azure_conv_2023", num_requests: int = 300, slo: dict | None = None,
           top: int = 5, refine: bool = False, out=None, progress: bool = False,
           run: dict | None = None) -> SearchResult:
    """Cheapest deployment of `model` meeting `slo` at `rate` requests/s (see the module doc). `run`
    overrides the sweep's run options (capacities, configs per chunk), e.g. to share a compiled program."""
    import time

    t0 = time.perf_counter()
    slo = dict(slo or {"ttft_ms": 250.0, "tpot_ms": 25.0})
    reps = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= max_replicas]
    if reps[-1] < max_replicas:
        reps.append(max_replicas)
    coarse = [{"hardware": h, "tp": t, "replicas": r, "rate": rate} for h in hardware for t in tp for r in reps]
    data = {"name": "search", "base": _base(model, hardware[0], trace, num_requests), "points": coarse, "slo": slo,
            "run": {"clients": max_replicas, "configs_per_chunk": min(len(coarse), 64), "progress": progress,
                    **(run or {})}}
    prep = prepare(data)
    df = run_prepared(prep)
    # refinement: replica counts between the last failing and first passing power of two
    extra = []
    for h in hardware:
        for t in tp:
            d = df[(df["hardware"] == h) & (df["tp"] == t) & df["feasible"]]
            ok = d[d["slo_met"].fillna(False).astype(bool)]
            if ok.empty:
                continue
            r_pass = int(ok["replicas"].min())
            below = [int(r) for r in d["replicas"] if r < r_pass]
            r_fail = max(below) if below else 0
            extra += [{"hardware": h, "tp": t, "replicas": r, "rate": rate} for r in range(r_fail + 1, r_pass)]
    if extra:
        data2 = {**data, "points": extra}
        prep2 = prepare(data2)
        df2 = run_prepared(prep2)
        df2["config"] += len(df)
        df = pd.concat([df, df2], ignore_index=True)
    ok = df[df["feasible"] & df["slo_met"].fillna(False).astype(bool)].sort_values(
        ["price_per_hour_usd", "p99_ttft_ms"])
    best = ok.iloc[0] if len(ok) else None
    res = SearchResult(rate=rate, slo=slo, table=df, best=best, runners_up=ok.iloc[1:1 + top])
    if refine and best is not None:
        res.refine = refine_rate(model, best["hardware"], int(best["tp"]), int(best["replicas"]), trace,
                                 num_requests, target_ms=slo["ttft_ms"], rate0=rate)
    res.timing["total_s"] = time.perf_counter() - t0
    if out is not None:
        from pathlib import Path

        Path(out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(out) / "search.csv", index=False)
        (Path(out) / "search.json").write_text(json.dumps(res.to_json(), indent=2, default=str) + "\n")
    return res


def mean_ttft_fn(lowered, steps: int, seed: int = 0):
    """mean TTFT (s) of completed requests as a function of the arrival rate (requests/s), through
    a scan of `steps` steps; differentiable in the rate (scheduling decisions held fixed)."""
    from ..engine.run import run_chunk
    from ..engine.state import init_state
    from .configs import mean_rate

    lo = lowered
    dims = lo.dims
    wl0 = jax.tree.map(jnp.asarray, lo.workload)
    cl = jax.tree.map(jnp.asarray, lo.clients)
    topo = jax.tree.map(jnp.asarray, lo.topology)
    n_valid = jnp.sum(wl0.valid).astype(jnp.int32)
    arr0 = wl0.arrival
    base_rate = mean_rate(np.asarray(lo.workload.arrival))
    first = arr0[0]
    key = jax.random.PRNGKey(seed)

    def f(rate):
        arr = jnp.where(wl0.valid, first + (arr0 - first) * (base_rate / rate), jnp.inf)
        wl = replace(wl0, arrival=arr)
        st = run_chunk.__wrapped__(dims, steps, cl, topo, wl, n_valid, init_state(dims, key))
        ok = wl.valid & jnp.isfinite(st.o_first_token) & (st.o_reject == 0)
        ttft = jnp.where(ok, st.o_first_token - jnp.where(ok, arr, 0.0), 0.0)
        return ttft.sum() / jnp.maximum(ok.sum(), 1), st.completed >= n_valid

    return f


def refine_rate(model: str, hardware: str, tp: int, replicas: int, trace: str, num_requests: int, *,
                target_ms: float, rate0: float, grid_points: int = 16, newton_steps: int = 8) -> dict:
    """Rate at which mean TTFT = `target_ms` for one deployment: Newton with jvp derivatives through
    the scan, and the crossing read off a grid of rates run as one vmapped batch."""
    from .table import config_lowered

    rates = np.geomspace(rate0 / 4, rate0 * 4, grid_points)
    data = {"name": "refine", "base": _base(model, hardware, trace, num_requests),
            "points": [{"tp": tp, "replicas": replicas, "rate": float(r)} for r in rates],
            "run": {"configs_per_chunk": grid_points, "progress": False}}
    prep = prepare(data)
    df = run_prepared(prep)
    ttft = df["mean_ttft_ms"].to_numpy(np.float64)
    above = np.flatnonzero(ttft > target_ms)
    if len(above) == 0:
        grid_rate = float("inf")
    elif above[0] == 0:
        grid_rate = 0.0
    else:
        i = above[0]
        # interpolate in log-rate between the last point below and the first above the target
        w = (target_ms - ttft[i - 1]) / (ttft[i] - ttft[i - 1])
        grid_rate = float(np.exp(np.log(rates[i - 1]) + w * (np.log(rates[i]) - np.log(rates[i - 1]))))
    lo = config_lowered(prep.lowered, 0)
    steps = int(1.5 * df["scan_steps"].max()) + 64
    f = mean_ttft_fn(lo, steps)
    val_and_slope = jax.jit(lambda r: jax.jvp(lambda x: f(x)[0], (r,), (jnp.ones_like(r),)))
    r = float(rate0)  # start from the search rate, independent of the grid answer
    history = []
    for k in range(newton_steps):
        v, dv = val_and_slope(jnp.float64(r))
        v, dv = float(v) * 1e3, float(dv) * 1e3
        history.append({"rate": r, "mean_ttft_ms": v, "d_mean_ttft_ms_d_rate": dv})
        if abs(v - target_ms) < 1e-3 * target_ms or not math.isfinite(dv) or dv <= 0:
            break
        r = float(np.clip(r - (v - target_ms) / dv, r / 4, r * 4))
    # finite-difference slope of the grid at the starting rate, to judge the pathwise (jvp) slope
    g = np.gradient(ttft, rates)
    fd_slope = float(np.interp(rate0, rates, g))
    return {"target_ms": target_ms, "grad_rate": r, "newton_steps": len(history), "history": history,
            "jvp_slope_ms_per_rate": history[0]["d_mean_ttft_ms_d_rate"] if history else math.nan,
            "grid_slope_ms_per_rate": fd_slope,
            "grid_rate": grid_rate, "grid_points": grid_points, "grid": {"rates": rates.tolist(),
                                                                          "mean_ttft_ms": ttft.tolist()},
            "deployment": f"{replicas}x {hardware} tp{tp}"}


__all__ = ["search", "SearchResult", "refine_rate", "mean_ttft_fn"]
