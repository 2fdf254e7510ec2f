"""AMD AITER kernel-tuning tables (ROCm/aiter ``aiter/configs``, MIT) -> op table.

Reads every ``*tuned*.csv`` (not ``*untuned*``) anywhere under the given directory:

* GEMM tables (columns ``M, N, K, us``): ``m = M`` tokens, ``n = N`` output features,
  ``k = K`` (aiter computes ``Y[M,N] = X[M,K] W[N,K]^T``). The family comes from the file
  name and is kept in ``variant``: ``bf16`` -> bf16; ``a8w8`` (per-token/row-wise, weight
  format from ``q_dtype_w``: int8 or fp8); ``a8w8_blockscale[_bpreshuffle]`` -> fp8 with
  1x128 / 128x128 block scales; ``a8w8_bpreshuffle`` -> ``q_dtype_w``; ``a4w4_blockscale``
  -> fp4 (MXFP4). Batched GEMM tables (``B`` column) and ``asm_a8w8_gemm.csv`` (no device
  column) are skipped.
* Fused-MoE tables (``token, model_dim, inter_dim, expert, topk, us``): ``num_tokens``,
  ``hidden``, ``inter`` (as tuned, i.e. per device), ``num_experts``, ``top_k``, ``ep = 1``,
  ``tp = 1``; ``dtype`` from ``q_dtype_a``, ``w_dtype`` from ``q_dtype_w``; ``variant`` is
  "<quant type>,<activation>". ``us`` is the total of both stages.

``us`` is in MICROSECONDS (best kernel found by the tuner, each shape timed alone).
Rows with a non-positive or non-finite time (failed tunes) are dropped. The model a
``model_configs/<model>_...csv`` table was tuned for is kept in ``model``.

Devices: gfx942 with 304 CUs -> MI300X (MI325X is also gfx942/304 and cannot be told apart;
the rows are labelled MI300X), gfx942 with 80 CUs -> MI308X, gfx950 with 256 CUs -> MI355X
(MI350X is the same die at lower clocks; AITER's gfx950 tuning targets the MI355X).
Tables without a ``gfx`` column are mapped by ``cu_num`` alone (304/80 -> gfx942,
256 -> gfx950). gfx1250 and other unknown parts are skipped.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema
from ._common import US, require_files, source_dir

SOURCE = "aiter"
SUBDIR = "amd_aiter_tuned_kernels"
FRAMEWORK = "aiter"

#: (gfx, cu_num) -> catalog device
DEVICES: dict[tuple[str, int], str] = {
    ("gfx942", 304): "MI300X",
    ("gfx942", 80): "MI308X",
    ("gfx950", 256): "MI355X",
}
_GFX_BY_CU = {304: "gfx942", 80: "gfx942", 256: "gfx950"}

_TORCH_DTYPES = {
    "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
    "torch.float8_e4m3fn": "fp8", "torch.float8_e4m3fnuz": "fp8", "torch.float8_e5m2": "fp8",
    "torch.int8": "int8", "torch.int4": "int4", "torch.uint8": "int8",
    "torch.float4_e2m1fn_x2": "fp4",
}

_GEMM_FAMILIES = ("a8w8_blockscale_bpreshuffle", "a8w8_blockscale", "a8w8_bpreshuffle",
                  "a4w4_blockscale", "a8w8", "bf16")


def _torch_dtype(series: pd.Series) -> np.ndarray:
    return series.astype(str).str.strip().map(lambda s: _TORCH_DTYPES.get(s, schema.DTYPE_ALIASES.get(s.lower()))) \
        .to_numpy(object)


def _devices(df: pd.DataFrame) -> np.ndarray:
    cu = pd.to_numeric(df["cu_num"], errors="coerce") if "cu_num" in df.columns else pd.Series(np.nan, index=df.index)
    if "gfx" in df.columns:
        gfx = df["gfx"].astype(str).str.strip().str.lower()
    else:
        gfx = cu.map(lambda c: _GFX_BY_CU.get(int(c)) if np.isfinite(c) else None)
    return np.array([DEVICES.get((g, int(c))) if np.isfinite(c) else None
                     for g, c in zip(gfx.to_numpy(object), cu.to_numpy(float))], dtype=object)


def _family_and_model(stem: str):
    """GEMM family named in a file stem, and the model tag left after removing it."""
    low = stem.lower()
    fam = next((f for f in _GEMM_FAMILIES if f in low), None)
    tag = low
    for word in ([fam] if fam else []) + ["tuned", "gemm", "fmoe"]:
        tag = tag.replace(word, "_")
    tag = re.sub(r"_+", "_", tag).strip("_")
    return fam, (tag or None)


def _gemm(df: pd.DataFrame, stem: str) -> pd.DataFrame | None:
    fam, model = _family_and_model(stem)
    n = len(df)
    if fam is None:
        return None
    if fam == "bf16":
        act = _torch_dtype(df["dtype"]) if "dtype" in df.columns else np.full(n, "bf16", dtype=object)
        w = act
    elif fam.startswith("a4w4"):
        act = w = np.full(n, "fp4", dtype=object)
    elif "q_dtype_w" in df.columns:
        w = _torch_dtype(df["q_dtype_w"])
        act = w
    else:  # blockscale tables: fp8 x fp8 with block scales
        act = w = np.full(n, "fp8", dtype=object)
    kernel = df["kernelName"].astype(str).to_numpy(object) if "kernelName" in df.columns else None
    return pd.DataFrame({
        "device": _devices(df), "op": "gemm", "model": model,
        "m": pd.to_numeric(df["M"], errors="coerce"), "n": pd.to_numeric(df["N"], errors="coerce"),
        "k": pd.to_numeric(df["K"], errors="coerce"),
        "dtype": act, "w_dtype": w, "variant": fam, "kernel": kernel,
        "time_s": pd.to_numeric(df["us"], errors="coerce") * US,
    })


def _moe(df: pd.DataFrame, stem: str) -> pd.DataFrame:
    n = len(df)
    _, model = _family_and_model(stem)
    qa = _torch_dtype(df["q_dtype_a"]) if "q_dtype_a" in df.columns else np.full(n, "bf16", dtype=object)
    qw = _torch_dtype(df["q_dtype_w"]) if "q_dtype_w" in df.columns else qa
    qtype = df["q_type"].astype(str).str.replace("QuantType.", "", regex=False) if "q_type" in df.columns \
        else pd.Series(["?"] * n)
    act = df["act_type"].astype(str).str.replace("ActivationType.", "", regex=False).str.lower() \
        if "act_type" in df.columns else pd.Series(["?"] * n)
    kernel = None
    if "kernelName1" in df.columns:
        kernel = (df["kernelName1"].astype(str) + "+" + df.get("kernelName2", pd.Series([""] * n)).astype(str)) \
            .to_numpy(object)
    return pd.DataFrame({
        "device": _devices(df), "op": "moe", "model": model,
        "num_tokens": pd.to_numeric(df["token"], errors="coerce"),
        "hidden": pd.to_numeric(df["model_dim"], errors="coerce"),
        "inter": pd.to_numeric(df["inter_dim"], errors="coerce"),
        "num_experts": pd.to_numeric(df["expert"], errors="coerce"),
        "top_k": pd.to_numeric(df["topk"], errors="coerce"),
        "ep": 1.0, "tp": 1.0, "dtype": qa, "w_dtype": qw,
        "variant": (qtype.str.lower() + "," + act).to_numpy(object), "kernel": kernel,
        "time_s": pd.to_numeric(df["us"], errors="coerce") * US,
    })


def load(path=None) -> pd.DataFrame:
    """All timed AITER tuning rows under ``path`` (default: shared/data/amd_aiter_tuned_kernels)."""
    root = source_dir(SOURCE, SUBDIR, path)
    files = sorted(p for p in (root.rglob("*.csv") if root.is_dir() else [root])
                   if "tuned" in p.name and "untuned" not in p.name)
    require_files(SOURCE, root, files)
    frames = []
    for f in files:
        df = pd.read_csv(f, skipinitialspace=True)
        df.columns = [c.strip() for c in df.columns]
        if len(df) == 0 or "us" not in df.columns:
            continue
        cols = set(df.columns)
        if {"M", "N", "K"} <= cols and not ({"B", "b"} & cols):
            conv = _gemm(df, f.stem)
        elif {"token", "model_dim", "inter_dim", "expert", "topk"} <= cols:
            conv = _moe(df, f.stem)
        else:
            conv = None  # batched GEMM, gated-delta-net and other kernels
        if conv is None:
            continue
        t = conv["time_s"].to_numpy(float)
        conv = conv[conv["device"].notna().to_numpy() & np.isfinite(t) & (t > 0)]
        if len(conv):
            frames.append(conv)
    if not frames:
        warnings.warn(f"aiter: no timed rows for a known device under {root}")
        return schema.empty_table()
    out = pd.concat(frames, ignore_index=True)
    out["source"] = SOURCE
    out["framework"] = FRAMEWORK
    return schema.finalize(out)
