"""Tests for mist.results: requests frame, summary, seed aggregation, exports, trace, plots.

Most tests build a `Lowered` with `mist.lowering.lower` (no engine compile) and fill a fresh
`init_state` with hand-chosen outputs, so every expected number is computed by hand below.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mist  # noqa: F401  (enables float64)
from mist.engine.state import init_state, itl_bin_edges
from mist.engine.tables import REJECT_MESSAGES, Reject
from mist.lowering import Deployment, lower
from mist.results import (
    SLO, chrome_trace, itl_mean, itl_percentiles, plot_latency_cdf, plot_timeline, requests_frame, select_config,
    summarize, summarize_seeds, t_quantile_975, to_jsonable, write_outputs,
)

INF = math.inf

# The 4-request example (times in seconds), 2 clients, one stage, capacity padded to 5 requests:
#   r0: arrives 0.0, 100 in / 11 out, client 0 from 0.0, first token 0.10, finish 0.60
#   r1: arrives 0.5, 200 in / 21 out, client 1 from 0.7, first token 0.90, finish 1.90
#   r2: arrives 1.0,  50 in /  1 out, client 0 from 1.0, first token 1.02, finish 1.02
#   r3: arrives 1.5, 5000 in / 10 out, rejected (KV capacity)
ARRIVAL = [0.0, 0.5, 1.0, 1.5]
INPUT = [100, 200, 50, 5000]
OUTPUT = [11, 21, 1, 10]
CACHED = [0, 16, 0, 0]
BUSY = [0.62, 1.2]


def _pad(vals, n, fill):
    return list(vals) + [fill] * (n - len(vals))


@pytest.fixture(scope="module")
def example():
    reqs = {"arrival": np.array(ARRIVAL), "input_tokens": np.array(INPUT), "output_tokens": np.array(OUTPUT),
            "cached_tokens": np.array(CACHED)}
    lo = lower(Deployment.single("llama-3.1-8b", "h100", replicas=2, max_num_seqs=4), reqs, num_requests=5,
               num_clients=3)  # one padding request and one disabled padding client
    cl = dataclasses.replace(lo.clients, devices=jnp.array([2.0, 1.0, 8.0]),
                             power_busy=jnp.array([700.0, 500.0, 1000.0]),
                             power_idle=jnp.array([100.0, 50.0, 1000.0]),
                             price_per_hour=jnp.array([3.0, 2.0, 100.0]))
    lo = dataclasses.replace(lo, clients=cl)
    N, K = lo.dims.num_requests, lo.dims.stages
    assert (N, K, lo.dims.num_clients) == (5, 1, 3)
    hist = np.zeros(lo.dims.itl_bins)
    hist[100] = 28.0  # 10 + 20 inter-token gaps of r0 and r1 ... minus 2 put in the next bin
    hist[101] = 2.0
    s = init_state(lo.dims, jax.random.PRNGKey(0))
    s = dataclasses.replace(
        s,
        o_first_token=jnp.array(_pad([0.10, 0.90, 1.02, INF], N, INF)),
        o_finish=jnp.array(_pad([0.60, 1.90, 1.02, INF], N, INF)),
        o_preemptions=jnp.array(_pad([0, 2, 0, 0], N, 0), jnp.int32),
        o_reject=jnp.array(_pad([0, 0, 0, int(Reject.KV_CAPACITY)], N, 0), jnp.int32),
        o_stage_start=jnp.array(_pad([0.0, 0.7, 1.0, INF], N, INF))[:, None],
        o_stage_end=jnp.array(_pad([0.60, 1.90, 1.02, INF], N, INF))[:, None],
        o_stage_client=jnp.array(_pad([0, 1, 0, -1], N, -1), jnp.int32)[:, None],
        busy=jnp.array(BUSY + [0.0]), iters=jnp.array([30, 22, 0], jnp.int32),
        itl_hist=jnp.asarray(hist), itl_sum=jnp.float64(30 * 0.05),
    )
    return lo, s


@pytest.fixture(scope="module")
def two_stage():
    """Prefill -> decode with a KV hand-off: queueing sums the wait before each stage."""
    reqs = {"arrival": np.array([0.0, 0.1]), "input_tokens": np.array([100, 100]),
            "output_tokens": np.array([5, 5])}
    lo = lower(Deployment.disaggregated("llama-3.1-8b", num_prefill=1, num_decode=1), reqs)
    N, K = lo.dims.num_requests, lo.dims.stages
    assert K == 2
    s = init_state(lo.dims, jax.random.PRNGKey(0))
    s = dataclasses.replace(
        s, o_first_token=jnp.array([0.05, 0.20]), o_finish=jnp.array([0.30, 0.50]),
        o_stage_start=jnp.array([[0.0, 0.06], [0.15, 0.25]]), o_stage_end=jnp.array([[0.05, 0.30], [0.20, 0.50]]),
        o_stage_client=jnp.array([[0, 1], [0, 1]], jnp.int32), busy=jnp.array([0.1, 0.44]))
    return lo, s


# --- requests frame


def test_frame_columns_and_values(example):
    lo, s = example
    df = requests_frame(lo, s)
    assert len(df) == 4  # the padding request is dropped
    assert list(df["request_id"]) == [0, 1, 2, 3]
    assert list(df["pipeline"]) == ["chat"] * 4
    np.testing.assert_allclose(df["ttft"][:3], [0.10, 0.40, 0.02], atol=1e-12)
    np.testing.assert_allclose(df["e2e"][:3], [0.60, 1.40, 0.02], atol=1e-12)
    np.testing.assert_allclose(df["tpot"][:2], [0.05, 0.05], atol=1e-12)
    assert np.isnan(df["tpot"][2])  # one output token: no TPOT
    np.testing.assert_allclose(df["queueing"][:3], [0.0, 0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(df["scheduled"][:3], [0.0, 0.7, 1.0])
    assert list(df["stage0_client"]) == ["replica0", "replica1", "replica0", ""]
    assert list(df["rejected"]) == [False, False, False, True]
    assert list(df["completed"]) == [True, True, True, False]
    assert df["reject_reason"][3] == REJECT_MESSAGES[Reject.KV_CAPACITY]
    assert (df["reject_reason"][:3] == "").all()
    assert list(df["preemptions"]) == [0, 2, 0, 0]
    assert list(df["cached_tokens"]) == CACHED
    for col in ("ttft", "e2e", "finish", "first_token", "scheduled", "queueing", "stage0_start"):
        assert np.isnan(df[col][3]), col


def test_frame_two_stage_queueing(two_stage):
    lo, s = two_stage
    df = requests_frame(lo, s)
    # r0: 0 before prefill + (0.06 - 0.05) before decode; r1: 0.05 + 0.05
    np.testing.assert_allclose(df["queueing"], [0.01, 0.10], atol=1e-12)
    assert list(df["stage0_client"]) == ["prefill0", "prefill0"]
    assert list(df["stage1_client"]) == ["decode0", "decode0"]
    np.testing.assert_allclose(df["tpot"], [(0.30 - 0.05) / 4, (0.50 - 0.20) / 4])


def test_batched_state_needs_select(example):
    lo, s = example
    stack = lambda t: jax.tree.map(lambda *x: np.stack(x), t, t)  # noqa: E731
    lo2 = dataclasses.replace(lo, clients=stack(lo.clients), topology=stack(lo.topology), workload=stack(lo.workload))
    s2 = stack(s)
    with pytest.raises(ValueError, match="select_config"):
        requests_frame(lo2, s2)
    lo1, s1 = select_config(lo2, s2, 1)
    pd.testing.assert_frame_equal(requests_frame(lo1, s1), requests_frame(lo, s))


# --- summary


def test_summary_hand_computed(example):
    lo, s = example
    r = summarize(lo, s)
    assert r["num_requests"] == 4 and r["completed"] == 3 and r["rejected"] == 1 and r["unfinished"] == 0
    assert r["rejected_by_reason"] == {"kv_capacity": 1}
    d = 1.9
    assert r["duration_s"] == pytest.approx(d)
    assert r["total_input_tokens"] == 350 and r["total_output_tokens"] == 33
    assert r["request_throughput"] == pytest.approx(3 / d)
    assert r["input_throughput"] == pytest.approx(350 / d)
    assert r["output_throughput"] == pytest.approx(33 / d)
    assert r["total_token_throughput"] == pytest.approx(383 / d)
    # TTFT of the completed requests [100, 400, 20] ms (linear-interpolated percentiles); r3 excluded
    assert r["mean_ttft_ms"] == pytest.approx(520 / 3)
    assert r["median_ttft_ms"] == pytest.approx(100.0)
    assert r["p90_ttft_ms"] == pytest.approx(100 + 0.8 * 300)
    assert r["p99_ttft_ms"] == pytest.approx(100 + 0.98 * 300)
    for k in ("mean", "median", "p90", "p99"):
        assert r[f"{k}_tpot_ms"] == pytest.approx(50.0)
    # E2E [600, 1400, 20]
    assert r["mean_e2el_ms"] == pytest.approx(2020 / 3)
    assert r["median_e2el_ms"] == pytest.approx(600.0)
    assert r["p99_e2el_ms"] == pytest.approx(600 + 0.98 * 800)
    assert r["mean_queueing_ms"] == pytest.approx(200 / 3)
    assert r["total_preemptions"] == 2
    # ITL: mean from the sum; the median lies inside bin 100
    assert r["itl_count"] == 30
    assert r["mean_itl_ms"] == pytest.approx(50.0)
    e = itl_bin_edges(lo.dims.itl_bins)
    assert e[100] * 1e3 <= r["median_itl_ms"] <= e[101] * 1e3
    # goodput at 250 ms / 25 ms: only r2 (TTFT 20 ms, no TPOT) is good
    assert r["good_requests"] == 1
    assert r["goodput_fraction"] == pytest.approx(0.25)
    assert r["request_goodput"] == pytest.approx(1 / d)
    # percentile SLOs: p50 TPOT 50 ms > 1.25 x 25 ms fails, and a rejection fails the default
    assert r["slo_met"] is False
    c = r["slo"]["checks"]
    assert c["p50_ttft"]["met"] and c["p90_ttft"]["met"] and c["p99_ttft"]["met"]
    assert c["p50_ttft"]["limit_ms"] == 500 and c["p90_ttft"]["limit_ms"] == 750 and c["p99_ttft"]["limit_ms"] == 1500
    assert not c["p50_tpot"]["met"] and not c["p90_tpot"]["met"] and c["p99_tpot"]["met"]
    assert c["p50_tpot"]["limit_ms"] == pytest.approx(31.25)
    assert not c["rejected_fraction"]["met"]
    # utilisation, energy, cost: the disabled padding client does not count
    assert r["utilization"] == pytest.approx({"replica0": 0.62 / d, "replica1": 1.2 / d})
    assert set(r["busy_s"]) == {"replica0", "replica1"}
    assert r["iterations"] == {"replica0": 30, "replica1": 22}
    energy = 2 * (700 * 0.62 + 100 * (d - 0.62)) + 1 * (500 * 1.2 + 50 * (d - 1.2))
    assert r["energy_j"] == pytest.approx(energy)
    assert r["energy_j"] == pytest.approx(1759.0)
    assert r["avg_power_w"] == pytest.approx(energy / d)
    assert r["energy_per_output_token_j"] == pytest.approx(energy / 33)
    cost = (2 * 3 + 1 * 2) * d / 3600
    assert r["cost_usd"] == pytest.approx(cost)
    assert r["cost_per_million_output_tokens"] == pytest.approx(cost / 33 * 1e6)
    assert r["cost_per_million_tokens"] == pytest.approx(cost / 383 * 1e6)
    assert r["num_devices"] == 3.0
    assert r["sim_compile_s"] is None and r["sim_run_s"] is None


def test_summary_custom_slo_and_stats(example):
    lo, s = example
    stats = type("Stats", (), {"compile_s": 1.5, "run_s": 0.25, "steps": 7})()
    r = summarize(lo, s, stats, slo=SLO(ttft_ms=500, tpot_ms=50, max_rejected_fraction=0.25))
    assert r["slo_met"] is True
    assert r["good_requests"] == 3  # TTFT 100, 400, 20 <= 500 and TPOT 50 <= 50
    assert (r["sim_compile_s"], r["sim_run_s"], r["sim_steps"]) == (1.5, 0.25, 7)
    with pytest.raises(ValueError):
        SLO(percentiles=(50, 90))


def test_summary_all_rejected(example):
    lo, s = example
    s2 = dataclasses.replace(s, o_reject=jnp.full_like(s.o_reject, int(Reject.CONTEXT_LENGTH)))
    r = summarize(lo, s2)
    assert r["completed"] == 0 and r["rejected"] == 4
    assert r["rejected_by_reason"] == {"context_length": 4}
    assert r["duration_s"] == 0.0 and math.isnan(r["request_throughput"]) and math.isnan(r["mean_ttft_ms"])
    assert r["slo_met"] is False and r["good_requests"] == 0
    json.dumps(to_jsonable(r), allow_nan=False)  # NaN become null


# --- ITL histogram percentiles


def _hist_of(x: np.ndarray, bins: int) -> np.ndarray:
    """Bin gaps the way the engine does (searchsorted on the interior edges)."""
    return np.bincount(np.searchsorted(itl_bin_edges(bins)[1:-1], x), minlength=bins).astype(np.float64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), median=st.floats(1e-4, 1.0), sigma=st.floats(0.01, 2.0),
       n=st.integers(20, 5000))
def test_itl_percentiles_within_one_bin(seed, median, sigma, n):
    bins = 160
    x = np.random.default_rng(seed).lognormal(np.log(median), sigma, n)
    x = np.clip(x, 1.0001e-6, 99.99)  # the histogram's range, 1 us to 100 s
    hist = _hist_of(x, bins)
    ratio = itl_bin_edges(bins)[1] / itl_bin_edges(bins)[0]
    qs = [1, 10, 50, 90, 99, 100]
    est = itl_percentiles(hist, qs)
    # the sample of rank ceil(q n / 100) lies in the bin the estimate comes from (np.percentile's
    # linear rule may interpolate between two samples many bins apart when n is small)
    exact = np.percentile(x, qs, method="inverted_cdf")
    assert np.all(np.abs(np.log(est) - np.log(exact)) <= np.log(ratio) * (1 + 1e-9))
    assert itl_mean(hist, x.sum()) == pytest.approx(x.mean())


def test_itl_percentiles_edge_cases():
    hist = np.zeros(160)
    assert np.isnan(itl_percentiles(hist, [50])).all()
    assert math.isnan(itl_mean(hist, 0.0))
    e = itl_bin_edges(160)
    hist[40] = 4.0  # all mass in one bin: the median is its geometric middle
    assert itl_percentiles(hist, [50])[0] == pytest.approx(np.sqrt(e[40] * e[41]))
    assert itl_percentiles(hist, [0])[0] == pytest.approx(e[40])
    assert itl_percentiles(hist, [100])[0] == pytest.approx(e[41])


# --- seeds


def test_summarize_seeds():
    runs = [{"mean_ttft_ms": v, "slo_met": m, "utilization": {"a": u}, "sim_compile_s": None, "name": "x",
             "p99_tpot_ms": float("nan") if i == 0 else 1.0}
            for i, (v, m, u) in enumerate([(10.0, True, 0.5), (12.0, False, 0.7), (14.0, True, 0.6)])]
    agg = summarize_seeds(runs)
    assert agg["n_seeds"] == 3 and "Student-t" in agg["interval"]
    m = agg["mean_ttft_ms"]
    assert m["mean"] == pytest.approx(12.0) and m["std"] == pytest.approx(2.0) and m["n"] == 3
    hw = 4.3027 * 2.0 / math.sqrt(3)
    assert m["ci95"] == pytest.approx([12.0 - hw, 12.0 + hw], rel=1e-4) and m["half_width"] == pytest.approx(hw, 1e-4)
    assert agg["slo_met"]["mean"] == pytest.approx(2 / 3)
    assert agg["utilization.a"]["mean"] == pytest.approx(0.6)
    assert agg["p99_tpot_ms"]["n"] == 2  # NaN dropped
    assert "sim_compile_s" not in agg and "name" not in agg
    one = summarize_seeds(runs[:1])["mean_ttft_ms"]
    assert one["mean"] == 10.0 and math.isnan(one["half_width"])
    json.dumps(to_jsonable(agg), allow_nan=False)


def test_t_quantile_matches_reference():
    # scipy.stats.t.ppf(0.975, df), computed once
    ref = {1: 12.706205, 2: 4.302653, 5: 2.570582, 10: 2.228139, 30: 2.042272, 31: 2.039513, 40: 2.021075,
           60: 2.000298, 120: 1.97993, 1000: 1.962339}
    for df, v in ref.items():
        assert t_quantile_975(df) == pytest.approx(v, abs=1e-4)
    assert math.isnan(t_quantile_975(0))


# --- exports


def test_write_outputs_roundtrip(example, tmp_path):
    lo, s = example
    paths = write_outputs(tmp_path / "out", lo, s)
    assert {p.name for p in paths.values()} == {"requests.csv", "requests.parquet", "summary.json", "trace.json"}
    df = requests_frame(lo, s)
    csv = pd.read_csv(paths["csv"], keep_default_na=False, na_values=[""])
    assert len(csv) == 4 and list(csv.columns) == list(df.columns)
    np.testing.assert_allclose(csv["ttft"].to_numpy(dtype=float), df["ttft"].to_numpy(), equal_nan=True)
    pq = pd.read_parquet(paths["parquet"])
    pd.testing.assert_frame_equal(pq, df)
    summ = json.loads(paths["summary"].read_text())
    assert summ["completed"] == 3 and summ["rejected_by_reason"] == {"kv_capacity": 1}
    assert summ["sim_compile_s"] is None
    assert summ["mean_ttft_ms"] == pytest.approx(520 / 3)
    json.loads(paths["trace"].read_text())


def test_chrome_trace_structure(example, two_stage):
    for lo, s, n_clients in (example + (2,), two_stage + (2,)):
        tr = json.loads(json.dumps(chrome_trace(lo, s), allow_nan=False))
        ev = tr["traceEvents"]
        procs = {e["pid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
        threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
        assert procs[0] == "requests"
        client_pids = [p for p in procs if p != 0]
        assert sorted(procs[p] for p in client_pids) == sorted(lo.client_names[:n_clients])
        assert len({tid for _, tid in threads}) == len(threads)  # tids unique across processes
        xs = [e for e in ev if e["ph"] == "X"]
        df = requests_frame(lo, s)
        assert len(xs) == int(np.isfinite(df.filter(like="_end").to_numpy()).sum())
        for e in xs:
            assert e["dur"] >= 0 and (e["pid"], e["tid"]) in threads
            assert {"request_id", "input_tokens", "output_tokens", "stage"} <= set(e["args"])
        # complete events on one thread never overlap (Perfetto drops overlapping ones)
        by_thread: dict = {}
        for e in xs:
            by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
        for iv in by_thread.values():
            iv.sort()
            assert all(a[1] <= b[0] for a, b in zip(iv, iv[1:]))
        arrivals = [e for e in ev if e["ph"] == "i" and e["cat"] == "arrival"]
        assert len(arrivals) == len(df) and all(e["pid"] == 0 for e in arrivals)
    tr = chrome_trace(*example, max_requests=2)
    assert tr["otherData"]["truncated"] and tr["otherData"]["requests_in_trace"] == 2
    assert {e["args"]["request_id"] for e in tr["traceEvents"] if e["ph"] in "Xi"} == {0, 1}


def test_trace_lanes_for_overlapping_requests(two_stage):
    lo, s = two_stage
    # both requests decode on decode0 over [0.06, 0.30] and [0.25, 0.50]: two lanes
    ev = chrome_trace(lo, s)["traceEvents"]
    names = sorted(e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name")
    assert names == ["arrivals", "decode0 lane 0", "decode0 lane 1", "prefill0"]


def test_plots(example, tmp_path):
    df = requests_frame(*example)
    for fn in (plot_latency_cdf, plot_timeline):
        p = fn(df, tmp_path / f"{fn.__name__}.png")
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = plot_latency_cdf(df[df["rejected"]], tmp_path / "empty.png")  # no completed request
    assert p.stat().st_size > 0


# --- one real simulation


def test_real_simulation_consistent(tmp_path):
    from mist.engine.run import simulate_arrays

    rng = np.random.default_rng(1)
    n = 24
    reqs = {"arrival": np.cumsum(rng.exponential(0.05, n)), "input_tokens": rng.integers(50, 600, n),
            "output_tokens": rng.integers(1, 40, n)}
    reqs["input_tokens"][5] = 200_000  # longer than the model's context: rejected
    lo = lower(Deployment.single("llama-3.1-8b", "h100", policy="chunked", max_num_seqs=8, replicas=2), reqs,
               stretch=8)
    st_, stats = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload)
    df = requests_frame(lo, st_)
    r = summarize(lo, st_, stats, df=df)
    assert r["completed"] + r["rejected"] == n and r["rejected"] >= 1 and bool(df["rejected"][5])
    done = df[df["completed"]]
    assert (done["scheduled"] >= done["arrival"] - 1e-12).all()
    assert (done["first_token"] >= done["scheduled"]).all() and (done["finish"] >= done["first_token"]).all()
    assert (done["queueing"] >= -1e-12).all()
    # one inter-token gap per generated token after the first
    assert r["itl_count"] == int((done["output_tokens"] - 1).sum())
    assert 0 < r["mean_utilization"] <= 1 + 1e-9
    assert r["sim_compile_s"] > 0 and r["sim_run_s"] > 0
    paths = write_outputs(tmp_path, lo, st_, r, stats, df=df)
    assert json.loads(paths["summary"].read_text())["completed"] == r["completed"]


def test_names_of_lookup_matches_per_row_loop():
    """The table lookup behind the frame's name columns gives what a per-row loop gives, codes
    outside the table included (negative, and past the end)."""
    from mist.results.frame import _names_of, reject_reason

    codes = np.array([0, 2, -1, 7, 1, 7, 5, 3])
    names = ["a", "b", "c"]
    got = _names_of(codes, names, lambda c: f"x{c}")
    assert list(got) == [names[c] if 0 <= c < 3 else f"x{c}" for c in codes]
    msgs = [reject_reason(c) for c in range(6)]
    rcodes = np.array([0, 4, 1, 0, 5])
    assert list(_names_of(rcodes, msgs, reject_reason)) == [reject_reason(c) for c in rcodes]
