"""Plain-text tables for terminal output."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3g") -> str:
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    body = "\n".join("  ".join(v.rjust(w) if _num(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    return f"{line}\n{sep}\n{body}"


def _num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")


def _default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
