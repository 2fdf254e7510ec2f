"""PNG plots of a requests frame (matplotlib's Agg canvas; the global backend is left alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from .frame import num_stages


def _figure(**kw):
    from matplotlib.figure import Figure  # imported here: `import mist.results` stays light

    return Figure(**kw)


def _save(fig, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_latency_cdf(df: pd.DataFrame, path) -> Path:
    """Empirical CDFs of TTFT, TPOT and end-to-end latency (ms, log x) of the completed requests."""
    done = df[df["completed"]] if "completed" in df else df
    fig = _figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (col, title) in zip(axes, (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "End-to-end latency"))):
        v = np.sort(done[col].to_numpy(dtype=np.float64))
        v = v[np.isfinite(v)] * 1e3
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post")
            if v.min() > 0:
                ax.set_xscale("log")
            for q, ls in ((50, ":"), (99, "--")):
                ax.axvline(np.percentile(v, q), color="grey", ls=ls, lw=0.8, label=f"p{q}")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(f"{len(done)} completed of {len(df)} requests")
    return _save(fig, path)


def plot_timeline(df: pd.DataFrame, path, max_requests: int = 200) -> Path:
    """Gantt chart of the first `max_requests` requests: waiting (grey) from arrival or previous stage
    end to each stage's start, then one coloured bar per stage (colour per client), first token
    marked with a dot, rejections with a red cross."""
    d = df.sort_values("request_id").head(max_requests)
    K = num_stages(d)
    clients = sorted({c for k in range(K) for c in d[f"stage{k}_client"] if c})
    cmap = {c: f"C{i % 10}" for i, c in enumerate(clients)}
    fig = _figure(figsize=(11, max(3.0, 0.04 * len(d) + 1.5)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(d), dtype=np.float64)
    prev = d["arrival"].to_numpy(dtype=np.float64)
    bars: dict[str, list] = {}  # colour -> [(y, left, width)] so each colour is one barh call
    for k in range(K):
        t0 = d[f"stage{k}_start"].to_numpy(dtype=np.float64)
        t1 = d[f"stage{k}_end"].to_numpy(dtype=np.float64)
        cl = d[f"stage{k}_client"].to_numpy()
        ok = np.isfinite(t0) & np.isfinite(prev)
        bars.setdefault("0.85", []).extend(zip(y[ok], prev[ok], (t0 - prev)[ok]))
        ok &= np.isfinite(t1)
        for c in set(cl[ok]):
            m = ok & (cl == c)
            bars.setdefault(cmap.get(c, "C7"), []).extend(zip(y[m], t0[m], (t1 - t0)[m]))
        prev = np.where(ok, t1, np.nan)
    for colour, b in bars.items():
        if b:
            yy, left, width = map(np.asarray, zip(*b))
            ax.barh(yy, width, left=left, height=0.8, color=colour, lw=0)
    ft = d["first_token"].to_numpy(dtype=np.float64)
    ax.plot(ft, y, "k.", ms=2)
    rj = d["rejected"].to_numpy(dtype=bool)
    if rj.any():
        ax.plot(d["arrival"].to_numpy()[rj], y[rj], "rx", ms=4)
    from matplotlib.patches import Patch

    handles = [Patch(color="0.85", label="waiting")] + [Patch(color=cmap[c], label=c) for c in clients]
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=min(len(handles), 6))
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("request (arrival order)")
    ax.invert_yaxis()
    ax.set_title(f"first {len(d)} of {len(df)} requests")
    return _save(fig, path)
