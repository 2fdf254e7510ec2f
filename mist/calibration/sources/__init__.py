"""Loaders that turn measured operator-timing datasets into one normalised table.

>>> from mist.calibration.sources import load_source, load_curated, load_table
>>> df = load_source("vidur")              # shared/data/vidur, or load_source("vidur", path=...)
>>> cur = load_curated("H100-SXM")         # the small committed subset in traces/ops

Every loader returns a DataFrame with the columns of :data:`mist.calibration.schema.COLUMNS`
(see that module for units and shape conventions).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd

from .. import schema

#: source name -> loader module (each has ``load(path=None) -> DataFrame``)
SOURCES: dict[str, str] = {
    "vidur": "mist.calibration.sources.vidur",
    "aiconfigurator": "mist.calibration.sources.aiconfigurator",
    "aiter": "mist.calibration.sources.aiter",
    "llmcompass": "mist.calibration.sources.llmcompass",
}

_HERE = Path(__file__).resolve()
CURATED_DIRS: tuple[Path, ...] = (
    _HERE.parents[3] / "traces" / "ops",            # source checkout
    _HERE.parents[2] / "_bundled" / "traces" / "ops",  # installed wheel
)


def load_source(name: str, path=None, **kwargs) -> pd.DataFrame:
    """Load one measured source (``vidur``, ``aiconfigurator``, ``aiter``, ``llmcompass``).

    ``path`` is any directory laid out like the source's own; by default the source's folder
    under the shared measured-data directory. Extra keyword arguments go to the loader
    (e.g. ``devices=`` / ``ops=`` for aiconfigurator).
    """
    key = str(name).strip().lower()
    if key not in SOURCES:
        raise ValueError(f"unknown source '{name}': use one of {', '.join(SOURCES)}")
    mod = importlib.import_module(SOURCES[key])
    return mod.load(path, **kwargs)


def load_table(path) -> pd.DataFrame:
    """Read an already-normalised table (CSV or Parquet) and validate it.

    Missing optional columns are filled with NaN; a missing required column or a malformed
    row raises ValueError naming the file, the row (0-based data-row position) and the field.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df = pd.read_parquet(p)
    elif suffix in (".csv", ".txt") or p.name.endswith(".csv.gz"):
        df = pd.read_csv(p)
    else:
        raise ValueError(f"{p}: unknown table format (use .csv or .parquet)")
    return schema.validate(df, where=str(p))


def curated_dir() -> Path | None:
    """The directory holding the curated per-device tables, or None."""
    for d in CURATED_DIRS:
        if d.is_dir() and any(d.glob("*.parquet")):
            return d
    return None


def load_curated(device: str | None = None) -> pd.DataFrame:
    """The curated operator-timing subset (``traces/ops/<device>.parquet``), one device or all."""
    d = curated_dir()
    if d is None:
        raise FileNotFoundError("curated operator timings not found (looked in "
                                + ", ".join(str(c) for c in CURATED_DIRS)
                                + "); build them with `python calibration/curate_traces.py`")
    if device is not None:
        dev = schema.canonical_device(device)
        f = d / f"{dev}.parquet"
        if not f.exists():
            have = sorted(p.stem for p in d.glob("*.parquet"))
            raise FileNotFoundError(f"no curated operator timings for {dev} in {d} (have: {', '.join(have)})")
        files = [f]
    else:
        files = sorted(d.glob("*.parquet"))
    return schema.concat(load_table(f) for f in files)


__all__ = ["SOURCES", "load_source", "load_table", "load_curated", "curated_dir"]
