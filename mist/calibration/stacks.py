"""Measuring software stacks: one GEMM parameter set per stack that timed a device's GEMMs.

Two sources can time the same GEMM shape on the same GPU and disagree by 20-35%, because they
call different generations of cuBLAS (see calibration/REPORT.md, GEMM: Vidur's 2024 profile pads M
to 128-256-row tiles, the vLLM 0.24 stack of AIConfigurator does not). That is a property of the
software that ran the kernel, not of the device, so a device's parameter file holds one GEMM
parameter set per measuring stack:

* the **default** stack is the newest library measured on the device (first of `STACK_ORDER`
  present). Its rows fit the device's main parameters, which the simulator runs with;
* every other stack with at least `MIN_STACK_ROWS` GEMM training rows gets its own GEMM
  parameters (every per-operator field at index `Op.GEMM`), fitted on its rows from the main fit,
  and stored under ``params.stacks.<stack>`` in the JSON file. Its rows are predicted with them
  (`predict_stacked`); smaller stacks stay in the main fit.

A row's stack is its ``source`` column (each bundled source measured with one software stack).
`load_params(device, gemm_stack=...)` gives the simulator a stored stack's parameters.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..cost.params import NUM_OPS, CostParams, Op

#: measuring stacks, newest library first: the first one a device has is its default (AIConfigurator:
#: vLLM 0.14-0.24 with 2025 PyTorch/cuBLAS; aiter: AMD's tuned kernels; Vidur: its 2024 profiler;
#: LLMCompass: its 2023 artifact evaluation). Sources not listed come after these, by name.
STACK_ORDER: tuple[str, ...] = ("aiconfigurator", "aiter", "vidur", "llmcompass")
#: op kinds whose parameters are kept per stack (where the sources are known to disagree)
STACK_OPS: tuple[str, ...] = ("gemm",)
#: the operator class those kinds fit
STACK_CLASS = Op.GEMM
#: a stack needs this many GEMM training rows for parameters of its own (fewer: main fit)
MIN_STACK_ROWS = 50


def stack_of(table: pd.DataFrame) -> np.ndarray:
    """The measuring stack of each row ('' where the table names no source)."""
    if "source" not in table.columns:
        return np.full(len(table), "", object)
    return table["source"].astype(object).where(table["source"].notna(), "").astype(str).to_numpy()


def _stack_rows(table: pd.DataFrame) -> np.ndarray:
    return table["op"].astype(object).isin(STACK_OPS).to_numpy()


def default_stack(table: pd.DataFrame) -> str | None:
    """The stack whose GEMM rows fit a device's main parameters: the first of STACK_ORDER that
    `table` has GEMM rows of (then other sources by name); None without GEMM rows."""
    have = set(stack_of(table)[_stack_rows(table)])
    if not have:
        return None
    rank = {s: i for i, s in enumerate(STACK_ORDER)}
    return min(have, key=lambda s: (rank.get(s, len(STACK_ORDER)), s))


def variant_stacks(fit_rows: pd.DataFrame) -> list[str]:
    """The stacks of `fit_rows` (a device's training rows that the fit uses) that get GEMM
    parameters of their own: all but the default, with at least MIN_STACK_ROWS GEMM rows."""
    dflt = default_stack(fit_rows)
    st = stack_of(fit_rows)[_stack_rows(fit_rows)]
    names, counts = np.unique(st, return_counts=True) if len(st) else ([], [])
    return sorted(str(s) for s, n in zip(names, counts) if s != dflt and s and n >= MIN_STACK_ROWS)


def rows_of_stacks(table: pd.DataFrame, stacks) -> np.ndarray:
    """Mask of `table`'s rows of a per-stack op kind measured by one of `stacks`."""
    return _stack_rows(table) & np.isin(stack_of(table), list(stacks))


def with_class_of(params: CostParams, other: CostParams, op: int = STACK_CLASS) -> CostParams:
    """`params` with operator class `op` (every per-operator field's entry) taken from `other`."""
    import dataclasses

    import equinox as eqx

    names = [f.name for f in dataclasses.fields(CostParams) if jnp.shape(getattr(params, f.name)) == (NUM_OPS,)]
    vals = tuple(getattr(params, n).at[int(op)].set(getattr(other, n)[int(op)]) for n in names)
    return eqx.tree_at(lambda p: tuple(getattr(p, n) for n in names), params, vals)


def stacks_to_dict(stacks: dict[str, CostParams], rows: dict[str, int] | None = None) -> dict:
    """The JSON block of the per-stack parameters: per stack, its GEMM class in physical units."""
    key = Op(STACK_CLASS).name.lower()
    return {s: {"ops": {key: p.to_dict()["ops"][key]}, **({"train_rows": int(rows[s])} if rows else {})}
            for s, p in sorted(stacks.items())}


def stacks_from_dict(d: dict, where: str = "<params>") -> dict[str, CostParams]:
    """The per-stack parameters stored in a params block (`d` = the file's "params"): for each
    stack, the main parameters with that stack's operator classes."""
    out = {}
    for s, block in (d.get("stacks") or {}).items():
        dd = copy.deepcopy(d)
        for op, vals in block.get("ops", {}).items():
            dd["ops"][op] = vals
        out[s] = CostParams.from_dict(dd, f"{where}: stacks.{s}")
    return out


def predict_stacked(params: CostParams, stacks: dict[str, CostParams], device, table: pd.DataFrame) -> np.ndarray:
    """Predicted seconds per row: rows of a per-stack op kind measured by a stack in `stacks` with
    that stack's parameters, every other row with `params`."""
    from .predict import predict

    table = table.reset_index(drop=True)
    out = predict(params, device, table, report=False)
    for s, p in stacks.items():
        m = rows_of_stacks(table, [s])
        if m.any():
            out[m] = predict(p, device, table[m].reset_index(drop=True), report=False)
    return out


__all__ = ["STACK_ORDER", "STACK_OPS", "MIN_STACK_ROWS", "stack_of", "default_stack", "variant_stacks",
           "rows_of_stacks", "with_class_of", "stacks_to_dict", "stacks_from_dict", "predict_stacked"]
