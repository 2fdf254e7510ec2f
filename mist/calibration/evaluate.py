"""Score the current cost parameters of a device against a measured table, fitting nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..cost.params import load_params, params_path
from ..specs.catalog import get_hardware
from .fit import metrics, rows_of
from .predict import prepare
from .stacks import predict_stacked, stacks_from_dict

#: formats `evaluate` reads: the normalised table (CSV/Parquet) or a source's own layout
TABLE_FORMATS = ("table", "csv", "parquet")


def read_measurements(path, format: str | None = None) -> pd.DataFrame:
    """A normalised table from `path`: format None/table/csv/parquet reads an already-normalised
    table (by its suffix); a source name (aiconfigurator, vidur, aiter, llmcompass) reads a
    directory laid out like that source's own."""
    from .sources import load_source, load_table

    fmt = (format or "table").strip().lower()
    if fmt in TABLE_FORMATS:
        p = Path(path)
        if fmt != "table" and p.suffix.lower().lstrip(".") != fmt and not p.name.endswith(".csv.gz"):
            raise ValueError(f"{p}: --format {fmt} but the file is '{p.suffix}'")
        return load_table(p)
    return load_source(fmt, path)


def evaluate(device_name: str, path, format: str | None = None, *, params=None) -> pd.DataFrame:
    """Per op kind: count, MAPE and p90 absolute percentage error (%) of the device's current
    parameters (calibration/params/<device>.json, else defaults) on the rows of `path` measured
    on that device (all rows when the table names no device). Rows the model cannot predict are
    counted in `dropped` (attrs) and left out."""
    dev = get_hardware(device_name)
    tab = read_measurements(path, format)
    if "device" in tab.columns and tab["device"].notna().any():
        sel = rows_of(tab, dev.name)
        if not len(sel):
            have = sorted(set(tab["device"].dropna().astype(str)))
            raise ValueError(f"{path}: no rows measured on {dev.name} (the table has: {', '.join(have)})")
        tab = sel
    stacks = {}
    if params is None:
        params, origin = load_params(dev.name, "cpu" if dev.kind == "cpu" else "gpu")
        pfile = params_path(dev.name)
        if pfile is not None:  # GEMM rows of a stack with parameters of its own are scored with them
            stacks = stacks_from_dict(json.loads(pfile.read_text()).get("params", {}), str(pfile))
    else:
        origin = "given"
    pred = predict_stacked(params, stacks, dev, tab)
    out = metrics(pred, tab)
    out.attrs["device"] = dev.name
    out.attrs["params_origin"] = origin
    out.attrs["gemm_stacks"] = sorted(stacks)
    out.attrs["dropped"] = prepare(dev, tab).dropped
    out.attrs["rows"] = int(len(tab))
    out.attrs["predicted_rows"] = int(np.isfinite(pred).sum())
    return out
