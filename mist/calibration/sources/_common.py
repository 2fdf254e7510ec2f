"""Helpers shared by the source loaders: locating the measured data, unit constants."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

MS = 1e-3   # seconds per millisecond
US = 1e-6   # seconds per microsecond

_HERE = Path(__file__).resolve()
REPO_ROOT = _HERE.parents[3]


def shared_data_candidates() -> list[Path]:
    """Where the measured-data folder (``shared/data``) is looked for, in order."""
    out = []
    env = os.environ.get("MIST_SHARED_DATA")
    if env:
        out.append(Path(env).expanduser())
    out.append(REPO_ROOT / "shared" / "data")            # checkout with shared/ inside
    out.append(REPO_ROOT.parent / "shared" / "data")     # shared/ next to the checkout
    return out


def shared_data_dir() -> Path | None:
    """The first existing measured-data folder, or None."""
    for p in shared_data_candidates():
        if p.is_dir():
            return p
    return None


def source_dir(source: str, subdir: str, path=None) -> Path:
    """Resolve the directory a loader reads.

    ``path`` (any directory laid out like the source's own) wins; otherwise
    ``<shared data>/<subdir>``. Raises FileNotFoundError saying what is missing.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{source}: {p} does not exist (pass a directory laid out like "
                                    f"the {source} repository's own profile folder)")
        return p
    base = shared_data_dir()
    if base is None or not (base / subdir).is_dir():
        looked = ", ".join(str(c / subdir) for c in shared_data_candidates())
        raise FileNotFoundError(
            f"{source}: measured data not found (looked in {looked}; set MIST_SHARED_DATA to the "
            f"folder holding '{subdir}/' or pass path=...). Without it, the curated subset in "
            f"traces/ops is used instead: mist.calibration.sources.load_curated()")
    return base / subdir


def require_files(source: str, root: Path, files: list) -> list:
    if not files:
        raise FileNotFoundError(f"{source}: no profile files found under {root} "
                                f"(the curated subset in traces/ops is used instead: "
                                f"mist.calibration.sources.load_curated())")
    return files


def assemble(parts: list[dict]) -> pd.DataFrame:
    """Build one normalised table from column dicts (values: scalars or length-n arrays).

    Cheaper than building one DataFrame per part: strings are converted once, at the end.
    """
    from .. import schema

    parts = [p for p in parts if len(np.atleast_1d(p["time_s"]))]
    if not parts:
        return schema.empty_table()
    cols = {}
    for c in schema.COLUMNS:
        chunks = []
        for p in parts:
            n = len(np.atleast_1d(p["time_s"]))
            v = p.get(c)
            if v is None or np.isscalar(v):
                if c in schema.STR_COLUMNS:
                    chunks.append(np.full(n, v, dtype=object))
                else:
                    chunks.append(np.full(n, np.nan if v is None else float(v)))
            else:
                a = np.asarray(v)
                chunks.append(a.astype(object) if c in schema.STR_COLUMNS else a.astype(float))
        cols[c] = np.concatenate(chunks)
    return schema.finalize(cols)
