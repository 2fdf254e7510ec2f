"""Build the curated operator-timing subset committed under traces/ops/.

    python calibration/curate_traces.py [--data DIR] [--out traces/ops]

Loads every measured source (mist.calibration.sources), then per device keeps a small,
stratified, de-duplicated sample that still covers every op kind and the range of shapes:

* one framework per (device, op) for AIConfigurator's attention / MLA / GEMM / MoE tables:
  the newest vLLM version present, else TRT-LLM, else SGLang (so prefill and decode
  attention come from one framework per device); sliding-window attention rows are dropped;
* collectives: the newest NCCL (oneCCL on B60) table for all four collectives, the same
  framework's custom all-reduce (CUDA-graph variant), and Vidur's all_reduce / send_recv;
* Vidur: the HEAD profiles where a device has them, the older history profiles otherwise;
  Vidur attention only where AIConfigurator has no attention for the device;
* within each stratum (op x source x dtype/variant) a spread of shape configurations
  (evenly spaced over the sorted configurations, e.g. GEMM (n, k) pairs, attention head
  configurations, MoE model shapes), and within each configuration rows evenly spaced over
  a work proxy (FLOPs, bytes or tokens) on a log scale, so every sweep keeps its small
  and large ends;
* duplicates (same device, op, shape, formats, framework): repeated measurements of one
  kernel collapse to their median, and of several kernels the fastest one is kept;
* groups of fewer than KEEP_ALL_BELOW rows (one op from one source on one device) are kept
  whole.

The output is one Parquet file per device, named by catalog device name.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mist.calibration import schema  # noqa: E402
from mist.calibration.sources import load_source  # noqa: E402

AIC_TABLE_OPS = ("gemm", "attn_prefill", "attn_decode", "mla_prefill", "mla_decode", "moe")
FRAMEWORK_PREFERENCE = ("vllm", "trtllm", "sglang")

#: per op: (stratum columns, configuration columns, max configurations, max rows per configuration)
PLAN: dict[str, tuple[tuple[str, ...], tuple[str, ...], int, int]] = {
    "gemm":          (("dtype", "w_dtype", "variant", "tp"), ("n", "k", "model", "name"), 36, 21),
    "attn_prefill":  (("dtype", "kv_dtype"), ("num_heads", "num_kv_heads", "head_dim"), 16, 48),
    "attn_decode":   (("dtype", "kv_dtype"), ("num_heads", "num_kv_heads", "head_dim"), 16, 48),
    "mla_prefill":   (("dtype", "kv_dtype"), ("num_heads", "tp"), 8, 36),
    "mla_decode":    (("dtype", "kv_dtype"), ("num_heads", "tp"), 8, 36),
    "moe":           (("dtype", "w_dtype", "variant"), ("hidden", "inter", "num_experts", "top_k", "tp", "ep", "name"), 12, 27),
    "allreduce":     (("framework", "variant", "dtype"), ("num_devices", "num_nodes"), 8, 32),
    "allgather":     (("framework", "variant", "dtype"), ("num_devices", "num_nodes"), 8, 32),
    "alltoall":      (("framework", "variant", "dtype"), ("num_devices", "num_nodes"), 8, 32),
    "reducescatter": (("framework", "variant", "dtype"), ("num_devices", "num_nodes"), 8, 32),
    "send_recv":     (("framework", "variant", "dtype"), ("num_devices", "num_nodes"), 8, 32),
    "cpu_overhead":  (("name",), ("model", "tp"), 40, 20),
    "elementwise":   (("name", "tp"), ("n", "model"), 8, 12),
    "layernorm":     (("name", "tp"), ("n", "model"), 8, 12),
    "softmax":       (("name",), ("n",), 40, 40),
}
#: (op, source) overrides of PLAN's (max configurations, max rows per configuration)
PLAN_OVERRIDES: dict[tuple[str, str], tuple[int, int]] = {
    ("gemm", "vidur"): (24, 14),        # 6 models x 4 linear layers per TP degree
    ("gemm", "aiter"): (48, 14),
    ("moe", "aiter"): (16, 14),
}
#: groups (one op from one source on one device) this small are kept whole
KEEP_ALL_BELOW = 200

def work(df: pd.DataFrame) -> np.ndarray:
    """A scalar 'size' per row used to spread the sample over each sweep."""
    f = lambda c: df[c].to_numpy(float)  # noqa: E731
    op = df["op"].to_numpy(object)
    w = np.full(len(df), np.nan)
    g = op == "gemm"
    w[g] = (f("m") * f("n") * f("k"))[g]
    a = np.isin(op, schema.ATTENTION_OPS)
    w[a] = (f("batch") * f("q_len") * f("kv_len") * f("num_heads"))[a]
    m = op == "moe"
    w[m] = (f("num_tokens") * f("top_k") * f("hidden") * f("inter"))[m]
    c = np.isin(op, schema.COLLECTIVE_OPS)
    w[c] = f("message_bytes")[c]
    e = np.isin(op, ("elementwise", "layernorm", "softmax"))
    w[e] = (f("m") * np.nan_to_num(f("n"), nan=1.0))[e]
    u = op == "cpu_overhead"
    w[u] = f("batch")[u]
    return w


def spread(n: int, k: int) -> np.ndarray:
    """k indices evenly spaced over range(n), ends included."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


def spread_log(w: np.ndarray, k: int) -> np.ndarray:
    """At most k indices into the ascending values ``w``, spread evenly in log(w)."""
    n = len(w)
    if n <= k:
        return np.arange(n)
    ok = np.flatnonzero(np.isfinite(w) & (w > 0))
    if len(ok) < 2:
        return spread(n, k)
    lw = np.log(w[ok])
    targets = np.linspace(lw[0], lw[-1], k)
    pos = np.clip(np.searchsorted(lw, targets), 0, len(ok) - 1)
    # nearest of the two neighbours in log space
    prev = np.clip(pos - 1, 0, len(ok) - 1)
    pos = np.where(np.abs(lw[prev] - targets) < np.abs(lw[pos] - targets), prev, pos)
    return np.unique(ok[pos])


def _key(df: pd.DataFrame, cols) -> pd.Series:
    """One string per row joining the given columns (NaN -> 'nan')."""
    key = pd.Series([""] * len(df), index=df.index, dtype=object)
    for c in cols:
        key = key + "|" + df[c].astype(object).map(str)
    return key


def sample_group(df: pd.DataFrame, op: str, source: str = "") -> pd.DataFrame:
    if len(df) < KEEP_ALL_BELOW:
        return df
    strata, cfg_cols, max_cfg, max_rows = PLAN[op]
    max_cfg, max_rows = PLAN_OVERRIDES.get((op, source), (max_cfg, max_rows))
    df = df.assign(_w=work(df))
    out = []
    for _, s in df.groupby(_key(df, strata), sort=True):
        cfg = _key(s, cfg_cols)
        # configurations sorted by their median work so evenly spaced picks span small..large
        order = s.groupby(cfg)["_w"].median().sort_values(kind="stable")
        keep = order.index[spread(len(order), max_cfg)]
        for c in keep:
            g = s[cfg == c].sort_values(["_w", "time_s"], kind="stable")
            out.append(g.iloc[spread_log(g["_w"].to_numpy(float), max_rows)])
    return pd.concat(out).drop(columns="_w") if out else df.drop(columns="_w").iloc[:0]


def _version_key(fw: str):
    name, _, ver = fw.partition(" ")
    nums = [int(x) for x in re.findall(r"\d+", ver)]
    return nums


def pick_aic(df: pd.DataFrame) -> pd.DataFrame:
    """One AIConfigurator framework per (device, op) for the kernel tables; collectives as documented."""
    keep = []
    for (dev, op), g in df.groupby(["device", "op"], sort=True):
        fws = g["framework"].unique().tolist()
        if op in AIC_TABLE_OPS:
            chosen = None
            for pref in FRAMEWORK_PREFERENCE:
                cands = [f for f in fws if f.split(" ")[0] == pref]
                if cands:
                    chosen = max(cands, key=_version_key)
                    break
            chosen = chosen or max(fws, key=_version_key)
            sel = g[g["framework"] == chosen]
            if op in ("attn_prefill", "attn_decode"):
                w = sel["window"].to_numpy(float)
                sel = sel[np.isnan(w) | (w == 0)]
            keep.append(sel)
        else:  # collectives
            ccl = [f for f in fws if f.split(" ")[0] in ("nccl", "oneccl")]
            if ccl:
                keep.append(g[g["framework"] == max(ccl, key=_version_key)])
            if op == "allreduce":
                # custom all-reduce of the framework chosen for the kernel tables
                for pref in FRAMEWORK_PREFERENCE:
                    cands = [f for f in fws if f.split(" ")[0] == pref]
                    if cands:
                        sel = g[g["framework"] == max(cands, key=_version_key)]
                        v = sel["variant"].astype(str)
                        graph = v.str.contains("graph")
                        keep.append(sel[graph] if graph.any() else sel)
                        break
    return pd.concat(keep, ignore_index=True) if keep else df.iloc[:0]


def pick_vidur(df: pd.DataFrame, aic_attention_devices: set) -> pd.DataFrame:
    keep = []
    for (dev, op), g in df.groupby(["device", "op"], sort=True):
        if op in ("attn_prefill", "attn_decode") and dev in aic_attention_devices:
            continue
        fws = g["framework"].unique().tolist()
        head = [f for f in fws if f.endswith("7d47513")]
        chosen = head[0] if head else max(fws, key=lambda f: (g["framework"] == f).sum())
        keep.append(g[g["framework"] == chosen])
    return pd.concat(keep, ignore_index=True) if keep else df.iloc[:0]


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (device, op, shape, formats, framework, ...): repeated measurements of one
    kernel collapse to their median, and of several kernels the fastest kernel is kept."""
    key = [c for c in schema.COLUMNS if c not in ("time_s", "kernel", "model")]
    df = df.reset_index(drop=True)
    kk = key + ["kernel"]
    med = df.groupby(kk, dropna=False, sort=False)["time_s"].transform("median")
    df = df.assign(time_s=med).drop_duplicates(subset=kk, keep="first")
    return df.sort_values("time_s", kind="stable").drop_duplicates(subset=key, keep="first")


def curate(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    parts = []
    aic = tables.get("aiconfigurator")
    aic_attn_devs = set()
    if aic is not None and len(aic):
        aic = pick_aic(aic)
        aic_attn_devs = set(aic.loc[aic["op"].isin(["attn_prefill", "attn_decode"]), "device"])
        parts.append(aic)
    if tables.get("vidur") is not None and len(tables["vidur"]):
        parts.append(pick_vidur(tables["vidur"], aic_attn_devs))
    for name in ("aiter", "llmcompass"):
        if tables.get(name) is not None and len(tables[name]):
            parts.append(tables[name])
    allrows = dedupe(schema.concat(parts))
    out = {}
    for dev, d in allrows.groupby("device", sort=True):
        picked = []
        for (op, src), g in d.groupby(["op", "source"], sort=True):
            picked.append(sample_group(g, op, src))
        res = schema.concat(picked)
        res = res.sort_values(["op", "source", "framework", "dtype", "time_s"], kind="stable",
                              na_position="last").reset_index(drop=True)
        out[dev] = schema.validate(res, where=f"curated {dev}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="measured-data folder (default: MIST_SHARED_DATA or shared/data)")
    ap.add_argument("--out", default=str(REPO / "traces" / "ops"))
    args = ap.parse_args(argv)
    if args.data:
        os.environ["MIST_SHARED_DATA"] = args.data
    tables = {}
    for name in ("vidur", "aiconfigurator", "aiter", "llmcompass"):
        tables[name] = load_source(name)
        print(f"loaded {name}: {len(tables[name]):,} rows", flush=True)
    cur = curate(tables)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    total = 0
    for dev, df in cur.items():
        f = out / f"{dev}.parquet"
        df.to_parquet(f, index=False, compression="zstd")
        total += f.stat().st_size
        print(f"{f.name}: {len(df):,} rows, {f.stat().st_size / 1e3:.0f} kB")
    print(f"total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
