"""Across-seed aggregation: mean and a 95% Student-t confidence interval per numeric metric."""

from __future__ import annotations

import math

import numpy as np

# two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959963984540054

INTERVAL = "95% two-sided Student-t confidence interval of the mean across seeds: mean +- t(0.975, n-1) * s / sqrt(n)"


def t_quantile_975(df: int) -> float:
    """t_{0.975} with `df` degrees of freedom: a table up to 30, then a Cornish-Fisher expansion in 1/df
    around the normal quantile (error < 1e-4 there)."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (bool, np.bool_)):
            out[key] = float(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[key] = float(v)
    return out


def summarize_seeds(summaries: list[dict]) -> dict:
    """Aggregate the `summarize` dicts of runs that differ only in seed.

    Returns {"n_seeds": n, "interval": <how the interval is made>, <metric>: {"mean", "std" (sample,
    ddof=1), "ci95": [low, high], "half_width", "n"}, ...}. Nested dicts are flattened with dotted
    keys ("utilization.replica0", "slo.checks.p99_ttft.value_ms"); booleans count as 0/1 (so
    "slo_met" becomes the fraction of seeds meeting the SLO); None, NaN and non-numbers are dropped
    per metric. With one value the interval is NaN.
    """
    flat = [_flatten(s) for s in summaries]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    out: dict = {"n_seeds": len(summaries), "interval": INTERVAL}
    for k in keys:
        v = np.array([f[k] for f in flat if k in f and math.isfinite(f[k])], dtype=np.float64)
        n = int(v.size)
        mean = float(v.mean()) if n else float("nan")
        std = float(v.std(ddof=1)) if n > 1 else float("nan")
        hw = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
        out[k] = {"mean": mean, "std": std, "ci95": [mean - hw, mean + hw], "half_width": hw, "n": n}
    return out
