"""Loaders for public request traces, each returning a :class:`Requests`.

Formats (``load_trace`` detects them from the extension and header; ``.gz`` is fine):

- ``azure``: Azure LLM inference 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``;
  timestamps are wall-clock datetime strings).
- ``mooncake``: Mooncake FAST'25 JSONL (``timestamp`` in ms, ``input_length``,
  ``output_length``, ``hash_ids`` = ids of the 512-token prefix blocks; equal ids
  mean a reusable KV prefix). The ids go to ``Requests.prefix_hash``.
- ``vidur``: Vidur processed-trace CSV (``arrived_at`` in s, ``num_prefill_tokens``,
  ``num_decode_tokens``).
- ``burstgpt``: BurstGPT CSV (``Timestamp`` in s, ``Model``, ``Request tokens``,
  ``Response tokens``, ``Total tokens``, ``Log Type``; optional ``Session ID``,
  ``Elapsed time``).

Options common to all loaders, applied in this order:

1. Rows are sorted by arrival (stable) and times are made relative to the
   first row of the file (t = 0 at the first request).
2. ``start_s``/``end_s``: keep rows with ``start_s <= t < end_s``; times are then
   shifted so that ``start_s`` is 0.
3. ``first=N`` keeps the first N rows; ``sample=N`` keeps N rows drawn at random
   without replacement (``seed``), in time order. Not both.
4. ``rate=R`` rescales inter-arrival times so the mean rate is R req/s; ``speed=F``
   divides all times by F (2.0 = twice as fast). Not both.
5. ``max_blocks``: keep at most this many prefix-block hash ids per request
   (default: all, i.e. the longest list in the selection).
6. ``capacity``: pad the result to a fixed number of rows.

Zero-length outputs (``zero_output``): a row whose output length is 0 (BurstGPT
logs failed requests this way) is by default **clamped to 1 token**, because a
served request always emits at least its first token during prefill; pass
``zero_output="keep"`` to keep 0 (a prefill-only request) or ``"drop"`` to drop
the row. Rows with a non-positive prompt length or a negative output length are
an error naming the file, line and field, unless ``drop_invalid=True``, which
drops them. Text that does not parse is always an error, e.g.
``azure_conv.csv line 17: field 'ContextTokens': 'abc' is not an integer``.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mist.specs.errors import SpecError

from .requests import Requests, pack_hashes

__all__ = [
    "load_trace", "load_azure", "load_mooncake", "load_vidur", "load_burstgpt",
    "detect_format", "bundled_trace", "bundled_trace_path", "bundled_trace_names", "TRACE_FORMATS",
]

TRACE_FORMATS = ("azure", "mooncake", "vidur", "burstgpt")

# name -> file name in <repo>/traces (or mist/_bundled/traces in an installed wheel)
_BUNDLED = {
    "azure_conv_2023": "azure_conv_2023.csv",
    "azure_code_2023": "azure_code_2023.csv",
    "mooncake_conversation": "mooncake_conversation_3k.jsonl",
}


# ------------------------------------------------------------------------------ helpers
def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _read_csv(path: Path, required: Sequence[str], fmt: str):
    """Read a CSV as strings; check the header has the required columns."""
    import pandas as pd

    name = path.name
    try:
        with _open_text(path) as fh:
            df = pd.read_csv(fh, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise SpecError(f"{name} line 1", "header", "file is empty",
                        f"a {fmt} trace needs a header with {', '.join(required)}") from None
    except pd.errors.ParserError as e:
        raise SpecError(name, "row", f"malformed CSV ({e})",
                        "every row needs the same number of comma-separated fields as the header") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SpecError(f"{name} line 1", missing[0], "column is missing from the header",
                        f"a {fmt} trace needs columns {', '.join(required)}; found {list(df.columns)}")
    return df


def _bad_row(name: str, line: int, field: str, value: Any, what: str, fix: str = "") -> SpecError:
    return SpecError(f"{name} line {line}", field, f"{value!r} {what}", fix)


def _parse_numbers(df, col: str, name: str, integer: bool, header_lines: int = 1) -> np.ndarray:
    """A column as numbers; the first missing or malformed value is an error naming file, line, field."""
    import pandas as pd

    s = df[col]
    raw = s.to_numpy(dtype=object)
    num = pd.to_numeric(s.where(s.notna(), ""), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num) | ((num != np.round(num)) if integer else False)
    if bad.any():
        i = int(np.argmax(bad))
        v = raw[i]
        if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
            raise SpecError(f"{name} line {i + 1 + header_lines}", col, "value is missing",
                            "fill in the value or delete the row")
        if integer:
            raise _bad_row(name, i + 1 + header_lines, col, v, "is not an integer", "token counts are whole numbers")
        raise _bad_row(name, i + 1 + header_lines, col, v, "is not a number", "times are numbers of seconds")
    return num.astype(np.int64) if integer else num


def _parse_ints(df, col: str, name: str, header_lines: int = 1) -> np.ndarray:
    return _parse_numbers(df, col, name, True, header_lines)


def _parse_floats(df, col: str, name: str, header_lines: int = 1) -> np.ndarray:
    return _parse_numbers(df, col, name, False, header_lines)


def _finish(
    name: str,
    t: np.ndarray,
    inp: np.ndarray,
    out: np.ndarray,
    lines: np.ndarray,
    *,
    in_field: str,
    out_field: str,
    time_field: str,
    hashes: list | None = None,
    model: np.ndarray | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    first: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    rate: float | None = None,
    speed: float | None = None,
    max_blocks: int | None = None,
    zero_output: str = "clamp",
    drop_invalid: bool = False,
    pipeline: int = 0,
    capacity: int | None = None,
) -> Requests:
    """Shared post-processing: validation, window, sampling, rescale, packing."""
    where = name
    if zero_output not in ("clamp", "keep", "drop"):
        raise SpecError(where, "zero_output", f"{zero_output!r} is not an option", "use 'clamp', 'keep' or 'drop'")
    if first is not None and sample is not None:
        raise SpecError(where, "sample", "both 'first' and 'sample' given", "pass only one of them")
    if rate is not None and speed is not None:
        raise SpecError(where, "rate", "both 'rate' and 'speed' given", "pass only one of them")
    for opt, v in (("first", first), ("sample", sample)):
        if v is not None and (int(v) != v or v < 0):
            raise SpecError(where, opt, f"{v!r} is not a count >= 0", "pass a whole number of requests")
    for opt, v in (("rate", rate), ("speed", speed)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise SpecError(where, opt, f"must be > 0, got {v!r}", "pass a positive number")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise SpecError(where, "end_s", f"{end_s} is not after start_s {start_s}", "make end_s > start_s")

    keep = np.ones(t.shape[0], bool)
    # negative or non-positive lengths
    bad_in = inp <= 0
    bad_out = out < 0
    if not drop_invalid:
        if bad_in.any():
            i = int(np.argmax(bad_in))
            raise _bad_row(name, int(lines[i]), in_field, int(inp[i]), "is not a positive prompt length",
                           "drop the row, or pass drop_invalid=True to skip such rows")
        if bad_out.any():
            i = int(np.argmax(bad_out))
            raise _bad_row(name, int(lines[i]), out_field, int(out[i]), "is a negative output length",
                           "drop the row, or pass drop_invalid=True to skip such rows")
    keep &= ~bad_in & ~bad_out
    zero = out == 0
    if zero_output == "drop":
        keep &= ~zero
    elif zero_output == "clamp":
        out = np.where(zero, 1, out)

    idx = np.nonzero(keep)[0]
    order = idx[np.argsort(t[idx], kind="stable")]
    t = t[order]
    if t.size:
        t = t - t[0]
    # time window
    lo = 0.0 if start_s is None else float(start_s)
    hi = np.inf if end_s is None else float(end_s)
    win = (t >= lo) & (t < hi)
    order, t = order[win], t[win] - lo
    # sampling
    if first is not None:
        order, t = order[: int(first)], t[: int(first)]
    elif sample is not None:
        if sample > order.size:
            raise SpecError(where, "sample", f"asks for {sample} requests but only {order.size} are selected",
                            "lower 'sample' or widen the time window")
        pick = np.sort(np.random.default_rng(seed).choice(order.size, size=int(sample), replace=False))
        order, t = order[pick], t[pick]
    # rescale
    if speed is not None:
        t = t / float(speed)
    elif rate is not None and t.size > 1:
        span = t[-1] - t[0]
        if span <= 0:
            raise SpecError(where, "rate", "all selected requests arrive at the same instant; cannot rescale",
                            "use speed=..., or select more requests")
        cur = (t.size - 1) / span
        t = t[0] + (t - t[0]) * (cur / float(rate))
    ph = None
    if hashes is not None:
        ph = pack_hashes([hashes[i] for i in order], max_blocks)
    return Requests.from_numpy(
        t, inp[order], out[order], prefix_hash=ph,
        pipeline=pipeline, model=None if model is None else model[order],
        capacity=capacity, source=name,
    )


def _opts_doc(f):
    f.__doc__ = (f.__doc__ or "") + """
    Options (see the module docstring): start_s, end_s, first, sample, seed, rate,
    speed, max_blocks, zero_output ('clamp' | 'keep' | 'drop'), drop_invalid,
    pipeline (id for all rows), capacity.
    """
    return f


# ------------------------------------------------------------------------------ loaders
@_opts_doc
def load_azure(path: str | Path, **opts: Any) -> Requests:
    """Azure LLM inference trace 2023 CSV: TIMESTAMP (datetime), ContextTokens, GeneratedTokens."""
    import pandas as pd

    path = Path(path)
    name = path.name
    df = _read_csv(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), "azure")
    ts_raw = df["TIMESTAMP"]
    ts = pd.to_datetime(ts_raw.str.strip(), format="ISO8601", errors="coerce")
    bad = ts.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise _bad_row(name, i + 2, "TIMESTAMP", ts_raw.iloc[i], "is not a date-time",
                       "use 'YYYY-MM-DD HH:MM:SS.fffffff'")
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert(None)
    ns = ts.to_numpy().astype("datetime64[ns]").astype(np.int64)
    t = (ns - ns.min()) / 1e9 if ns.size else ns.astype(np.float64)
    inp = _parse_ints(df, "ContextTokens", name)
    out = _parse_ints(df, "GeneratedTokens", name)
    return _finish(name, t, inp, out, np.arange(len(df)) + 2, in_field="ContextTokens",
                   out_field="GeneratedTokens", time_field="TIMESTAMP", **opts)


@_opts_doc
def load_vidur(path: str | Path, **opts: Any) -> Requests:
    """Vidur processed-trace CSV: arrived_at (s), num_prefill_tokens, num_decode_tokens.

    Vidur's length-only files (no ``arrived_at``, e.g. the arXiv summarisation
    stats) have no arrival times: sample their lengths with
    ``synthetic.Empirical`` and pick an arrival process instead.
    """
    path = Path(path)
    name = path.name
    df = _read_csv(path, ("num_prefill_tokens", "num_decode_tokens"), "vidur")
    if "arrived_at" not in df.columns:
        raise SpecError(f"{name} line 1", "arrived_at", "column is missing: this file has lengths but no arrival times",
                        "use its num_prefill_tokens/num_decode_tokens as synthetic.Empirical lengths "
                        "with a synthetic arrival process")
    t = _parse_floats(df, "arrived_at", name)
    inp = _parse_ints(df, "num_prefill_tokens", name)
    out = _parse_ints(df, "num_decode_tokens", name)
    return _finish(name, t, inp, out, np.arange(len(df)) + 2, in_field="num_prefill_tokens",
                   out_field="num_decode_tokens", time_field="arrived_at", **opts)


@_opts_doc
def load_burstgpt(path: str | Path, *, models: Sequence[str] | None = None,
                  log_type: str | None = None, **opts: Any) -> Requests:
    """BurstGPT CSV: Timestamp (s), Model, Request tokens, Response tokens, Total tokens, Log Type.

    ``models``: keep only rows whose Model is listed; the row's ``model`` id is the
    index in this list (default: all rows, model id 0). ``log_type``: keep only rows
    with this Log Type (e.g. "Conversation log" or "API log"). Failed requests
    (Response tokens 0) are clamped to 1 output token by default (``zero_output``).
    """
    path = Path(path)
    name = path.name
    df = _read_csv(path, ("Timestamp", "Model", "Request tokens", "Response tokens"), "burstgpt")
    lines = np.arange(len(df)) + 2
    t = _parse_floats(df, "Timestamp", name)
    inp = _parse_ints(df, "Request tokens", name)
    out = _parse_ints(df, "Response tokens", name)
    sel = np.ones(len(df), bool)
    model = None
    if log_type is not None:
        if "Log Type" not in df.columns:
            raise SpecError(f"{name} line 1", "Log Type", "column is missing", "drop the log_type option")
        sel &= (df["Log Type"].str.strip() == log_type).to_numpy()
    if models is not None:
        models = list(models)
        m = df["Model"].str.strip()
        sel &= m.isin(models).to_numpy()
        lut = {k: i for i, k in enumerate(models)}
        model = np.array([lut.get(x, 0) for x in m], dtype=np.int64)
    if not sel.all():
        t, inp, out, lines = t[sel], inp[sel], out[sel], lines[sel]
        model = None if model is None else model[sel]
    return _finish(name, t, inp, out, lines, in_field="Request tokens", out_field="Response tokens",
                   time_field="Timestamp", model=model, **opts)


@_opts_doc
def load_mooncake(path: str | Path, **opts: Any) -> Requests:
    """Mooncake JSONL: one JSON object per line with timestamp (ms), input_length,
    output_length and optional hash_ids (512-token prefix-block ids -> prefix_hash)."""
    path = Path(path)
    name = path.name
    ts, inp, out, hashes, lines = [], [], [], [], []

    def need_int(obj, key, ln, allow_missing=False):
        if key not in obj:
            if allow_missing:
                return None
            raise SpecError(f"{name} line {ln}", key, "is missing", f"each line needs {key}")
        v = obj[key]
        ok = (isinstance(v, int) and not isinstance(v, bool)) or \
            (isinstance(v, float) and bool(np.isfinite(v)) and v == int(v))
        if not ok:
            raise _bad_row(name, ln, key, v, "is not an integer", "token counts are whole numbers")
        return int(v)

    with _open_text(path) as fh:
        for ln, line in enumerate(fh, start=1):
            s = line.strip()
            if not s:
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise SpecError(f"{name} line {ln}", "<json>", f"is not valid JSON ({e.msg} at column {e.colno})",
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise SpecError(f"{name} line {ln}", "<json>", "is not a JSON object", "each line must be {...}")
            v = obj.get("timestamp")
            if "timestamp" not in obj:
                raise SpecError(f"{name} line {ln}", "timestamp", "is missing", "each line needs timestamp (ms)")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise _bad_row(name, ln, "timestamp", v, "is not a number", "timestamp is in milliseconds")
            ts.append(float(v))
            inp.append(need_int(obj, "input_length", ln))
            out.append(need_int(obj, "output_length", ln))
            h = obj.get("hash_ids", [])
            if not isinstance(h, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in h):
                raise _bad_row(name, ln, "hash_ids", h if len(repr(h)) < 60 else repr(h)[:57] + "...",
                               "is not a list of non-negative integers")
            hashes.append(h)
            lines.append(ln)
    t = np.asarray(ts, np.float64) / 1000.0
    return _finish(name, t, np.asarray(inp, np.int64), np.asarray(out, np.int64), np.asarray(lines),
                   in_field="input_length", out_field="output_length", time_field="timestamp",
                   hashes=hashes, **opts)


_LOADERS = {"azure": load_azure, "mooncake": load_mooncake, "vidur": load_vidur, "burstgpt": load_burstgpt}


def detect_format(path: str | Path) -> str:
    """Guess the trace format from the file extension and the header line."""
    path = Path(path)
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    if stem.endswith((".jsonl", ".json", ".ndjson")):
        return "mooncake"
    try:
        with _open_text(path) as fh:
            head = fh.readline()
    except UnicodeDecodeError:
        head = ""
    if head.lstrip().startswith("{"):
        return "mooncake"
    cols = {c.strip().strip('"') for c in head.strip().split(",")}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= cols:
        return "azure"
    if {"num_prefill_tokens", "num_decode_tokens"} <= cols:
        return "vidur"
    if {"Timestamp", "Request tokens", "Response tokens"} <= cols:
        return "burstgpt"
    raise SpecError(f"{path.name} line 1", "header", f"cannot tell the trace format from {head.strip()[:80]!r}",
                    f"pass format= one of {', '.join(TRACE_FORMATS)}")


def load_trace(path: str | Path, format: str | None = None, **opts: Any) -> Requests:  # noqa: A002
    """Load a request trace; ``format`` is one of ``TRACE_FORMATS`` or None to detect it.

    See the module docstring for the options (window, sampling, rescale, ...).
    """
    path = Path(path)
    if not path.exists():
        raise SpecError(str(path), "path", "file does not exist", "check the path, or use bundled_trace(name)")
    fmt = detect_format(path) if format is None else format
    if fmt not in _LOADERS:
        raise SpecError(path.name, "format", f"unknown trace format {fmt!r}", f"use one of {', '.join(TRACE_FORMATS)}")
    return _LOADERS[fmt](path, **opts)


# ------------------------------------------------------------------------------ bundled
def _bundled_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    return [here.parents[2] / "traces", here.parents[1] / "_bundled" / "traces"]


def bundled_trace_names() -> list[str]:
    """Names accepted by :func:`bundled_trace`."""
    return sorted(_BUNDLED)


def bundled_trace_path(name: str) -> Path:
    """Path of a bundled trace: ``<repo>/traces/`` or, in an installed wheel, ``mist/_bundled/traces/``."""
    if name not in _BUNDLED:
        import difflib

        close = difflib.get_close_matches(name, list(_BUNDLED), n=3, cutoff=0.3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SpecError("bundled_trace", "name", f"unknown bundled trace {name!r}.{hint}",
                        f"use one of {', '.join(sorted(_BUNDLED))}, or load_trace(path) for your own file")
    fname = _BUNDLED[name]
    for d in _bundled_dirs():
        for cand in (d / fname, d / (fname + ".gz")):
            if cand.exists():
                return cand
    raise FileNotFoundError(f"bundled trace {name!r} ({fname}) not found in "
                            f"{', '.join(str(d) for d in _bundled_dirs())}; reinstall mist or restore traces/")


def bundled_trace(name: str, **opts: Any) -> Requests:
    """Load a bundled trace by name (``azure_conv_2023``, ``azure_code_2023``,
    ``mooncake_conversation``) with the usual :func:`load_trace` options."""
    return load_trace(bundled_trace_path(name), **opts)
