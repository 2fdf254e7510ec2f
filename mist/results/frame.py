"""Per-request results table: one row per valid request, built from the engine's output arrays."""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd

from ..engine.tables import REJECT_MESSAGES, Reject


def select_config(lowered, state, i: int):
    """One config of a vmapped (stacked) run: `(lowered_i, state_i)` with the leading axis removed."""
    from dataclasses import replace

    take = lambda tree: jax.tree.map(lambda x: np.asarray(x)[i], tree)  # noqa: E731
    lo = replace(lowered, clients=take(lowered.clients), topology=take(lowered.topology),
                 workload=take(lowered.workload))
    return lo, take(state)


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _check_unbatched(state) -> None:
    if _host(state.o_finish).ndim != 1:
        raise ValueError("the state holds a batch of configs; pick one with mist.results.select_config(lowered, "
                         "state, i)")


def _finite_or_nan(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def reject_reason(code: int) -> str:
    """Message for a `Reject` code ("" when the request was not rejected)."""
    code = int(code)
    return "" if code == Reject.NONE else REJECT_MESSAGES.get(Reject(code), f"rejected (code {code})")


def _names_of(codes: np.ndarray, names: list[str], other) -> np.ndarray:
    """names[code] per entry (object array), `other(code)` for codes outside 0..len(names)-1: a
    lookup table indexed at once instead of a Python loop over the requests."""
    codes = np.asarray(codes, dtype=np.int64)
    inside = (codes >= 0) & (codes < len(names))
    out = np.array(list(names) + [""], dtype=object)[np.where(inside, codes, len(names))]
    for c in np.unique(codes[~inside]):
        out[codes == c] = other(int(c))
    return out


def requests_frame(lowered, state) -> pd.DataFrame:
    """One row per valid request; times in seconds (NaN where a time was never reached).

    Columns: request_id, pipeline, arrival, input_tokens, output_tokens, cached_tokens, scheduled
    (start of stage 0), first_token, finish, ttft, e2e, tpot ((finish - first_token) / (output - 1),
    NaN when output <= 1), queueing (sum over reached stages of start minus the time the stage became
    ready: the arrival for stage 0, the previous stage's end after it, so KV-transfer time counts as
    queueing), preemptions, rejected, reject_code, reject_reason, completed (finished and not
    rejected), and per stage k: stage{k}_client (name, "" if not reached), stage{k}_start, stage{k}_end.
    Rejected requests have NaN ttft/tpot/e2e/finish.
    """
    return pd.DataFrame(request_columns(lowered, state))


def request_columns(lowered, state, names: bool = True) -> dict[str, np.ndarray]:
    """The columns of `requests_frame` as numpy arrays; without `names`, the name columns (pipeline,
    reject_reason, stage{k}_client) are left out (a summary needs none of them)."""
    _check_unbatched(state)
    wl = lowered.workload
    valid = _host(wl.valid).astype(bool)
    idx = np.flatnonzero(valid)
    arrival = _host(wl.arrival)[idx].astype(np.float64)
    inp = _host(wl.input_tokens)[idx].astype(np.int64)
    out = _host(wl.output_tokens)[idx].astype(np.int64)
    cached = _host(wl.cached_tokens)[idx].astype(np.int64)
    pipe = _host(wl.pipeline)[idx].astype(np.int64)

    reject = _host(state.o_reject)[idx].astype(np.int64)
    rejected = reject != Reject.NONE
    first = _finite_or_nan(_host(state.o_first_token)[idx])
    finish = _finite_or_nan(_host(state.o_finish)[idx])
    finish = np.where(rejected, np.nan, finish)
    first = np.where(rejected, np.nan, first)
    start = _finite_or_nan(_host(state.o_stage_start)[idx])  # [n, K]
    end = _finite_or_nan(_host(state.o_stage_end)[idx])
    sclient = _host(state.o_stage_client)[idx].astype(np.int64)
    K = start.shape[1]

    ready = np.concatenate([arrival[:, None], end[:, :-1]], axis=1)
    wait = start - ready
    reached = np.isfinite(start)
    queueing = np.where(reached.any(axis=1), np.nansum(np.where(reached, wait, np.nan), axis=1), np.nan)

    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), np.nan)
    completed = ~rejected & np.isfinite(finish)

    cols = {
        "request_id": idx.astype(np.int64),
        "pipeline": _names_of(pipe, list(lowered.pipeline_names), lambda p: f"pipeline{p}") if names else None,
        "arrival": arrival, "input_tokens": inp,
        "output_tokens": out, "cached_tokens": cached, "scheduled": start[:, 0], "first_token": first,
        "finish": finish, "ttft": first - arrival, "e2e": finish - arrival, "tpot": tpot, "queueing": queueing,
        "preemptions": _host(state.o_preemptions)[idx].astype(np.int64), "rejected": rejected,
        "reject_code": reject,
        "reject_reason": (_names_of(reject, [reject_reason(c) for c in range(max(Reject) + 1)], reject_reason)
                          if names else None),
        "completed": completed,
    }
    cnames = list(lowered.client_names)
    for k in range(K):
        cols[f"stage{k}_client"] = _names_of(sclient[:, k], cnames, lambda c: "") if names else None
        cols[f"stage{k}_start"] = start[:, k]
        cols[f"stage{k}_end"] = end[:, k]
    return {k: v for k, v in cols.items() if v is not None}


def num_stages(df: pd.DataFrame) -> int:
    """How many stage{k}_* column groups a requests frame has."""
    k = 0
    while f"stage{k}_start" in df.columns:
        k += 1
    return k
