"""NVIDIA AIConfigurator perf database (ai-dynamo/aiconfigurator, Apache-2.0) -> op table.

Reads ``<system>/<op family>/<backend>/<version>/<table>.{parquet,csv,txt}`` anywhere under
the given directory (the layout of ``aiconfigurator_core/systems/data``). Systems mapped:
``a100_sxm`` -> A100-SXM-80GB (its rows say "NVIDIA A100-SXM4-80GB"), ``h100_sxm`` ->
H100-SXM, ``h200_sxm`` -> H200-SXM, ``b60`` -> B60 (Intel Arc Pro B60). Other systems
(B200, GB200, L40S, ...) have no catalog entry and are skipped with a warning.

Tables read (``latency`` is in MILLISECONDS):

* ``gemm_perf`` -> ``gemm`` (m, n, k as stored; ``gemm_dtype`` kept raw in ``variant``).
* ``context_attention_perf`` -> ``attn_prefill``: ``q_len = isl``, ``kv_len = isl + step``
  (step is 0: no prefix). ``generation_attention_perf`` -> ``attn_decode``: ``isl`` is 1 and
  ``step`` tokens are already cached, so ``q_len = 1``, ``kv_len = isl + step`` (AIC itself
  indexes these rows by ``s = isl + step``). Heads are per GPU (AIC sweeps per-GPU heads).
* ``context_mla_perf`` / ``generation_mla_perf`` -> ``mla_prefill`` / ``mla_decode``
  (per-GPU ``num_heads``, ``tp = tp_size``).
* ``moe_perf`` -> ``moe`` (model-level hidden / inter / experts; ``tp = moe_tp_size``,
  ``ep = moe_ep_size``; routing ``distribution`` in ``name``).
* ``nccl_perf`` / ``oneccl_perf`` -> allreduce / allgather / alltoall / reducescatter and
  ``custom_allreduce_perf`` -> allreduce. ``message_size`` counts ELEMENTS: it is multiplied
  by the element size of ``nccl_dtype`` / ``allreduce_dtype`` to give ``message_bytes``.

``framework`` is "<backend folder> <version folder>" (e.g. "vllm 0.14.0", "nccl 2.27.3"): the
folder, not the ``version`` column, because a few tables carry a stale version string.
Folders holding only ``reuse.yaml`` (tables copied from another version) add no rows.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema
from ._common import MS, require_files, source_dir

SOURCE = "aiconfigurator"
SUBDIR = "aiconfigurator"

#: AIC system folder -> catalog device.
SYSTEMS: dict[str, str] = {
    "a100_sxm": "A100-SXM-80GB",
    "h100_sxm": "H100-SXM",
    "h200_sxm": "H200-SXM",
    "b60": "B60",
}
#: AIC systems without a catalog entry (skipped).
UNMAPPED_SYSTEMS = ("a100_pcie", "a30", "b200_sxm", "b300_sxm", "gb200", "gb300", "h100_pcie",
                    "l4", "l40s", "rtx_pro_6000_server")

#: table stem -> op (None: several ops, decided per row)
TABLES: dict[str, str | None] = {
    "gemm_perf": "gemm",
    "context_attention_perf": "attn_prefill",
    "generation_attention_perf": "attn_decode",
    "context_mla_perf": "mla_prefill",
    "generation_mla_perf": "mla_decode",
    "moe_perf": "moe",
    "nccl_perf": None,
    "oneccl_perf": None,
    "custom_allreduce_perf": "allreduce",
}

COLLECTIVE_OPS = {"all_reduce": "allreduce", "all_gather": "allgather", "alltoall": "alltoall",
                  "all_to_all": "alltoall", "reduce_scatter": "reducescatter"}

#: bytes per element of the collective dtypes AIC records
ELEMENT_BYTES = {"half": 2, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float": 4,
                 "float32": 4, "fp32": 4, "int8": 1, "fp8": 1, "uint8": 1}

#: quantisation label -> (activation/compute dtype, weight dtype)
QUANT: dict[str, tuple[str, str]] = {
    "bfloat16": ("bf16", "bf16"), "float16": ("fp16", "fp16"), "half": ("fp16", "fp16"),
    "fp8": ("fp8", "fp8"), "fp8_block": ("fp8", "fp8"), "fp8_static": ("fp8", "fp8"),
    "fp8_ootb": ("fp8", "fp8"),
    "int8_wo": ("bf16", "int8"), "int4_wo": ("bf16", "int4"), "sq": ("int8", "int8"),
    "w4a16_mxfp4": ("bf16", "fp4"), "w4afp8": ("fp8", "int4"), "w4a8_mxfp4_mxfp8": ("fp8", "fp4"),
    "nvfp4": ("fp4", "fp4"), "mxfp4": ("fp4", "fp4"), "int8": ("int8", "int8"),
}


def _quant(labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    low = labels.astype(str).str.lower()
    act = low.map(lambda s: QUANT.get(s, (schema.DTYPE_ALIASES.get(s), schema.DTYPE_ALIASES.get(s)))[0])
    w = low.map(lambda s: QUANT.get(s, (schema.DTYPE_ALIASES.get(s), schema.DTYPE_ALIASES.get(s)))[1])
    return act.to_numpy(object), w.to_numpy(object)


def _dt(labels: pd.Series) -> np.ndarray:
    return labels.astype(str).str.lower().map(lambda s: schema.DTYPE_ALIASES.get(s)).to_numpy(object)


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path)


def _locate(path: Path):
    """(system, backend, version) from ``.../<system>/<family>/<backend>/<version>/<file>``."""
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        low = parts[i].lower()
        if low in SYSTEMS or low in UNMAPPED_SYSTEMS:
            rest = parts[i + 1:-1]
            backend = rest[1] if len(rest) >= 3 else None
            version = rest[2] if len(rest) >= 3 else None
            return low, backend, version
    return None, None, None


def _col(df, name, default=np.nan):
    return df[name].to_numpy() if name in df.columns else np.full(len(df), default, dtype=object)


def _num(df, name, default=np.nan):
    if name not in df.columns:
        return np.full(len(df), default, dtype=float)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)


def _convert(df: pd.DataFrame, stem: str, device: str, framework: str) -> pd.DataFrame | None:
    n = len(df)
    if n == 0 or "latency" not in df.columns:
        return None
    out = {"device": np.full(n, device, dtype=object), "source": SOURCE, "framework": framework,
           "kernel": _col(df, "kernel_source", None), "time_s": _num(df, "latency") * MS}
    op = TABLES[stem]
    if stem == "gemm_perf":
        act, w = _quant(df["gemm_dtype"])
        out.update(op="gemm", m=_num(df, "m"), n=_num(df, "n"), k=_num(df, "k"), dtype=act, w_dtype=w,
                   variant=df["gemm_dtype"].astype(str).to_numpy(object))
    elif stem in ("context_attention_perf", "generation_attention_perf"):
        if "beam_width" in df.columns:
            keep = _num(df, "beam_width", 1) == 1
            df = df[keep]
            out = {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in out.items()}
        isl = _num(df, "isl")
        step = _num(df, "step", 0)
        out.update(op=op, batch=_num(df, "batch_size"), q_len=isl, kv_len=isl + np.nan_to_num(step),
                   num_heads=_num(df, "num_heads"), num_kv_heads=_num(df, "num_key_value_heads"),
                   head_dim=_num(df, "head_dim", 128), window=_num(df, "window_size", 0),
                   dtype=_dt(df["attn_dtype"]) if "attn_dtype" in df.columns else None,
                   kv_dtype=_dt(df["kv_cache_dtype"]) if "kv_cache_dtype" in df.columns else None)
    elif stem in ("context_mla_perf", "generation_mla_perf"):
        isl = _num(df, "isl")
        step = _num(df, "step", 0)
        tp = _num(df, "tp_size")
        heads = _num(df, "num_heads") if "num_heads" in df.columns else 128 / tp
        out.update(op=op, batch=_num(df, "batch_size"), q_len=isl, kv_len=isl + np.nan_to_num(step),
                   num_heads=heads, tp=tp,
                   dtype=_dt(df["mla_dtype"]) if "mla_dtype" in df.columns else None,
                   kv_dtype=_dt(df["kv_cache_dtype"]) if "kv_cache_dtype" in df.columns else None)
    elif stem == "moe_perf":
        act, w = _quant(df["moe_dtype"])
        out.update(op="moe", num_tokens=_num(df, "num_tokens"), hidden=_num(df, "hidden_size"),
                   inter=_num(df, "inter_size"), num_experts=_num(df, "num_experts"), top_k=_num(df, "topk"),
                   tp=_num(df, "moe_tp_size", 1), ep=_num(df, "moe_ep_size", 1), dtype=act, w_dtype=w,
                   variant=df["moe_dtype"].astype(str).to_numpy(object),
                   name=_col(df, "distribution", None))
    elif stem in ("nccl_perf", "oneccl_perf", "custom_allreduce_perf"):
        dcol = "allreduce_dtype" if stem == "custom_allreduce_perf" else "nccl_dtype"
        dts = df[dcol].astype(str).str.lower() if dcol in df.columns else pd.Series(["bfloat16"] * n)
        nbytes = dts.map(ELEMENT_BYTES).to_numpy(dtype=float)
        ops = df["op_name"].astype(str).str.lower().map(COLLECTIVE_OPS).to_numpy(object) \
            if stem != "custom_allreduce_perf" else np.full(n, "allreduce", dtype=object)
        variant = None
        for vc in ("backend", "implementation"):
            if vc in df.columns:
                variant = df[vc].astype(str).to_numpy(object)
        out.update(op=ops, message_bytes=_num(df, "message_size") * nbytes, num_devices=_num(df, "num_gpus"),
                   num_nodes=1.0, dtype=_dt(dts), variant=variant)
    else:
        return None
    res = pd.DataFrame(out, index=pd.RangeIndex(len(df)))
    res = res[res["op"].notna().to_numpy() & np.isfinite(res["time_s"].to_numpy()) & (res["time_s"].to_numpy() > 0)]
    return res


def load(path=None, *, devices=None, ops=None) -> pd.DataFrame:
    """All AIConfigurator measurements under ``path`` (default: shared/data/aiconfigurator).

    ``devices`` / ``ops`` (optional iterables of catalog device names / op names) restrict
    which tables are read, which is much faster than filtering afterwards (the full H100 +
    H200 database is ~3 million rows).
    """
    root = source_dir(SOURCE, SUBDIR, path)
    want_dev = None if devices is None else {schema.canonical_device(d) for d in devices}
    want_ops = None if ops is None else set(ops)
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root])
                   if p.is_file() and p.stem in TABLES and p.suffix in (".parquet", ".csv", ".txt"))
    require_files(SOURCE, root, files)
    frames = []
    skipped = set()
    for f in files:
        system, backend, version = _locate(f)
        if system is None or system not in SYSTEMS:
            skipped.add(system or str(f.parent))
            continue
        device = SYSTEMS[system]
        if want_dev is not None and device not in want_dev:
            continue
        op = TABLES[f.stem]
        if want_ops is not None and op is not None and op not in want_ops:
            continue
        if want_ops is not None and op is None and not (want_ops & set(COLLECTIVE_OPS.values())):
            continue
        df = _read(f)
        if backend is None:  # not in the usual layout: fall back to the table's own columns
            backend = str(df["framework"].iloc[0]) if "framework" in df.columns and len(df) else "unknown"
            version = str(df["version"].iloc[0]) if "version" in df.columns and len(df) else ""
        framework = f"{backend.lower()} {version}".strip()
        conv = _convert(df, f.stem, device, framework)
        if conv is not None and len(conv):
            if want_ops is not None:
                conv = conv[conv["op"].isin(want_ops)]
            frames.append(conv)
    if skipped and want_dev is None:
        warnings.warn(f"aiconfigurator: skipped systems without a catalog device: {', '.join(sorted(skipped))}")
    if not frames:
        return schema.empty_table()
    return schema.finalize(pd.concat(frames, ignore_index=True))
