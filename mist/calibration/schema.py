"""The normalised operator-timing table: column list, vocabularies and validation.

Every loader in :mod:`mist.calibration.sources` returns a DataFrame with exactly
:data:`COLUMNS` (in that order), one row per measurement. Fields that do not apply to a
row's op are NaN. Units are SI: seconds for ``time_s``, bytes for ``message_bytes``.

Shape conventions
-----------------
gemm
    ``m, n, k`` with ``C[m, n] = A[m, k] @ B[k, n]``; ``m`` is the token dimension.
    ``dtype`` is the activation/compute format, ``w_dtype`` the weight format
    (they differ for weight-only quantisation, e.g. bf16 x int4).
attn_prefill / attn_decode / mla_prefill / mla_decode
    ``batch`` sequences, each with ``q_len`` new tokens and ``kv_len`` total context
    (including the new tokens). ``num_heads`` / ``num_kv_heads`` are the heads ONE device
    sees (already divided by ``tp`` where the source did that); ``head_dim`` per head.
    ``window`` is the sliding-window length (0 = full attention, NaN = not stated).
moe
    ``num_tokens`` routed tokens, model-level ``hidden`` / ``inter`` / ``num_experts`` /
    ``top_k``; the kernel ran the slice given by ``tp`` (inter / tp) and ``ep``
    (num_experts / ep local experts).
allreduce / allgather / alltoall / reducescatter / send_recv
    ``message_bytes`` is the per-rank buffer size in bytes, ``num_devices`` the group size,
    ``num_nodes`` how many hosts the group spans (NaN = not stated, usually 1).
cpu_overhead
    ``name`` is the sub-kind ("schedule", "sampler", "prepare_inputs", "process_outputs",
    "ray_comm"), ``batch`` the batch size.
elementwise / softmax / layernorm
    ``m`` rows (tokens) by ``n`` columns; a flat op of N elements is ``m = N, n = 1``.
    ``name`` says which elementwise op ("rope", "act", "add", "embedding", "gelu" ...).

Bookkeeping columns: ``model`` (the model the shape came from, when known), ``framework``
(e.g. "vllm 0.14.0", "nccl 2.27.3", "aiter"), ``kernel`` (kernel / implementation name
as recorded), ``variant`` (the source's own label for the quantisation scheme, topology,
routing distribution, ...), ``source`` (which dataset).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

#: Canonical catalog device names a row may carry.
DEVICES: tuple[str, ...] = (
    "A100-SXM-80GB", "A100-SXM-40GB", "H100-SXM", "H200-SXM", "A40", "B60",
    "MI300X", "MI325X", "MI308X", "MI355X", "MI350X", "MI210",
)

#: Op vocabulary.
OPS: tuple[str, ...] = (
    "gemm", "attn_prefill", "attn_decode", "moe",
    "allreduce", "allgather", "alltoall", "reducescatter", "send_recv",
    "cpu_overhead", "elementwise", "softmax", "layernorm", "mla_prefill", "mla_decode",
)

COLLECTIVE_OPS: tuple[str, ...] = ("allreduce", "allgather", "alltoall", "reducescatter", "send_recv")
ATTENTION_OPS: tuple[str, ...] = ("attn_prefill", "attn_decode", "mla_prefill", "mla_decode")

#: Datasets the bundled loaders read.
SOURCES: tuple[str, ...] = ("vidur", "aiconfigurator", "aiter", "llmcompass")

#: Numeric formats a dtype / w_dtype / kv_dtype field may hold.
DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4", "int4")

#: String-valued columns.
STR_COLUMNS: tuple[str, ...] = (
    "device", "op", "name", "model", "dtype", "w_dtype", "kv_dtype",
    "framework", "kernel", "variant", "source",
)

#: All columns of the normalised table, in order.
COLUMNS: tuple[str, ...] = (
    "device", "op", "name", "model",
    # gemm / elementwise
    "m", "n", "k",
    # attention
    "batch", "q_len", "kv_len", "num_heads", "num_kv_heads", "head_dim", "window",
    # moe
    "num_tokens", "hidden", "inter", "num_experts", "top_k", "ep",
    # collectives
    "message_bytes", "num_devices", "num_nodes",
    # formats, parallelism, provenance
    "dtype", "w_dtype", "kv_dtype", "tp",
    "framework", "kernel", "variant", "source",
    "time_s",
)

NUM_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in STR_COLUMNS)

#: Columns every row must fill.
REQUIRED_ALWAYS: tuple[str, ...] = ("device", "op", "source", "time_s")

#: Columns a row of each op must fill (besides REQUIRED_ALWAYS).
OP_FIELDS: dict[str, tuple[str, ...]] = {
    "gemm": ("m", "n", "k"),
    "attn_prefill": ("batch", "q_len", "kv_len", "num_heads", "num_kv_heads", "head_dim"),
    "attn_decode": ("batch", "q_len", "kv_len", "num_heads", "num_kv_heads", "head_dim"),
    "mla_prefill": ("batch", "q_len", "kv_len", "num_heads"),
    "mla_decode": ("batch", "q_len", "kv_len", "num_heads"),
    "moe": ("num_tokens", "hidden", "inter", "num_experts", "top_k"),
    "allreduce": ("message_bytes", "num_devices"),
    "allgather": ("message_bytes", "num_devices"),
    "alltoall": ("message_bytes", "num_devices"),
    "reducescatter": ("message_bytes", "num_devices"),
    "send_recv": ("message_bytes", "num_devices"),
    "cpu_overhead": ("name",),
    "elementwise": ("m",),
    "softmax": ("m", "n"),
    "layernorm": ("m", "n"),
}

#: Spellings used by the sources -> canonical dtype.
DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "bf16", "torch.bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "half": "fp16", "fp16": "fp16", "torch.float16": "fp16",
    "float32": "fp32", "float": "fp32", "fp32": "fp32", "torch.float32": "fp32",
    "fp8": "fp8", "float8": "fp8", "fp8_block": "fp8", "fp8_e4m3": "fp8",
    "torch.float8_e4m3fn": "fp8", "torch.float8_e4m3fnuz": "fp8", "float8_e4m3fn": "fp8",
    "int8": "int8", "torch.int8": "int8", "sq": "int8",
    "int4": "int4", "torch.int4": "int4",
    "fp4": "fp4", "nvfp4": "fp4", "mxfp4": "fp4", "torch.float4_e2m1fn_x2": "fp4",
}

#: Other device spellings -> canonical name.
DEVICE_ALIASES: dict[str, str] = {
    "a100": "A100-SXM-80GB", "a100_sxm": "A100-SXM-80GB", "a100-80gb": "A100-SXM-80GB",
    "a100-sxm": "A100-SXM-80GB", "a100-40gb": "A100-SXM-40GB",
    "h100": "H100-SXM", "h100_sxm": "H100-SXM", "h100-sxm5": "H100-SXM",
    "h200": "H200-SXM", "h200_sxm": "H200-SXM",
    "a40": "A40", "b60": "B60",
    "mi300x": "MI300X", "mi325x": "MI325X", "mi308x": "MI308X", "mi355x": "MI355X",
    "mi350x": "MI350X", "mi210": "MI210",
}


def canonical_device(name: str) -> str:
    """Canonical catalog name for a device spelling, or ValueError listing the known ones."""
    s = str(name).strip()
    if s in DEVICES:
        return s
    low = s.lower()
    for d in DEVICES:
        if d.lower() == low:
            return d
    if low in DEVICE_ALIASES:
        return DEVICE_ALIASES[low]
    raise ValueError(f"unknown device '{name}': use one of {', '.join(DEVICES)}")


def canonical_dtype(name) -> str | float:
    """Canonical dtype for a source spelling; NaN when missing, the lower-cased name when unknown."""
    if name is None or (isinstance(name, float) and math.isnan(name)):
        return np.nan
    s = str(name).strip().lower()
    return DTYPE_ALIASES.get(s, s)


def _str_dtype():
    # pandas >= 3 has a NaN-semantics string dtype; on pandas 2 keep object columns.
    return "str" if int(pd.__version__.split(".")[0]) >= 3 else object


def finalize(df) -> pd.DataFrame:
    """Reorder/complete the columns of ``df`` (a DataFrame or a mapping of column -> array)
    to :data:`COLUMNS` with canonical column types.

    Missing columns become NaN; extra columns are dropped. Returns a new frame with a
    fresh RangeIndex.
    """
    if isinstance(df, pd.DataFrame):
        n, have = len(df), set(df.columns)
    else:  # a mapping of column -> array
        have = set(df)
        n = len(next(iter(df.values()))) if df else 0
    out = pd.DataFrame(index=pd.RangeIndex(n))
    sdt = _str_dtype()
    for c in COLUMNS:
        if c in have:
            col = df[c]
            if isinstance(col, pd.Series):
                col = col.astype(object).to_numpy() if isinstance(col.dtype, pd.CategoricalDtype) else col.to_numpy()
        else:
            col = np.full(n, np.nan)
        if c in STR_COLUMNS:
            # factorize first: converting the few distinct values is much cheaper than every row
            codes, uniques = pd.factorize(pd.Series(col, dtype=object), use_na_sentinel=True)
            cats = pd.Index([str(u) for u in uniques], dtype=object)
            cat = pd.Categorical.from_codes(codes, categories=cats) if len(cats) else \
                pd.Categorical([None] * len(codes))
            if sdt == "str":
                out[c] = pd.Series(cat).astype("str")
            else:
                s = pd.Series(cat).astype(object)
                out[c] = s.where(s.notna(), None)
        else:
            col = np.asarray(col)
            if col.dtype.kind in "fiub":
                out[c] = col.astype("float64")
            else:
                out[c] = pd.to_numeric(pd.Series(col), errors="coerce").astype("float64")
    return out


def empty_table() -> pd.DataFrame:
    """A zero-row normalised table."""
    return finalize(pd.DataFrame())


def _first_bad(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def validate(df: pd.DataFrame, where: str = "<table>") -> pd.DataFrame:
    """Check a table against the schema; return it finalised, or raise ValueError.

    The error names ``where`` (the file), the row (0-based position among the data rows)
    and the field, e.g. ``"ops.csv: row 3: field 'time_s': must be a positive finite
    number, got -1.0"``. When several rows are bad, the first one is reported.
    """
    missing = [c for c in REQUIRED_ALWAYS if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing required column(s) {', '.join(missing)} "
                         f"(field '{missing[0]}'); the columns are {', '.join(COLUMNS)}")
    n = len(df)
    problems: list[tuple[int, str, str]] = []  # (row, field, message)

    def note(mask, field, describe):
        i = _first_bad(np.asarray(mask, dtype=bool))
        if i is not None:
            problems.append((i, field, describe(i)))

    raw = df.reset_index(drop=True)
    # numeric columns: must parse, be finite and non-negative
    num = {}
    for c in NUM_COLUMNS:
        if c not in raw.columns:
            continue
        orig = raw[c]
        parsed = pd.to_numeric(orig, errors="coerce")
        num[c] = parsed.to_numpy(dtype="float64", na_value=np.nan)
        given = np.array(orig.notna().to_numpy(), dtype=bool)
        if orig.dtype == object or pd.api.types.is_string_dtype(orig.dtype):
            given &= orig.astype(str).str.strip().ne("").to_numpy()
        bad_parse = given & np.isnan(num[c])
        note(bad_parse, c, lambda i, c=c, o=orig: f"not a number: {o.iloc[i]!r}")
        vals = num[c]
        bad_range = ~np.isnan(vals) & (~np.isfinite(vals) | (vals < 0))
        note(bad_range, c, lambda i, c=c, v=vals: f"must be a finite non-negative number, got {v[i]!r}")

    def s(c):
        if c not in raw.columns:
            return pd.Series([None] * n, dtype=object)
        return raw[c]

    dev = s("device")
    note(~dev.isin(DEVICES).to_numpy(), "device",
         lambda i: f"unknown device {dev.iloc[i]!r} (use one of {', '.join(DEVICES)})")
    op = s("op")
    note(~op.isin(OPS).to_numpy(), "op", lambda i: f"unknown op {op.iloc[i]!r} (use one of {', '.join(OPS)})")
    def blank(col):
        return (col.isna() | col.astype(str).str.strip().eq("")).to_numpy()

    src = s("source")
    note(blank(src), "source", lambda i: "missing")
    t = num.get("time_s", np.full(n, np.nan))
    note(~(np.isfinite(t) & (t > 0)), "time_s",
         lambda i: f"must be a positive finite number of seconds, got {raw['time_s'].iloc[i]!r}")
    for c in ("dtype", "w_dtype", "kv_dtype"):
        col = s(c)
        note((col.notna() & ~col.isin(DTYPES)).to_numpy(), c,
             lambda i, col=col: f"unknown format {col.iloc[i]!r} (use one of {', '.join(DTYPES)})")
    opv = op.to_numpy()
    for o, fields in OP_FIELDS.items():
        is_op = opv == o
        if not is_op.any():
            continue
        for f in fields:
            if f in STR_COLUMNS:
                col = s(f)
                bad = is_op & blank(col)
                note(bad, f, lambda i, o=o: f"required for op '{o}' but empty")
            else:
                vals = num.get(f, np.full(n, np.nan))
                bad = is_op & ~(np.isfinite(vals) & (vals > 0))
                note(bad, f, lambda i, o=o, f=f, v=vals: f"required for op '{o}' (positive number), got {v[i]!r}")
    if problems:
        problems.sort(key=lambda p: p[0])
        i, field, msg = problems[0]
        raise ValueError(f"{where}: row {i}: field '{field}': {msg}")
    return finalize(raw)


def concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate finalised tables (skipping empty ones) into one finalised table."""
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return empty_table()
    frames = [f if tuple(f.columns) == COLUMNS else finalize(f) for f in frames]
    out = pd.concat(frames, ignore_index=True)
    if any(out[c].dtype != frames[0][c].dtype for c in COLUMNS):
        out = finalize(out)
    return out
