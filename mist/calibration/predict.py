"""Predict the time of every row of a normalised operator-timing table with the cost model.

The predictions go through :mod:`mist.cost.operators`, the same formulas the simulator's
iteration cost uses, so the parameters fitted against these predictions are exactly the
parameters the simulator runs with.

Rows are grouped by op; each group's columns become `jnp` arrays once (:func:`prepare`), and a
jitted function per op kind maps (params, arrays) -> seconds. Everything that does not depend on
the cost parameters (peak FLOP/s for the row's dtype, bytes per element, which link a collective
runs on) is resolved here in NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..cost import operators as ops
from ..cost.params import Comm, CostParams, Op
from ..specs.dtypes import BYTES_PER_ELEMENT, canonical
from ..specs.hardware import Device

#: op kinds of the table that the cost model predicts -> the parameter class they inform
OP_CLASS: dict[str, tuple[str, int]] = {
    "gemm": ("op", Op.GEMM),
    "attn_prefill": ("op", Op.ATTN_PREFILL),
    "mla_prefill": ("op", Op.ATTN_PREFILL),
    "attn_decode": ("op", Op.ATTN_DECODE),
    "mla_decode": ("op", Op.ATTN_DECODE),
    "moe": ("op", Op.MOE),
    "elementwise": ("op", Op.ELEMENTWISE),
    "softmax": ("op", Op.ELEMENTWISE),
    "layernorm": ("op", Op.ELEMENTWISE),
    "allreduce": ("comm", Comm.ALLREDUCE),
    "allgather": ("comm", Comm.ALLGATHER),
    "reducescatter": ("comm", Comm.ALLGATHER),
    "alltoall": ("comm", Comm.ALLTOALL),
    "send_recv": ("comm", Comm.SEND_RECV),
}
SUPPORTED_OPS: tuple[str, ...] = tuple(OP_CLASS)

#: Shape of MLA heads when a source does not state them (DeepSeek-V2/V3: 512-wide latent KV plus
#: 64 rotary dims; prefill runs the expanded per-head form, 128 nope + 64 rope for q/k, 128 for v).
MLA_LATENT, MLA_ROPE, MLA_QK_PREFILL, MLA_V_PREFILL = 512.0, 64.0, 192.0, 128.0

#: Passes over an (m, n) activation per elementwise kernel, by the table's `name` (read + write;
#: gated activations and residual adds read two inputs).
ELEMENTWISE_PASSES: dict[str, float] = {"act": 3.0, "add": 3.0, "residual": 3.0, "silu_and_mul": 3.0}
DEFAULT_PASSES = 2.0

_DEFAULT_DTYPE = "bf16"


def _dtype_bytes(col: pd.Series, fallback: pd.Series | None = None) -> np.ndarray:
    """Bytes per element of a dtype column (fallback column, then bf16, where missing)."""
    s = col.astype(object)
    if fallback is not None:
        s = s.where(s.notna(), fallback.astype(object))
    s = s.where(s.notna(), _DEFAULT_DTYPE)
    uniq = {u: BYTES_PER_ELEMENT[canonical(u)] for u in pd.unique(s)}
    return s.map(uniq).to_numpy(np.float64)


def _peaks(device: Device, col: pd.Series) -> np.ndarray:
    s = col.astype(object).where(col.notna(), _DEFAULT_DTYPE)
    uniq = {u: device.flops(u) for u in pd.unique(s)}
    return s.map(uniq).to_numpy(np.float64)


def _num(df: pd.DataFrame, c: str, default: float | np.ndarray = np.nan) -> np.ndarray:
    v = df[c].to_numpy(np.float64, na_value=np.nan) if c in df.columns else np.full(len(df), np.nan)
    return np.where(np.isnan(v), default, v)


def _links(device: Device, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(bandwidth, latency) of the link each collective row runs on: the scale-up link when the
    group fits in its domain (and the source does not say the group spans several hosts), else
    the scale-out network."""
    g = _num(df, "num_devices", 1.0)
    nodes = _num(df, "num_nodes", 1.0)
    up = (g <= device.scale_up.domain_size) & (nodes <= 1.0)
    bw = np.where(up, device.scale_up.bandwidth, device.scale_out.bandwidth)
    lat = np.where(up, device.scale_up.latency, device.scale_out.latency)
    return bw, lat


def _arrays(device: Device, op: str, df: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-row inputs of op `op` (float64 NumPy) and a validity mask."""
    bw = np.full(len(df), device.mem_bandwidth)
    a_bytes = _dtype_bytes(df["dtype"]) if "dtype" in df.columns else np.full(len(df), 2.0)
    peak = _peaks(device, df["dtype"]) if "dtype" in df.columns else np.full(len(df), device.flops("bf16"))
    if op == "gemm":
        wb = _dtype_bytes(df["w_dtype"], df["dtype"]) if "w_dtype" in df.columns else a_bytes
        a = dict(m=_num(df, "m"), n=_num(df, "n"), k=_num(df, "k"), peak=peak, bw=bw, wb=wb, ab=a_bytes)
    elif op in ("attn_prefill", "attn_decode", "mla_prefill", "mla_decode"):
        kvb = _dtype_bytes(df["kv_dtype"], df["dtype"]) if "kv_dtype" in df.columns else a_bytes
        heads = _num(df, "num_heads")
        a = dict(batch=_num(df, "batch", 1.0), q_len=_num(df, "q_len", 1.0), kv_len=_num(df, "kv_len"),
                 heads=heads, kv_heads=_num(df, "num_kv_heads", heads), head_dim=_num(df, "head_dim"),
                 window=_num(df, "window", 0.0), peak=peak, bw=bw, kvb=kvb, ab=a_bytes)
        if op in ("attn_decode", "mla_decode"):
            # a sliding window caps the keys a decode step reads (as in the iteration cost)
            a["kv_len"] = np.where(a["window"] > 0, np.minimum(a["kv_len"], a["window"]), a["kv_len"])
        if op == "mla_decode":
            # absorbed MLA: every head reads the shared latent cache (latent + rope per token)
            a["head_dim"] = np.full(len(df), MLA_LATENT + MLA_ROPE)
        elif op == "mla_prefill":
            # expanded MLA: per-head q/k of 192 and v of 128 -> mean width 160 per head
            a["head_dim"] = np.full(len(df), (MLA_QK_PREFILL + MLA_V_PREFILL) / 2.0)
            a["kv_heads"] = heads
    elif op == "moe":
        ep = _num(df, "ep", 1.0)
        tp = _num(df, "tp", 1.0)
        wb = _dtype_bytes(df["w_dtype"], df["dtype"]) if "w_dtype" in df.columns else a_bytes
        a = dict(tokens=_num(df, "num_tokens"), hidden=_num(df, "hidden"), inter=_num(df, "inter"),
                 experts=_num(df, "num_experts"), top_k=_num(df, "top_k"),
                 # the table's tp slices each expert's intermediate (inter / tp); moe_time splits
                 # it over its tp / ep, so pass tp * ep
                 ep=ep, tp=tp * ep, peak=peak, bw=bw, wb=wb, ab=a_bytes)
    elif op in ("elementwise", "softmax", "layernorm"):
        names = df["name"].astype(object) if "name" in df.columns else pd.Series([None] * len(df))
        passes = names.map(lambda v: ELEMENTWISE_PASSES.get(str(v).lower(), DEFAULT_PASSES)).to_numpy(np.float64)
        m, n = _num(df, "m"), _num(df, "n", 1.0)
        a = dict(bytes=passes * m * n * a_bytes, flops=5.0 * m * n, peak=peak, bw=bw)
    elif op in ("allreduce", "allgather", "reducescatter", "alltoall", "send_recv"):
        lbw, lat = _links(device, df)
        g = _num(df, "num_devices", 2.0 if op == "send_recv" else np.nan)
        a = dict(size=_num(df, "message_bytes"), group=g, link_bw=lbw, lat=lat)
    else:
        raise KeyError(op)
    ok = np.ones(len(df), bool)
    for v in a.values():
        ok &= np.isfinite(v)
    for key in ("m", "n", "k", "kv_len", "heads", "head_dim", "tokens", "hidden", "inter", "experts",
                "top_k", "size", "bytes", "batch", "q_len"):
        if key in a:
            ok &= a[key] > 0
    return a, ok


# ---- the per-op predictors (jitted; params is a pytree argument, the arrays are traced)

def _f_gemm(p, a):
    return ops.gemm_time(p, a["m"], a["n"], a["k"], a["peak"], a["bw"], a["wb"], a["ab"])


def _f_attn_prefill(p, a):
    return ops.attn_prefill_time(p, a["batch"], a["q_len"], a["kv_len"], a["heads"], a["kv_heads"], a["head_dim"],
                                 a["peak"], a["bw"], a["kvb"], a["ab"], 1.0, a["window"])


def _f_attn_decode(p, a):
    # rows with several query tokens per sequence (speculative decoding) count as batch * q_len
    return ops.attn_decode_time(p, a["batch"] * a["q_len"], a["kv_len"], a["heads"], a["kv_heads"], a["head_dim"],
                                a["peak"], a["bw"], a["kvb"], a["ab"])


def _f_mla_decode(p, a):
    return ops.attn_decode_time(p, a["batch"] * a["q_len"], a["kv_len"], a["heads"], 1.0, MLA_LATENT + MLA_ROPE,
                                a["peak"], a["bw"], a["kvb"], a["ab"], d_v=MLA_LATENT,
                                kv_tok_bytes=(MLA_LATENT + MLA_ROPE) * a["kvb"])


def _f_moe(p, a):
    return ops.moe_time(p, a["tokens"], a["hidden"], a["inter"], a["experts"], a["top_k"], a["peak"], a["bw"],
                        a["ep"], a["tp"], a["wb"], a["ab"])


def _f_elementwise(p, a):
    return ops.elementwise_time(p, a["bytes"], a["bw"], a["flops"], a["peak"], 1.0)


def _comm(kind):
    def f(p, a):
        return ops.comm_time(p, kind, a["size"], a["group"], a["link_bw"], a["lat"])
    return f


_FUNCS = {
    "gemm": _f_gemm, "attn_prefill": _f_attn_prefill, "mla_prefill": _f_attn_prefill,
    "attn_decode": _f_attn_decode, "mla_decode": _f_mla_decode, "moe": _f_moe,
    "elementwise": _f_elementwise, "softmax": _f_elementwise, "layernorm": _f_elementwise,
    **{k: _comm(k) for k in ("allreduce", "allgather", "reducescatter", "alltoall", "send_recv")},
}
PREDICTORS = {k: jax.jit(f) for k, f in _FUNCS.items()}


@dataclass
class Prepared:
    """A table turned into arrays once: per op, the row positions (into the original table) and
    the jnp inputs; plus the measured times and how many rows were dropped and why."""

    groups: dict[str, tuple[np.ndarray, dict[str, jnp.ndarray]]]
    measured: np.ndarray  # seconds, per original row (NaN where dropped)
    n_rows: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        idx = [i for i, _ in self.groups.values()]
        return np.sort(np.concatenate(idx)) if idx else np.zeros(0, int)


def bucket(n: int) -> int:
    """Padded length of a group of n rows (powers of two from 64), so that tables of similar
    size share one compiled predictor instead of compiling one per row count."""
    return max(64, 1 << (max(n, 1) - 1).bit_length())


def _pad(v: np.ndarray, size: int) -> np.ndarray:
    """Pad with copies of the last row (valid inputs; the padded outputs are ignored)."""
    return np.concatenate([v, np.repeat(v[-1:], size - len(v))]) if size > len(v) else v


def prepare(device: Device, table: pd.DataFrame) -> Prepared:
    """Group `table` by op and convert each group's columns to jnp arrays (float32)."""
    table = table.reset_index(drop=True)
    ops_col = table["op"].astype(object).to_numpy()
    t = _num(table, "time_s")
    groups, dropped = {}, {}
    for op in pd.unique(ops_col):
        idx = np.flatnonzero(ops_col == op)
        if op not in _FUNCS:
            dropped[f"{op} (not modelled)"] = dropped.get(f"{op} (not modelled)", 0) + len(idx)
            continue
        a, ok = _arrays(device, op, table.iloc[idx])
        ok &= np.isfinite(t[idx]) & (t[idx] > 0)
        if (~ok).any():
            dropped[f"{op} (missing fields)"] = int((~ok).sum())
        if ok.any():
            n = int(ok.sum())
            size = bucket(n)
            groups[op] = (idx[ok], {k: jnp.asarray(_pad(v[ok], size), jnp.float32) for k, v in a.items()})
    return Prepared(groups=groups, measured=t, n_rows=len(table), dropped=dropped)


def predict_prepared(params: CostParams, prep: Prepared) -> dict[str, jnp.ndarray]:
    """Seconds per kept row, per op (jnp, differentiable in params), padded to the group's bucket:
    the first len(prep.groups[op][0]) entries are the rows'."""
    return {op: PREDICTORS[op](params, a) for op, (_, a) in prep.groups.items()}


def predict(params: CostParams, device: Device, table: pd.DataFrame, *, report: bool = True) -> np.ndarray:
    """Predicted seconds for each row of a normalised table (NaN for rows the model cannot
    predict: ops it does not model, such as cpu_overhead, or rows missing a needed field)."""
    prep = prepare(device, table)
    out = np.full(prep.n_rows, np.nan)
    for op, y in predict_prepared(params, prep).items():
        idx = prep.groups[op][0]
        out[idx] = np.asarray(y, np.float64)[: len(idx)]
    if report and prep.dropped:
        import warnings

        warnings.warn("predict: dropped " + ", ".join(f"{n} {k}" for k, n in sorted(prep.dropped.items())),
                      stacklevel=2)
    return out


def op_classes_present(prep: Prepared) -> tuple[set[int], set[int]]:
    """Which Op and Comm parameter classes the prepared rows inform."""
    o, c = set(), set()
    for op in prep.groups:
        kind, i = OP_CLASS[op]
        (o if kind == "op" else c).add(int(i))
    return o, c


__all__ = ["predict", "prepare", "predict_prepared", "Prepared", "SUPPORTED_OPS", "OP_CLASS"]
