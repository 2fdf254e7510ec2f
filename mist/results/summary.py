"""Run summary: counts, throughput, latency percentiles (vLLM benchmark key names), goodput under
SLOs, utilisation, energy and cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ..engine.tables import Reject
from .frame import _check_unbatched, _host, request_columns
from .itl import itl_count, itl_mean, itl_percentiles

LATENCY_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives (DESIGN.md): a request is "good" when its TTFT <= `ttft_ms` and TPOT
    <= `tpot_ms`; the run meets the SLO when, at each of `percentiles`, TTFT and TPOT stay within
    the target times the allowed slowdown, and at most `max_rejected_fraction` of requests are
    rejected. Use ttft_ms=1000 for RAG or KV-retrieval pipelines."""

    ttft_ms: float = 250.0
    tpot_ms: float = 25.0
    percentiles: tuple[float, ...] = (50, 90, 99)
    ttft_slowdown: tuple[float, ...] = (2.0, 3.0, 6.0)
    tpot_slowdown: tuple[float, ...] = (1.25, 1.5, 5.0)
    max_rejected_fraction: float = 0.0

    def __post_init__(self):
        if not (len(self.percentiles) == len(self.ttft_slowdown) == len(self.tpot_slowdown)):
            raise ValueError("SLO: percentiles, ttft_slowdown and tpot_slowdown must have the same length")


def _pct_name(p: float) -> str:
    return "median" if p == 50 else f"p{p:g}".replace(".", "_")


def _latency_stats(name: str, values_s: np.ndarray, percentiles=LATENCY_PERCENTILES) -> dict:
    """mean/std/median/pXX of `values_s` (seconds) in ms, NaNs dropped (np.percentile, linear)."""
    v = np.asarray(values_s, dtype=np.float64)
    v = v[np.isfinite(v)] * 1e3
    out = {f"mean_{name}_ms": float(v.mean()) if v.size else float("nan"),
           f"std_{name}_ms": float(v.std()) if v.size else float("nan")}
    # one call for every percentile (one partition of the values instead of one per percentile)
    pct = np.percentile(v, list(percentiles)) if v.size else np.full(len(percentiles), np.nan)
    for p, x in zip(percentiles, pct):
        out[f"{_pct_name(p)}_{name}_ms"] = float(x)
    return out


def _rate(x: float, duration: float) -> float:
    return float(x) / duration if duration > 0 else float("nan")


def summarize(lowered, state, stats=None, slo: SLO = SLO(), df: pd.DataFrame | None = None) -> dict:
    """Summary of one simulated run as a flat-ish dict (JSON-ready apart from NaN floats).

    Latency statistics use completed requests only (rejected ones are counted separately).
    Durations are seconds, latencies ms, throughputs per second, energy J, power W, costs USD
    (cost_usd, cost_per_million_output_tokens, cost_per_million_tokens).
    `df` may pass an already built `requests_frame(lowered, state)`.
    """
    _check_unbatched(state)
    # numpy columns (a sweep summarises thousands of runs: no frame, no name columns)
    need = ("arrival", "finish", "input_tokens", "output_tokens", "preemptions", "reject_code", "rejected",
            "completed", "ttft", "tpot", "e2e", "queueing")
    cols = request_columns(lowered, state, names=False) if df is None else {k: df[k].to_numpy() for k in need}
    completed, rejected = cols["completed"].astype(bool), cols["rejected"].astype(bool)
    done = {k: cols[k][completed] for k in ("finish", "input_tokens", "output_tokens", "ttft", "tpot", "e2e",
                                            "queueing")}
    n, n_done, n_rej = len(completed), int(completed.sum()), int(rejected.sum())

    codes = np.bincount(cols["reject_code"][rejected].astype(np.int64), minlength=max(Reject) + 1)
    by_reason = {r.name.lower(): int(codes[int(r)]) for r in Reject if r != Reject.NONE}
    first_arrival = float(cols["arrival"].min()) if n else 0.0
    last_finish = float(done["finish"].max()) if n_done else first_arrival
    duration = max(last_finish - first_arrival, 0.0)
    tin = int(done["input_tokens"].sum())
    tout = int(done["output_tokens"].sum())

    s: dict = {
        "num_requests": n,
        "completed": n_done,
        "rejected": n_rej,
        "rejected_by_reason": {k: v for k, v in by_reason.items() if v},
        "unfinished": int(n - n_done - n_rej),
        "duration_s": duration,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "total_preemptions": int(cols["preemptions"].sum()),
        "request_throughput": _rate(n_done, duration),
        "input_throughput": _rate(tin, duration),
        "output_throughput": _rate(tout, duration),
        "total_token_throughput": _rate(tin + tout, duration),
    }
    s.update(_latency_stats("ttft", done["ttft"]))
    s.update(_latency_stats("tpot", done["tpot"]))
    hist = _host(state.itl_hist)
    s["mean_itl_ms"] = itl_mean(hist, _host(state.itl_sum)) * 1e3
    for p, v in zip(LATENCY_PERCENTILES, itl_percentiles(hist, LATENCY_PERCENTILES)):
        s[f"{_pct_name(p)}_itl_ms"] = float(v) * 1e3
    s["itl_count"] = itl_count(hist)
    s.update(_latency_stats("e2el", done["e2e"]))
    s.update(_latency_stats("queueing", done["queueing"]))

    # goodput: rejected requests are never good; TPOT is undefined (and not limiting) for 1-token outputs
    ttft_ok = done["ttft"] * 1e3 <= slo.ttft_ms
    tpot = done["tpot"]
    tpot_ok = ~np.isfinite(tpot) | (tpot * 1e3 <= slo.tpot_ms)
    good = int((ttft_ok & tpot_ok).sum())
    s["good_requests"] = good
    s["goodput_fraction"] = good / n if n else float("nan")
    s["request_goodput"] = _rate(good, duration)

    checks = {}
    finite = {m: done[m][np.isfinite(done[m])] * 1e3 for m in ("ttft", "tpot")}
    pct = {m: (np.percentile(v, list(slo.percentiles)) if v.size else np.full(len(slo.percentiles), np.nan))
           for m, v in finite.items()}
    for i, (p, fx, fy) in enumerate(zip(slo.percentiles, slo.ttft_slowdown, slo.tpot_slowdown)):
        for metric, base, mult in (("ttft", slo.ttft_ms, fx), ("tpot", slo.tpot_ms, fy)):
            value = float(pct[metric][i])
            limit = base * mult
            if finite[metric].size:
                met = bool(value <= limit)
            else:  # every completed output was one token: TPOT does not limit; nothing completed: fails
                met = metric == "tpot" and n_done > 0
            checks[f"p{p:g}_{metric}"] = {"value_ms": value, "limit_ms": limit, "met": met}
    rej_frac = n_rej / n if n else 0.0
    checks["rejected_fraction"] = {"value": rej_frac, "limit": slo.max_rejected_fraction,
                                   "met": bool(rej_frac <= slo.max_rejected_fraction)}
    s["slo_met"] = bool(n_done > 0 and all(c["met"] for c in checks.values()))
    s["slo"] = {**asdict(slo), "checks": checks}

    # utilisation, energy and cost over enabled clients, for the run's duration
    cl = lowered.clients
    enabled = _host(cl.enabled).astype(bool)
    busy = _host(state.busy).astype(np.float64)
    iters = _host(state.iters).astype(np.int64)
    devices = _host(cl.devices).astype(np.float64)
    p_busy, p_idle = _host(cl.power_busy).astype(np.float64), _host(cl.power_idle).astype(np.float64)
    price = _host(cl.price_per_hour).astype(np.float64)
    names = list(lowered.client_names)
    idx = np.flatnonzero(enabled)
    util = {names[c]: _rate(busy[c], duration) for c in idx}
    s["utilization"] = util
    s["mean_utilization"] = float(np.mean(list(util.values()))) if util else float("nan")
    s["busy_s"] = {names[c]: float(busy[c]) for c in idx}
    s["iterations"] = {names[c]: int(iters[c]) for c in idx}
    idle = np.maximum(duration - busy, 0.0)
    energy_c = devices * (p_busy * busy + p_idle * idle)
    cost_c = devices * price * duration / 3600.0
    energy = float(energy_c[idx].sum())
    cost = float(cost_c[idx].sum())
    s["num_devices"] = float(devices[idx].sum())
    s["energy_j"] = energy
    s["avg_power_w"] = _rate(energy, duration)
    s["energy_per_output_token_j"] = energy / tout if tout else float("nan")
    s["energy_per_token_j"] = energy / (tin + tout) if tin + tout else float("nan")
    s["cost_usd"] = cost
    s["cost_per_million_output_tokens"] = cost / tout * 1e6 if tout else float("nan")
    s["cost_per_million_tokens"] = cost / (tin + tout) * 1e6 if tin + tout else float("nan")

    s["sim_compile_s"] = float(stats.compile_s) if stats is not None else None
    s["sim_run_s"] = float(stats.run_s) if stats is not None else None
    s["sim_steps"] = int(stats.steps) if stats is not None and hasattr(stats, "steps") else None
    return s
