"""Vidur operator profiles (microsoft/vidur, MIT) -> the normalised op table.

Reads, anywhere under the given directory (Vidur's own layout, e.g.
``data/profiling/compute/<dev>/<org>/<model>/mlp.csv`` and
``data/profiling/network/<dev>_<topology>/{all_reduce,send_recv}.csv``, plus the older
``data/profiling/<dev>/{mlp,attention,all_reduce,cpu_overheads}.csv`` layout):

* ``mlp.csv`` -- per-layer op times by ``num_tokens`` and TP. The four linear layers become
  GEMMs using the model dims in the file, sharded as vLLM shards them (Megatron style):
  ``attn_pre_proj`` (QKV) m=T, k=E, n=(H + 2*H_kv)*D/tp; ``attn_post_proj`` (O) m=T,
  k=H*D/tp, n=E; ``mlp_up_proj`` m=T, k=E, n=I*(2 if gated)/tp; ``mlp_down_proj`` m=T,
  k=I/tp, n=E. The norms become ``layernorm`` (m=T, n=E); rope/act/add/embedding become
  ``elementwise`` rows named after the op.
* ``attention.csv`` -- prefill rows (``batch`` 1, ``q_len`` = chunk, ``kv_len`` = cached +
  chunk) and decode rows (``q_len`` 1, ``kv_len`` = cached + 1), heads divided by TP.
* ``all_reduce.csv`` / ``send_recv.csv`` -- ``size`` is already in bytes (fp16 payload).
* ``cpu_overheads.csv`` -- schedule / sampler / prepare_inputs / process_outputs / ray_comm.

Times are Vidur's medians (``time_stats.<op>.median``), in milliseconds -> seconds.
Device folders: a100 -> A100-SXM-80GB (Vidur profiled 80 GB DGX A100s), h100 -> H100-SXM,
a40 -> A40; v100 and the 2023 key-by-n_embd network files (no ``size`` column) are skipped.
Compute dtype is fp16 throughout (Vidur's profiler).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema
from ._common import MS, assemble, require_files, source_dir

SOURCE = "vidur"
SUBDIR = "vidur"
HEAD_COMMIT = "7d47513"

#: Vidur device folder prefix -> catalog device.
DEVICE_KEYS: dict[str, str] = {"a100": "A100-SXM-80GB", "h100": "H100-SXM", "a40": "A40"}
#: Known Vidur device folders that have no catalog entry (skipped).
SKIPPED_DEVICE_KEYS = ("v100",)

#: (n_head, n_kv_head, n_embd, n_expanded_embd, vocab_size) -> model, to label old files.
_MODEL_DIMS: dict[tuple, str] = {
    (32, 32, 2560, 10240, 51200): "microsoft/phi-2",
    (40, 40, 5120, 13824, 103168): "internlm/internlm-20b",
    (64, 64, 8192, 24576, 152064): "Qwen/Qwen-72B",
    (32, 32, 4096, 11008, 32768): "meta-llama/Llama-2-7b-hf",
    (64, 8, 8192, 22016, 32768): "codellama/CodeLlama-34b-Instruct-hf",
    (64, 8, 8192, 28672, 32768): "meta-llama/Llama-2-70b-hf",
    (32, 8, 4096, 14336, 128256): "meta-llama/Meta-Llama-3-8B",
    (64, 8, 8192, 28672, 128256): "meta-llama/Meta-Llama-3-70B",
}

_LAYERNORM_OPS = ("input_layernorm", "post_attention_layernorm")
_ELEMENTWISE_OPS = {"attn_rope": "rope", "mlp_act": "act", "add": "add", "emb": "embedding"}
_CPU_OPS = {
    "schedule": "schedule",
    "sampler_e2e": "sampler",
    "prepare_inputs_e2e": "prepare_inputs",
    "process_model_outputs": "process_outputs",
    "ray_comm_time": "ray_comm",
}
_COLLECTIVES = {"all_reduce": "allreduce", "all_gather": "allgather", "send_recv": "send_recv"}


def _device_info(path: Path):
    """(device, topology variant, skip) from the folder names of a profile file."""
    for part in reversed(path.parent.parts):
        low = part.lower()
        key, _, rest = low.partition("_")
        if key in DEVICE_KEYS:
            return DEVICE_KEYS[key], (rest or None), False
        if key in SKIPPED_DEVICE_KEYS:
            return None, None, True
    return None, None, False


def _framework(path: Path) -> str:
    parts = path.parts
    if "history" in parts:
        i = parts.index("history")
        if i + 1 < len(parts):
            return f"vidur-profiler@{parts[i + 1][:7]}"
    if "head" in parts:
        return f"vidur-profiler@{HEAD_COMMIT}"
    return "vidur-profiler"


def _model_from_path(path: Path, device_part_index: int | None) -> str | None:
    parts = path.parent.parts
    if "compute" in parts:
        i = parts.index("compute")
        rest = parts[i + 2:]  # skip the device folder
        if len(rest) >= 2:
            return f"{rest[-2]}/{rest[-1]}"
        if len(rest) == 1:
            return rest[0]
    return None


def _median(df: pd.DataFrame, op: str):
    for stat in ("median", "mean"):
        c = f"time_stats.{op}.{stat}"
        if c in df.columns:
            return pd.to_numeric(df[c], errors="coerce")
    return None


def _base(_rows, device, framework, **kw):
    d = {"device": device, "source": SOURCE, "framework": framework}
    d.update(kw)
    return d


def _load_mlp(path: Path, device: str, framework: str) -> list[pd.DataFrame]:
    df = pd.read_csv(path)
    need = ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "num_tokens", "num_tensor_parallel_workers"]
    if any(c not in df.columns for c in need):
        warnings.warn(f"vidur: {path} lacks model-dim columns; skipped")
        return []
    nh = df["n_head"].to_numpy(float)
    nkv = df["n_kv_head"].to_numpy(float)
    E = df["n_embd"].to_numpy(float)
    inter = df["n_expanded_embd"].to_numpy(float)
    T = df["num_tokens"].to_numpy(float)
    tp = df["num_tensor_parallel_workers"].to_numpy(float)
    gated = df["use_gated_mlp"].astype(str).str.lower().isin(["true", "1"]).to_numpy() \
        if "use_gated_mlp" in df.columns else np.ones(len(df), bool)
    vocab = df["vocab_size"].to_numpy(float) if "vocab_size" in df.columns else np.full(len(df), np.nan)
    D = E / nh
    h_dev = nh / tp
    kv_dev = np.maximum(1.0, nkv / tp)
    model = _model_from_path(path, None)
    if model is None:
        keys = zip(nh.astype(int), nkv.astype(int), E.astype(int), inter.astype(int),
                   np.nan_to_num(vocab).astype(int))
        models = [_MODEL_DIMS.get(tuple(k)) for k in keys]
    else:
        models = [model] * len(df)
    gemms = {
        "attn_pre_proj": (T, (h_dev + 2 * kv_dev) * D, E),
        "attn_post_proj": (T, E, h_dev * D),
        "mlp_up_proj": (T, inter * np.where(gated, 2, 1) / tp, E),
        "mlp_down_proj": (T, E, inter / tp),
    }
    common = dict(dtype="fp16", tp=tp, model=np.array(models, dtype=object))
    frames = []
    for op, (m, n, k) in gemms.items():
        t = _median(df, op)
        if t is None:
            continue
        frames.append(_base(len(df), device, framework, op="gemm", name=op, w_dtype="fp16",
                            m=m, n=n, k=k, time_s=t.to_numpy() * MS, **common))
    for op in _LAYERNORM_OPS:
        t = _median(df, op)
        if t is not None:
            frames.append(_base(len(df), device, framework, op="layernorm", name=op,
                                m=T, n=E, time_s=t.to_numpy() * MS, **common))
    widths = {"attn_rope": (h_dev + kv_dev) * D, "mlp_act": inter / tp, "add": E, "emb": E}
    for op, name in _ELEMENTWISE_OPS.items():
        t = _median(df, op)
        if t is not None:
            frames.append(_base(len(df), device, framework, op="elementwise", name=name,
                                m=T, n=widths[op], time_s=t.to_numpy() * MS, **common))
    return frames


def _load_attention(path: Path, device: str, framework: str) -> list[pd.DataFrame]:
    df = pd.read_csv(path)
    need = ["n_embd", "n_q_head", "n_kv_head", "num_tensor_parallel_workers", "batch_size",
            "prefill_chunk_size", "kv_cache_size", "is_prefill"]
    if any(c not in df.columns for c in need):
        warnings.warn(f"vidur: {path} is not an attention profile with the expected columns; skipped")
        return []
    tp = df["num_tensor_parallel_workers"].to_numpy(float)
    nh = df["n_q_head"].to_numpy(float)
    nkv = df["n_kv_head"].to_numpy(float)
    D = df["n_embd"].to_numpy(float) / nh
    pre = df["is_prefill"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    chunk = df["prefill_chunk_size"].to_numpy(float)
    cached = df["kv_cache_size"].to_numpy(float)
    kernel = df["attention_backend"].astype(str).str.replace("AttentionBackend.", "", regex=False) \
        if "attention_backend" in df.columns else None
    out = []
    for op, mask, q in (("attn_prefill", pre, chunk), ("attn_decode", ~pre, np.ones(len(df)))):
        t = _median(df, op)
        if t is None or not mask.any():
            continue
        sel = mask
        n = int(sel.sum())
        d = _base(n, device, framework, op=op, batch=df["batch_size"].to_numpy(float)[sel],
                  q_len=q[sel], kv_len=(cached + q)[sel], num_heads=(nh / tp)[sel],
                  num_kv_heads=np.maximum(1.0, nkv / tp)[sel], head_dim=D[sel],
                  dtype="fp16", kv_dtype="fp16", tp=tp[sel],
                  time_s=t.to_numpy()[sel] * MS)
        if kernel is not None:
            d["kernel"] = kernel.to_numpy()[sel]
        out.append(d)
    return out


def _load_network(path: Path, device: str, variant, framework: str) -> list[pd.DataFrame]:
    df = pd.read_csv(path)
    if "size" not in df.columns or "num_workers" not in df.columns:
        warnings.warn(f"vidur: {path} uses the 2023 key-by-model-dims format (no byte 'size'); skipped")
        return []
    coll = df["collective"].astype(str) if "collective" in df.columns else \
        pd.Series([path.stem] * len(df))
    out = []
    for name, op in _COLLECTIVES.items():
        t = _median(df, name)
        mask = (coll == name).to_numpy()
        if t is None or not mask.any():
            continue
        workers = df["num_workers"].to_numpy(float)[mask]
        if "devices_per_node" in df.columns:
            dpn = df["devices_per_node"].to_numpy(float)[mask]
            nodes = np.ceil(workers / dpn)
        else:
            nodes = np.full(mask.sum(), np.nan)
        n = int(mask.sum())
        out.append(_base(n, device, framework, op=op, message_bytes=df["size"].to_numpy(float)[mask],
                         num_devices=workers, num_nodes=nodes, dtype="fp16", variant=variant, kernel="nccl",
                         time_s=t.to_numpy()[mask] * MS))
    return out


def _load_cpu(path: Path, device: str, framework: str) -> list[pd.DataFrame]:
    df = pd.read_csv(path)
    if "batch_size" not in df.columns:
        warnings.warn(f"vidur: {path} has no batch_size column; skipped")
        return []
    tp = df["tensor_parallel_degree"].to_numpy(float) if "tensor_parallel_degree" in df.columns \
        else np.full(len(df), np.nan)
    model = df["model_name"].to_numpy() if "model_name" in df.columns else [None] * len(df)
    out = []
    for col, name in _CPU_OPS.items():
        src = next((c for c in (f"{col}_median", f"{col}_mean") if c in df.columns), None)
        if src is None:
            continue
        n = len(df)
        out.append(_base(n, device, framework, op="cpu_overhead", name=name,
                         batch=df["batch_size"].to_numpy(float), tp=tp, model=np.asarray(model, dtype=object),
                         time_s=pd.to_numeric(df[src], errors="coerce").to_numpy() * MS))
    return out


def load(path=None) -> pd.DataFrame:
    """All Vidur measurements under ``path`` (default: shared/data/vidur) as one normalised table."""
    root = source_dir(SOURCE, SUBDIR, path)
    names = ("mlp.csv", "attention.csv", "all_reduce.csv", "send_recv.csv", "cpu_overheads.csv")
    files = sorted(p for p in (root.rglob("*.csv") if root.is_dir() else [root]) if p.name in names)
    require_files(SOURCE, root, files)
    frames: list[dict] = []
    for f in files:
        device, variant, skip = _device_info(f)
        if skip:
            continue
        if device is None:
            warnings.warn(f"vidur: cannot tell the device of {f} from its folders "
                          f"(expected one of {', '.join(DEVICE_KEYS)}); skipped")
            continue
        fw = _framework(f)
        if f.name == "mlp.csv":
            frames += _load_mlp(f, device, fw)
        elif f.name == "attention.csv":
            frames += _load_attention(f, device, fw)
        elif f.name in ("all_reduce.csv", "send_recv.csv"):
            frames += _load_network(f, device, variant, fw)
        elif f.name == "cpu_overheads.csv":
            frames += _load_cpu(f, device, fw)
    out = assemble(frames)
    out = out[np.isfinite(out["time_s"].to_numpy()) & (out["time_s"].to_numpy() > 0)]
    return out.reset_index(drop=True)
