"""Inter-token-latency statistics from the engine's log-binned histogram."""

from __future__ import annotations

import numpy as np

from ..engine.state import itl_bin_edges


def itl_percentiles(hist, percentiles, edges=None) -> np.ndarray:
    """Percentiles (seconds) of the inter-token gaps counted in `hist`.

    Bin i holds gaps in (edges[i], edges[i+1]] (the first and last bins also hold what falls below
    or above the range). Inside the bin where the cumulative count reaches q% of the total, the value
    is interpolated geometrically (the bins are log-spaced), so the error is below one bin width.
    NaN when the histogram is empty.
    """
    h = np.asarray(hist, dtype=np.float64)
    e = itl_bin_edges(h.shape[0]) if edges is None else np.asarray(edges, dtype=np.float64)
    q = np.atleast_1d(np.asarray(percentiles, dtype=np.float64))
    total = h.sum()
    if total <= 0:
        return np.full(q.shape, np.nan)
    cum = np.cumsum(h)
    target = np.maximum(np.clip(q / 100.0, 0.0, 1.0) * total, 1e-12 * total)  # q=0: first non-empty bin
    i = np.clip(np.searchsorted(cum, target, side="left"), 0, h.shape[0] - 1)
    before = np.where(i > 0, cum[np.maximum(i - 1, 0)], 0.0)
    frac = np.where(h[i] > 0, (target - before) / np.where(h[i] > 0, h[i], 1.0), 0.0)
    frac = np.clip(frac, 0.0, 1.0)
    lo, hi = e[i], e[i + 1]
    return lo * (hi / lo) ** frac


def itl_mean(hist, itl_sum) -> float:
    """Mean inter-token gap in seconds (`itl_sum` / number of gaps); NaN when there are none."""
    n = float(np.asarray(hist, dtype=np.float64).sum())
    return float(itl_sum) / n if n > 0 else float("nan")


def itl_count(hist) -> int:
    return int(round(float(np.asarray(hist, dtype=np.float64).sum())))
