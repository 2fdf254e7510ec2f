"""The scan engine against a plain-Python reference (tests/reference_engine.py), and the tests every
engine deserves (STYLE.md pattern 9): per-iteration mode equals event skipping, a vmapped batch
equals separate runs, invariants on random workloads, padding independence, no retracing.

Every config here is lowered to one of two shared sets of static sizes (`D16`: event skipping,
`D1`: per-iteration mode with larger padding everywhere), so the whole file compiles the engine
three times (D16, D1, and D16 vmapped); compiling dominates the run time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st_

import mist  # noqa: F401  (enables x64)
import mist.engine.run as engine_run
from mist.engine.run import simulate_arrays
from mist.engine.tables import Reject
from mist.lowering import Deployment, lower, stack_lowered
from mist.lowering.deployment import ClientSpec, PipelineSpec, StageSpec
from reference_engine import ReferenceEngine

MODEL = "llama-3.1-8b"
# shared static sizes: event skipping (D16) and per-iteration mode with more padding (D1)
D16 = dict(num_requests=32, num_clients=2, slots=4, window=4, queue=32, stages=2, pools=2, pipelines=1, stretch=16)
D1 = dict(num_requests=40, num_clients=3, slots=6, window=4, queue=40, stages=3, pools=3, pipelines=2, stretch=1)
TOL = 1e-9  # seconds


# ------------------------------------------------------------------------------------------- inputs
def workload(seed: int, n: int, rate: float = 30.0, out_max: int = 60) -> dict:
    """Poisson arrivals, prompts of 20-600 tokens (30% with a cached prefix), 1-out_max outputs."""
    r = np.random.default_rng(seed)
    arrival = np.cumsum(r.exponential(1.0 / rate, n))
    return dict(arrival=arrival, input_tokens=r.integers(20, 600, n), output_tokens=r.integers(1, out_max + 1, n),
                cached_tokens=np.where(r.random(n) < 0.3, r.integers(0, 200, n), 0),
                prefix_hash=r.integers(0, 5, (n, 1)), pipeline=np.zeros(n, int))


def with_kv_blocks(lo, blocks: int):
    """The same config with a tiny KV cache (forces preemption)."""
    kv = np.minimum(np.asarray(lo.clients.kv_blocks), blocks).astype(np.int32)
    return dataclasses.replace(lo, clients=dataclasses.replace(lo.clients, kv_blocks=jax.numpy.asarray(kv)))


POLICY_KW = {"chunked": dict(max_num_batched_tokens=512, chunk_size=128),
             "continuous": dict(max_num_batched_tokens=1024), "static": dict(max_num_batched_tokens=1024),
             "decode-priority": dict(max_num_batched_tokens=1024)}


def deployment(case: str) -> tuple[Deployment, dict, int | None]:
    """(deployment, workload, KV blocks override) of a named test case."""
    kind, _, arg = case.partition(":")
    if kind in ("single", "tinykv", "swapkv"):  # swapkv: tinykv preempting by swapping to host memory
        mode = "swap" if kind == "swapkv" else "recompute"
        dep = Deployment.single(MODEL, "h100", policy=arg, max_num_seqs=4, preemption_mode=mode, **POLICY_KW[arg])
        return dep, workload(1 if kind == "single" else 2, 24), (None if kind == "single" else 60)
    if kind == "replicas":
        dep = Deployment.single(MODEL, "h100", policy="chunked", max_num_seqs=3, replicas=2, router=arg,
                                **POLICY_KW["chunked"])
        return dep, workload(3, 30, rate=60.0), None
    if kind == "disagg":
        dep = Deployment.disaggregated(MODEL, "h100", num_prefill=1, num_decode=1, policy=arg, max_num_seqs=4,
                                       link_gbs=5.0, link_us=20.0, **POLICY_KW[arg])
        return dep, workload(4, 24, rate=40.0), (40 if arg == "continuous" else None)
    if kind == "rejects":  # context length, KV capacity and batch-token rejections
        dep = Deployment.single(MODEL, "h100", policy="continuous", max_num_seqs=4, max_num_batched_tokens=300,
                                max_model_len=520)
        return dep, workload(5, 30, out_max=200), 30
    if kind == "server":  # a CPU pre-processing stage that adds prompt tokens, then the LLM
        clients = [ClientSpec("pre", pool="cpu", kind="server", serve_base=2e-3, serve_per_item=5e-4,
                              serve_per_token=1e-6, max_num_seqs=2),
                   ClientSpec("llm", pool="llm", model=MODEL, policy="chunked", max_num_seqs=4,
                              **POLICY_KW["chunked"])]
        pipe = PipelineSpec("rag", [StageSpec("cpu", extra_prompt=64), StageSpec("llm", emits=True)])
        return Deployment(clients=clients, pipelines=[pipe]), workload(6, 20), None
    raise ValueError(case)


CASES = ([f"single:{p}" for p in POLICY_KW] + [f"tinykv:{p}" for p in POLICY_KW] + [f"swapkv:{p}" for p in POLICY_KW]
         + [f"replicas:{r}" for r in ("round-robin", "least-outstanding", "prefix-affinity")]
         + ["disagg:chunked", "disagg:continuous", "rejects", "server"])


def lowered(case: str, dims: dict, **kw):
    dep, reqs, kv = deployment(case)
    lo = lower(dep, reqs, **{**dims, **kw})
    return with_kv_blocks(lo, kv) if kv else lo


@functools.lru_cache(maxsize=None)
def run_case(case: str, mode: str = "D16"):
    lo = lowered(case, D16 if mode == "D16" else D1)
    st, stats = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload)
    return lo, jax.device_get(st), stats


@functools.lru_cache(maxsize=None)
def ref_case(case: str):
    return ReferenceEngine(run_case(case)[0]).run()


# ---------------------------------------------------------------------------------------- checks
def n_valid(lo) -> int:
    return int(np.asarray(lo.workload.valid).sum())


def outputs(st, n: int) -> dict:
    g = lambda x: np.asarray(x)[:n]  # noqa: E731
    return dict(first_token=g(st.o_first_token), finish=g(st.o_finish), stage_start=g(st.o_stage_start),
                stage_end=g(st.o_stage_end), stage_client=g(st.o_stage_client), preemptions=g(st.o_preemptions),
                reject=g(st.o_reject))


def assert_times(a, b, what: str, tol: float = TOL):
    a, b = np.asarray(a, float), np.asarray(b, float)
    k = min(a.shape[-1], b.shape[-1]) if a.ndim == 2 else None
    if k is not None:  # stage arrays of different stage capacity: compare the common stages
        a, b = a[:, :k], b[:, :k]
    assert np.array_equal(np.isinf(a), np.isinf(b)), f"{what}: set/unset differ at {np.argwhere(np.isinf(a) != np.isinf(b))[:5].tolist()}"
    fin = np.isfinite(a)
    err = np.abs(a[fin] - b[fin])
    assert err.size == 0 or err.max() <= tol, f"{what}: max |diff| {err.max():.3g} s at {np.argwhere(np.abs(np.where(fin, a - b, 0)) > tol)[:5].tolist()}"


def assert_same_outputs(a: dict, b: dict, tol: float = TOL):
    for f in ("first_token", "finish", "stage_start", "stage_end"):
        assert_times(a[f], b[f], f, tol)
    for f in ("preemptions", "reject"):
        assert np.array_equal(a[f], b[f]), f"{f} differ: {a[f]} vs {b[f]}"
    k = min(a["stage_client"].shape[1], b["stage_client"].shape[1])
    assert np.array_equal(a["stage_client"][:, :k], b["stage_client"][:, :k]), "stage clients differ"


def ref_outputs(ref) -> dict:
    return dict(first_token=ref.first_token, finish=ref.finish, stage_start=ref.stage_start, stage_end=ref.stage_end,
                stage_client=ref.stage_client, preemptions=ref.preemptions, reject=ref.reject)


def assert_invariants(lo, st, ref):
    """No request lost, time never goes backwards, every requested token generated, KV within capacity."""
    n = n_valid(lo)
    o = outputs(st, n)
    wl = lo.workload
    arrival = np.asarray(wl.arrival)[:n]
    served = o["reject"] == Reject.NONE
    # no request lost: each one finished or has a reason
    assert int(st.completed) == n
    assert np.all(np.isfinite(o["finish"]) == served)
    # time never goes backwards along a request
    pipes = np.asarray(lo.topology.pipeline_pools)[np.asarray(wl.pipeline)[:n]]  # [n, K]
    for r in np.flatnonzero(served):
        stages = np.flatnonzero(pipes[r] >= 0)
        t = arrival[r]
        for k in stages:
            assert t <= o["stage_start"][r, k] <= o["stage_end"][r, k], (r, k)
            t = o["stage_end"][r, k]
        assert arrival[r] <= o["first_token"][r] <= o["finish"][r] == o["stage_end"][r, stages[-1]]
    # tokens generated equal tokens requested (counted token by token in the reference)
    out = np.asarray(wl.output_tokens)[:n]
    role = np.asarray(lo.clients.role)
    for r in np.flatnonzero(served):
        llm_stages = [k for k in range(ref.tokens.shape[1]) if ref.stage_client[r, k] >= 0
                      and np.asarray(lo.clients.kind)[ref.stage_client[r, k]] == 0]
        assert ref.tokens[r, llm_stages[-1]] + sum(ref.tokens[r, k] for k in llm_stages[:-1]
                                                   if role[ref.stage_client[r, k]] == 1) == out[r], r
    # KV never exceeds capacity
    cap = np.asarray(lo.clients.kv_blocks)
    assert np.all(ref.max_kv_blocks <= cap), (ref.max_kv_blocks, cap)


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_engine(case):
    lo, st, _ = run_case(case)
    ref = ref_case(case)
    n = n_valid(lo)
    assert_same_outputs(ref_outputs(ref), outputs(st, n))
    np.testing.assert_array_equal(ref.iters, np.asarray(st.iters))
    np.testing.assert_allclose(ref.busy, np.asarray(st.busy), rtol=0, atol=1e-9)
    assert_invariants(lo, st, ref)
    # each case exercises what it is named for
    if case.startswith(("tinykv", "swapkv")) or case == "disagg:continuous":
        assert ref.preemptions.sum() > 0
    if case.startswith("swapkv"):  # KV went to host memory and back instead of being recomputed
        assert ref.swap_seconds > 0
        assert ref_case("tinykv:" + case.split(":")[1]).swap_seconds == 0
    if case.startswith("replicas"):
        assert set(ref.stage_client[:, 0]) == {0, 1}
    if case == "rejects":  # includes a preempted request whose recomputation exceeds M (runs alone)
        assert ref.preemptions.sum() > 0
        assert {Reject.CONTEXT_LENGTH, Reject.KV_CAPACITY, Reject.BATCH_TOKENS} <= set(ref.reject.tolist())
    if case.startswith("disagg"):
        assert np.all(ref.stage_client[ref.reject == 0] == [0, 1])
        if case == "disagg:chunked":  # the first token comes from the prefill client, before the KV crosses
            ok = ref.reject == 0
            assert np.all(ref.first_token[ok] == ref.stage_end[ok, 0])
            assert np.all(ref.stage_start[ok, 1] > ref.stage_end[ok, 0])


@pytest.mark.parametrize("case", ["tinykv:static", "tinykv:continuous", "tinykv:chunked", "tinykv:decode-priority",
                                  "swapkv:chunked", "swapkv:continuous",
                                  "replicas:least-outstanding", "disagg:chunked", "server"])
def test_per_iteration_mode_matches_event_skipping(case):
    """stretch=1 (one iteration per scan step, and larger padding of every capacity) gives the same
    timestamps as skipping decode stretches."""
    lo16, st16, _ = run_case(case, "D16")
    lo1, st1, _ = run_case(case, "D1")
    assert lo1.dims.stretch == 1 and lo16.dims.stretch == 16
    n = n_valid(lo16)
    assert_same_outputs(outputs(st16, n), outputs(st1, n), tol=1e-12)
    np.testing.assert_array_equal(np.asarray(st16.iters), np.asarray(st1.iters)[:2])
    assert int(st16.steps) < int(st1.steps)  # the stretches did skip events


def test_vmapped_batch_equals_separate_runs():
    """Configs with different policies, batch sizes, rates, KV and topologies, stacked on one axis."""
    cases = ["single:chunked", "tinykv:static", "replicas:least-outstanding", "disagg:continuous", "rejects"]
    los = [run_case(c)[0] for c in cases]
    stacked = stack_lowered(los)
    key = jax.random.split(jax.random.PRNGKey(0), len(cases))
    st, _ = simulate_arrays(stacked.dims, stacked.clients, stacked.topology, stacked.workload, key=key, batched=True)
    st = jax.device_get(st)
    for i, (c, lo) in enumerate(zip(cases, los)):
        one = jax.tree.map(lambda x: x[i], st)
        sep = run_case(c)[1]
        n = n_valid(lo)
        assert_same_outputs(outputs(one, n), outputs(sep, n), tol=0.0)
        np.testing.assert_array_equal(np.asarray(one.iters), np.asarray(sep.iters))


def test_no_retrace_when_only_parameter_values_change(monkeypatch):
    """A second config with the same static sizes reuses the compiled scan (no new trace of `step`)."""
    traces = []
    inner = engine_run.step

    def counting_step(*a, **k):
        traces.append(1)
        return inner(*a, **k)

    monkeypatch.setattr(engine_run, "step", counting_step)
    lo_a = lowered("single:chunked", D16)
    simulate_arrays(lo_a.dims, lo_a.clients, lo_a.topology, lo_a.workload)
    after_first = len(traces)
    assert after_first <= 1
    dep = Deployment.single(MODEL, "h200", policy="static", max_num_seqs=2, max_num_batched_tokens=2048)
    lo_b = with_kv_blocks(lower(dep, workload(7, 17, rate=5.0), **D16), 500)
    assert lo_b.dims == lo_a.dims
    _, stats = simulate_arrays(lo_b.dims, lo_b.clients, lo_b.topology, lo_b.workload)
    assert len(traces) == after_first
    assert stats.compile_s < 2.0


POLICIES = ["static", "continuous", "chunked", "decode-priority"]


@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: each example runs the engine twice
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st_.integers(0, 10_000), n=st_.integers(12, 30), policy=st_.sampled_from(POLICIES),
       max_num_seqs=st_.integers(1, 4), rate=st_.sampled_from([5.0, 30.0, 200.0]),
       kv=st_.sampled_from([None, 45, 100]), replicas=st_.sampled_from([1, 2]))
def test_random_workloads(seed, n, policy, max_num_seqs, rate, kv, replicas):
    """Reference == engine, invariants, and the same timestamps with per-iteration mode and larger padding."""
    dep = Deployment.single(MODEL, "h100", policy=policy, max_num_seqs=max_num_seqs, replicas=replicas,
                            router="least-outstanding", **POLICY_KW[policy])
    reqs = workload(seed, n, rate=rate)
    out = {}
    for name, dims in (("D16", D16), ("D1", D1)):
        lo = lower(dep, reqs, **dims)
        lo = with_kv_blocks(lo, kv) if kv else lo
        st, _ = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload)
        out[name] = (lo, jax.device_get(st))
    lo, st = out["D16"]
    ref = ReferenceEngine(lo).run()
    assert_same_outputs(ref_outputs(ref), outputs(st, n))
    assert_invariants(lo, st, ref)
    assert_same_outputs(outputs(st, n), outputs(out["D1"][1], n), tol=1e-12)


def with_prompt_time(lo, seconds, above_s=0.0, knee=0.0):
    """`lo` with every client paying `seconds` of host time per prefilled prompt chunk (and, with
    `above_s`, that many seconds per token of an iteration beyond `knee` tokens)."""
    p = lo.clients.params
    if seconds:
        p = dataclasses.replace(p, log_cpu_per_prompt=jax.numpy.full_like(p.log_cpu_per_prompt, np.log(seconds)))
    if above_s:
        p = dataclasses.replace(p, log_cpu_per_token_above=jax.numpy.full_like(p.log_cpu_per_token_above,
                                                                                np.log(above_s)),
                                cpu_token_knee=jax.numpy.full_like(p.cpu_token_knee, knee))
    return dataclasses.replace(lo, clients=dataclasses.replace(lo.clients, params=p))


@pytest.mark.parametrize("max_num_seqs,kv,rate,out_max,prompt_s", [
    (4, None, 20.0, 60, 0.0), (2, None, 6.0, 60, 0.0), (4, 120, 6.0, 60, 0.0), (2, None, 60.0, 60, 0.0),
    (4, 45, 30.0, 200, 0.0), (4, None, 20.0, 60, 2e-3), (4, None, 20.0, 60, "above")])
def test_arrivals_admitted_inside_stretches(max_num_seqs, kv, rate, out_max, prompt_s):
    """A lone chunked-prefill client admits waiting queue entries and the next arrivals inside a
    decode stretch (dims.absorb): fewer scan steps, the same timestamps and iterations as ending
    every stretch at an arrival or a completion, and the reference engine's timestamps (also with
    slots or KV blocks the binding limit, a saturated queue, preemptions, a per-prompt host time,
    and a host time per token beyond a knee ("above": 50 us per token past 100 tokens), which the
    mixed iterations of a stretch must charge as the per-iteration engine does)."""
    above = prompt_s == "above"
    prompt_s = 0.0 if above else prompt_s
    dep = Deployment.single(MODEL, "h100", policy="chunked", max_num_seqs=max_num_seqs, max_num_batched_tokens=1024,
                            chunk_size=512)
    reqs = workload(11, 30, rate=rate, out_max=out_max)
    runs = {}
    for absorb in (0, 8):
        lo = lower(dep, reqs, **D16, absorb=absorb)
        lo = with_kv_blocks(lo, kv) if kv else lo
        lo = with_prompt_time(lo, prompt_s) if prompt_s else lo
        lo = with_prompt_time(lo, 0.0, above_s=5e-5, knee=100.0) if above else lo
        st, _ = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload)
        runs[absorb] = (lo, jax.device_get(st))
    (lo, st), (_, st0) = runs[8], runs[0]
    n = n_valid(lo)
    assert_same_outputs(outputs(st, n), outputs(st0, n), tol=1e-12)
    np.testing.assert_array_equal(np.asarray(st.iters), np.asarray(st0.iters))
    assert int(st.steps) < int(st0.steps)
    ref = ReferenceEngine(lo).run()
    assert_same_outputs(ref_outputs(ref), outputs(st, n))
    assert_invariants(lo, st, ref)
    if kv == 45:
        assert ref.preemptions.sum() > 0
    if prompt_s or above:  # the prompt time (or the time beyond the knee) changed the timestamps
        base = lower(dep, reqs, **D16, absorb=8)
        st_base, _ = simulate_arrays(base.dims, base.clients, base.topology, base.workload)
        assert np.nanmean(outputs(st, n)["first_token"]) > np.nanmean(outputs(jax.device_get(st_base), n)["first_token"])


def test_admission_window_never_caps_a_chunked_burst():
    """A chunked-prefill client admits a burst larger than the admission window in one iteration,
    as with a window as large as the batch: the engine admits a full window, then the entries behind
    it in further steps at the same time (`step.splits_admissions`). Same timestamps and iterations,
    more scan steps, and the reference engine's timestamps."""
    dep = Deployment.single(MODEL, "h100", policy="chunked", max_num_seqs=8, max_num_batched_tokens=1024,
                            chunk_size=512)
    r = np.random.default_rng(7)
    n = 30
    arrival = np.repeat(np.arange(3) * 0.5, 10) + r.uniform(0, 1e-3, n)  # three bursts of ten
    reqs = dict(arrival=np.sort(arrival), input_tokens=r.integers(20, 90, n), output_tokens=r.integers(1, 40, n),
                cached_tokens=np.zeros(n, int), prefix_hash=r.integers(0, 5, (n, 1)), pipeline=np.zeros(n, int))
    runs = {}
    for window in (2, 8):
        lo = lower(dep, reqs, **{**D16, "slots": 8, "window": window})
        st, _ = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload)
        runs[window] = (lo, jax.device_get(st))
    (lo, st), (_, st8) = runs[2], runs[8]
    o = outputs(st, n)
    assert_same_outputs(o, outputs(st8, n), tol=1e-12)
    np.testing.assert_array_equal(np.asarray(st.iters), np.asarray(st8.iters))
    assert int(st.steps) > int(st8.steps)
    # the burst really was admitted more than a window at a time
    assert np.unique(o["stage_start"][:, 0], return_counts=True)[1].max() > 2
    ref = ReferenceEngine(lo).run()
    assert_same_outputs(ref_outputs(ref), o)
    assert_invariants(lo, st, ref)


@settings(max_examples=60, deadline=None)
@given(a=st_.lists(st_.integers(-2**31, 2**31 - 1), min_size=1, max_size=32), b=st_.integers(1, 2**30 - 1))
def test_float_division_helpers_are_exact(a, b):
    """The step's ceil and floor divisions by a per-config divisor (block size) go through float64
    division (which XLA CPU computes through a reciprocal, so 237 / 237 < 1) and a correction in
    integers; they equal Python's integer arithmetic, also at exact multiples of b and one either side
    of them, where a float quotient rounds across an integer."""
    from mist.engine.step import _cdiv, _fdivmod

    near = [x for v in a for x in ((v // b) * b - 1, (v // b) * b, (v // b) * b + 1, v)
            if -2**31 <= x < 2**31]
    x = np.asarray(near, np.int32)
    got_c = np.asarray(_cdiv(x, np.int32(b)))
    got_q, got_r = (np.asarray(v) for v in _fdivmod(x, np.int32(b)))
    np.testing.assert_array_equal(got_c, [-(-v // b) for v in near])
    np.testing.assert_array_equal(got_q, [v // b for v in near])
    np.testing.assert_array_equal(got_r, [v % b for v in near])
