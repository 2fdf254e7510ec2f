"""Chrome trace-event export (opens in Perfetto or chrome://tracing).

Layout: one process per client (named with a "process_name" metadata event). Requests served
concurrently on a client overlap in time, and the trace-event format forbids overlapping complete
("X") events on one thread (Perfetto drops them), so each client's intervals are packed greedily onto
as few threads ("lanes", named with "thread_name") as keep them disjoint; a client that serves one
request at a time has a single thread. A first process, "requests", holds the arrivals (and
rejections) as instant events. Timestamps and durations are microseconds of simulated time.
"""

from __future__ import annotations

import heapq

import numpy as np
import pandas as pd

from .frame import _host, num_stages, requests_frame


def _lanes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Greedy interval partitioning: lane per interval, intervals on a lane disjoint, fewest lanes."""
    order = np.lexsort((ends, starts))
    lane = np.zeros(len(starts), dtype=np.int64)
    free: list[tuple[float, int]] = []  # (end time, lane) of lanes in use
    n_lanes = 0
    for i in order:
        if free and free[0][0] <= starts[i]:
            _, ln = heapq.heappop(free)
        else:
            ln, n_lanes = n_lanes, n_lanes + 1
        lane[i] = ln
        heapq.heappush(free, (ends[i], ln))
    return lane


def _meta(kind: str, pid: int, tid: int, **args) -> dict:
    return {"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": args}


def chrome_trace(lowered, state, max_requests: int = 5000, df: pd.DataFrame | None = None) -> dict:
    """Trace-event JSON object for the first `max_requests` requests (in arrival order)."""
    df = requests_frame(lowered, state) if df is None else df
    total = len(df)
    df = df.sort_values("request_id").head(max(int(max_requests), 0))
    names = list(lowered.client_names)
    enabled = _host(lowered.clients.enabled).astype(bool)
    ev: list[dict] = []

    # requests process: arrivals and rejections
    ev += [_meta("process_name", 0, 0, name="requests"), _meta("process_sort_index", 0, 0, sort_index=0),
           _meta("thread_name", 0, 0, name="arrivals")]
    for r in df.itertuples(index=False):
        args = {"request_id": int(r.request_id), "pipeline": str(r.pipeline), "input_tokens": int(r.input_tokens),
                "output_tokens": int(r.output_tokens), "cached_tokens": int(r.cached_tokens)}
        ev.append({"name": f"arrive r{r.request_id}", "cat": "arrival", "ph": "i", "s": "t", "pid": 0, "tid": 0,
                   "ts": float(r.arrival) * 1e6, "args": args})
        if r.rejected:
            ev.append({"name": f"reject r{r.request_id}", "cat": "reject", "ph": "i", "s": "t", "pid": 0, "tid": 0,
                       "ts": float(r.arrival) * 1e6, "args": {**args, "reason": str(r.reject_reason)}})

    # stage intervals, grouped by client
    rows = []
    for k in range(num_stages(df)):
        st = df[np.isfinite(df[f"stage{k}_start"]) & np.isfinite(df[f"stage{k}_end"])]
        for r, client, t0, t1 in zip(st.itertuples(index=False), st[f"stage{k}_client"], st[f"stage{k}_start"],
                                     st[f"stage{k}_end"]):
            rows.append((client, k, float(t0), max(float(t1), float(t0)), r))
    next_tid = 1
    for c, cname in enumerate(names):
        if not enabled[c]:
            continue
        pid = c + 1
        ev += [_meta("process_name", pid, 0, name=cname), _meta("process_sort_index", pid, 0, sort_index=pid)]
        mine = [x for x in rows if x[0] == cname]
        lanes = _lanes(np.array([x[2] for x in mine]), np.array([x[3] for x in mine])) if mine else np.zeros(0, int)
        n_lanes = int(lanes.max()) + 1 if mine else 1
        tids = list(range(next_tid, next_tid + n_lanes))
        next_tid += n_lanes
        for j, tid in enumerate(tids):
            label = cname if n_lanes == 1 else f"{cname} lane {j}"
            ev += [_meta("thread_name", pid, tid, name=label), _meta("thread_sort_index", pid, tid, sort_index=j)]
        for (_, k, t0, t1, r), ln in zip(mine, lanes):
            ev.append({"name": f"r{r.request_id} {r.pipeline}/stage{k}", "cat": "stage", "ph": "X", "pid": pid,
                       "tid": tids[int(ln)], "ts": t0 * 1e6, "dur": (t1 - t0) * 1e6,
                       "args": {"request_id": int(r.request_id), "stage": k, "input_tokens": int(r.input_tokens),
                                "output_tokens": int(r.output_tokens), "cached_tokens": int(r.cached_tokens),
                                "preemptions": int(r.preemptions)}})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"generator": "mist", "requests_total": int(total), "requests_in_trace": int(len(df)),
                          "truncated": bool(len(df) < total)}}
