"""LLMCompass "real hardware" operator measurements (PrincetonUniversity/LLMCompass, BSD-3).

Reads ``<op>_<DEVICE>.csv`` files (headerless; normally under
``ae/figure5/*/real_hardware/``) anywhere under the given directory:

* ``matmul_*.csv``: ``M, N, K, <t>ms, <x>Tflops`` -- time in MILLISECONDS. The benchmark
  multiplies ``[M, K] x [K, N]``, so ``m = M, n = N, k = K``.
* ``softmax_*.csv`` / ``layernorm_*.csv``: ``M, N, throughput`` where throughput is in
  G elements/s (LLMCompass' plot scripts label it so; it is ``M*N / latency / 1e9``), so
  ``time_s = M * N / (throughput * 1e9)``; rows ``m = M``, ``n = N``.
* ``gelu_*.csv``: ``size, throughput`` (G elements/s) -> ``elementwise`` named "gelu" with
  ``m = size, n = 1``.

The transformer / transformerAR files (whole-layer seconds without shapes) are not op
timings and are skipped. All real-hardware runs are fp16 (``data_type_dict["fp16"]``).
Devices: ``A100`` -> A100-SXM-80GB (LLMCompass models it as "A100_80GB_fp16"; the artifact
does not say SXM vs PCIe), ``MI210`` -> MI210.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema
from ._common import MS, require_files, source_dir

SOURCE = "llmcompass"
SUBDIR = "llmcompass_real_hw"
FRAMEWORK = "pytorch (llmcompass ae)"

DEVICE_KEYS = {"a100": "A100-SXM-80GB", "mi210": "MI210"}
_FILE = re.compile(r"^(matmul|softmax|layernorm|gelu)_([A-Za-z0-9]+)$")


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, header=None, skipinitialspace=True, sep=r"\s*,\s*", engine="python")


def _num(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s.astype(str).str.replace(r"[A-Za-z]+$", "", regex=True), errors="coerce") \
        .to_numpy(dtype=float)


def load(path=None) -> pd.DataFrame:
    """All LLMCompass real-hardware op measurements under ``path`` (default: shared/data/llmcompass_real_hw)."""
    root = source_dir(SOURCE, SUBDIR, path)
    files = sorted(p for p in (root.rglob("*.csv") if root.is_dir() else [root]) if _FILE.match(p.stem))
    require_files(SOURCE, root, files)
    frames = []
    for f in files:
        kind, dev = _FILE.match(f.stem).groups()
        device = DEVICE_KEYS.get(dev.lower())
        if device is None:
            warnings.warn(f"llmcompass: unknown device '{dev}' in {f.name}; skipped")
            continue
        df = _read(f)
        if kind == "matmul":
            m, n, k, t = _num(df[0]), _num(df[1]), _num(df[2]), _num(df[3]) * MS
            fr = pd.DataFrame({"op": "gemm", "m": m, "n": n, "k": k, "time_s": t, "w_dtype": "fp16"})
        elif kind in ("softmax", "layernorm"):
            m, n, thr = _num(df[0]), _num(df[1]), _num(df[2])
            fr = pd.DataFrame({"op": kind, "m": m, "n": n, "time_s": m * n / (thr * 1e9)})
        else:  # gelu
            size, thr = _num(df[0]), _num(df[1])
            fr = pd.DataFrame({"op": "elementwise", "name": "gelu", "m": size, "n": 1.0,
                               "time_s": size / (thr * 1e9)})
        fr["device"] = device
        frames.append(fr)
    if not frames:
        return schema.empty_table()
    out = pd.concat(frames, ignore_index=True)
    out["dtype"] = "fp16"
    out["source"] = SOURCE
    out["framework"] = FRAMEWORK
    t = out["time_s"].to_numpy(float)
    out = out[np.isfinite(t) & (t > 0)]
    return schema.finalize(out)
