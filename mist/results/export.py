"""Write a run's results to a folder: requests.csv, requests.parquet, summary.json, trace.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .frame import requests_frame
from .summary import SLO, summarize
from .trace import chrome_trace


def to_jsonable(x):
    """Plain-JSON copy of `x`: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [to_jsonable(v) for v in x.tolist()]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def write_json(path, obj) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_outputs(out_dir, lowered, state, summary: dict | None = None, stats=None, *, max_requests: int = 5000,
                  df: pd.DataFrame | None = None, slo: SLO = SLO(), parquet: bool = True,
                  trace: bool = True) -> dict[str, Path]:
    """Write requests.csv, requests.parquet, summary.json and trace.json (Chrome trace events, at most
    `max_requests` requests) under `out_dir` (created). `summary` defaults to `summarize(...)` with
    `stats` and `slo`. Returns the written paths by name ("csv", "parquet", "summary", "trace")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = requests_frame(lowered, state) if df is None else df
    summary = summarize(lowered, state, stats, slo=slo, df=df) if summary is None else summary
    paths = {"csv": out / "requests.csv"}
    df.to_csv(paths["csv"], index=False)
    if parquet:
        paths["parquet"] = out / "requests.parquet"
        df.to_parquet(paths["parquet"], index=False)
    paths["summary"] = write_json(out / "summary.json", summary)
    if trace:
        paths["trace"] = out / "trace.json"
        with open(paths["trace"], "w") as f:
            json.dump(to_jsonable(chrome_trace(lowered, state, max_requests=max_requests, df=df)), f,
                      separators=(",", ":"), allow_nan=False)
    return paths
