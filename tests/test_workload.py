"""Tests for mist.workload: request table, synthetic generators, trace loaders."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mist.workload import (
    Bursty, Empirical, Gamma, LogNormal, Normal, Poisson, Requests, Uniform, bundled_trace,
    bundled_trace_names, bundled_trace_path, concat, detect_format, generate, load_azure,
    load_burstgpt, load_mooncake, load_trace, load_vidur,
)

N = 20_000  # one sample size for all synthetic draws: each (kind, n) compiles once and is reused

SPEC = dict(arrival={"kind": "poisson", "rate": 2.0},
            input={"kind": "lognormal", "median": 512, "sigma": 1.0, "min": 1, "max": 8192},
            output={"kind": "uniform", "low": 1, "high": 256})


def _np(r: Requests) -> dict:
    return r.to_numpy(valid_only=False)


# ----------------------------------------------------------------- Requests
def test_from_numpy_defaults_and_roundtrip():
    r = Requests.from_numpy([0.0, 0.5, 0.5, 2.0], [10, 20, 30, 40], [1, 0, 3, 4],
                            prefix_hash=[[1, 2], [], [1], [1, 2, 3]])
    assert r.capacity == 4 and int(r.num_valid) == 4 and r.max_blocks == 3
    assert r.input_tokens.dtype == jnp.int32 and r.valid.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(r.prefix_hash[1]), [-1, -1, -1])
    np.testing.assert_array_equal(np.asarray(r.cached_tokens), 0)
    df = r.to_dataframe()
    r2 = Requests.from_dataframe(df)
    for k, v in _np(r).items():
        np.testing.assert_array_equal(v, _np(r2)[k])


@pytest.mark.parametrize("kwargs, field", [
    (dict(arrival=[0.0, -1.0], input_tokens=[1, 1], output_tokens=[1, 1]), "arrival"),
    (dict(arrival=[0.0, np.nan], input_tokens=[1, 1], output_tokens=[1, 1]), "arrival"),
    (dict(arrival=[1.0, 0.5], input_tokens=[1, 1], output_tokens=[1, 1]), "arrival"),
    (dict(arrival=[0.0, 1.0], input_tokens=[1, 0], output_tokens=[1, 1]), "input_tokens"),
    (dict(arrival=[0.0, 1.0], input_tokens=[1, 5], output_tokens=[1, -2]), "output_tokens"),
    (dict(arrival=[0.0, 1.0], input_tokens=[4, 5], output_tokens=[1, 1], cached_tokens=[5, 0]), "cached_tokens"),
    (dict(arrival=[0.0, 1.0], input_tokens=[4, 5.5], output_tokens=[1, 1]), "input_tokens"),
])
def test_from_numpy_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"field '{field}'") as ei:
        Requests.from_numpy(**kwargs)
    assert "fix:" in str(ei.value)


def test_unsorted_sort_option():
    r = Requests.from_numpy([2.0, 0.0, 1.0], [3, 1, 2], [0, 0, 0], sort=True)
    np.testing.assert_array_equal(np.asarray(r.input_tokens), [1, 2, 3])


def test_pad_preserves_valid_data():
    r = generate(jax.random.key(0), N, **SPEC)
    p = r.pad_to(N + 6)
    assert p.capacity == N + 6 and int(p.num_valid) == N
    a, b = _np(r), _np(p)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k][:N])
    assert np.all(np.isinf(b["arrival"][N:])) and not b["valid"][N:].any()
    assert (b["input_tokens"][N:] == 0).all() and (b["output_tokens"][N:] == 0).all()
    assert (b["prefix_hash"][N:] == -1).all()
    # shrink back: fine; below num_valid: error
    back = p.pad_to(N)
    np.testing.assert_array_equal(np.asarray(back.arrival), a["arrival"])
    with pytest.raises(ValueError, match="capacity"):
        p.pad_to(N - 1)
    # under jit, growing works
    grown = jax.jit(lambda x: x.pad_to(N + 4))(r)
    assert grown.capacity == N + 4 and int(grown.num_valid) == N


def test_concat_take_sort():
    a = Requests.from_numpy([0.0, 2.0], [1, 2], [1, 1], pipeline=0, capacity=3)
    b = Requests.from_numpy([1.0, 3.0], [3, 4], [1, 1], pipeline=1, prefix_hash=[[5, 6], [7]])
    c = jax.jit(concat)(a, b)
    assert c.capacity == 5 and c.max_blocks == 2 and int(c.num_valid) == 4
    np.testing.assert_array_equal(np.asarray(c.input_tokens), [1, 3, 2, 4, 0])
    np.testing.assert_array_equal(np.asarray(c.pipeline[:4]), [0, 1, 0, 1])
    assert not bool(c.valid[4])
    t = c.take(jnp.array([3, 0]))
    np.testing.assert_array_equal(np.asarray(t.input_tokens), [4, 1])
    s = t.sort_by_arrival()
    np.testing.assert_array_equal(np.asarray(s.input_tokens), [1, 4])


# ---------------------------------------------------------------- synthetic
def test_same_seed_same_workload_different_seed_differs():
    r1 = generate(jax.random.key(7), N, **SPEC)
    r2 = generate(jax.random.key(7), N, **SPEC)
    r3 = generate(jax.random.key(8), N, **SPEC)
    for k, v in _np(r1).items():
        np.testing.assert_array_equal(v, _np(r2)[k])
    assert not np.array_equal(_np(r1)["arrival"], _np(r3)["arrival"])
    assert not np.array_equal(_np(r1)["input_tokens"], _np(r3)["input_tokens"])


def test_poisson_mean_gap():
    t = np.asarray(Poisson(rate=4.0).sample(jax.random.key(1), N), np.float64)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.25) / 0.25 < 0.03
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_cv(cv):
    gaps = np.diff(np.asarray(Gamma(rate=10.0, cv=cv).sample(jax.random.key(2), N), np.float64))
    assert abs(gaps.mean() - 0.1) / 0.1 < 0.06
    assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.1


def test_constant_and_bursty():
    r = generate(0, N, arrival={"kind": "constant", "rate": 2.0}, input=10, output=5)
    np.testing.assert_allclose(np.asarray(r.arrival)[:5], [0, 0.5, 1.0, 1.5, 2.0])
    b = Bursty(base_rate=1.0, burst_rate=50.0, burst_duration=1.0, period=10.0)
    t = np.asarray(b.sample(jax.random.key(3), N), np.float64)
    assert np.all(np.diff(t) >= 0)
    frac_in_burst = np.mean((t % 10.0) < 1.0)
    assert abs(frac_in_burst - 50 / 59) < 0.03
    assert abs(len(t) / t[-1] - b.mean_rate) / b.mean_rate < 0.1


def test_lengths_within_bounds():
    k = jax.random.key(4)
    x = np.asarray(LogNormal(median=512, sigma=1.5, min=16, max=4096).sample(k, N))
    assert x.min() >= 16 and x.max() <= 4096 and abs(np.median(x) - 512) / 512 < 0.1
    y = np.asarray(LogNormal(mean=300, sigma=0.5).sample(k, N))
    assert abs(y.mean() - 300) / 300 < 0.05
    z = np.asarray(Normal(mean=5, std=20).sample(k, N))
    assert z.min() >= 1
    u = np.asarray(Uniform(low=3, high=7).sample(k, N))
    assert set(np.unique(u)) == {3, 4, 5, 6, 7}
    e = np.asarray(Empirical(values=[10, 20, 30], weights=[0, 1, 1]).sample(k, N))
    assert set(np.unique(e)) <= {20, 30}
    r = generate(k, N, **SPEC)
    assert int(r.input_tokens.min()) >= 1 and int(r.input_tokens.max()) <= 8192
    assert int(r.output_tokens.min()) >= 1 and int(r.output_tokens.max()) <= 256


@pytest.mark.parametrize("arrival, input_, field", [
    ({"kind": "poisson", "rate": -1.0}, 10, "rate"),
    ({"kind": "gamma", "rate": 1.0, "cv": 0}, 10, "cv"),
    ({"kind": "poisson", "rate": 1.0}, {"kind": "fixed", "value": -5}, "value"),
    ({"kind": "poisson", "rate": 1.0}, {"kind": "uniform", "low": -1, "high": 3}, "low"),
    ({"kind": "poisson", "rate": 1.0}, {"kind": "lognormal", "median": 10, "sigma": 1, "max": 0, "min": 1}, "max"),
    ({"kind": "poisson", "rate": 1.0, "rte": 2}, 10, "rte"),
    ({"kind": "poison", "rate": 1.0}, 10, "kind"),
])
def test_bad_specs_name_field(arrival, input_, field):
    with pytest.raises(ValueError, match=f"field '{field}'"):
        generate(0, 4, arrival=arrival, input=input_, output=4)


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.01, 1000.0), cv=st.floats(0.2, 5.0), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["poisson", "gamma", "constant", "bursty"]))
def test_arrivals_sorted_nonnegative(rate, cv, seed, kind):
    spec = {"poisson": Poisson(rate), "gamma": Gamma(rate, cv), "constant": {"kind": "constant", "rate": rate},
            "bursty": Bursty(base_rate=rate, burst_rate=rate * (1 + cv), burst_duration=1.0, period=5.0)}[kind]
    r = generate(jax.random.key(seed), N, arrival=spec, input=8, output=8)
    t = np.asarray(r.arrival)
    assert np.all(np.isfinite(t)) and t.min() >= 0 and np.all(np.diff(t) >= 0)


# ------------------------------------------------------------------- traces
AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,10,0
2023-11-16 18:16:46.6805900,20,5
"""


def _write(p, text):
    p.write_text(text)
    return p


def test_load_azure(tmp_path):
    p = _write(tmp_path / "az.csv", AZURE)
    assert detect_format(p) == "azure"
    r = load_trace(p)
    np.testing.assert_allclose(np.asarray(r.arrival), [0.0, 4.314579, 4.31941, 60.0], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(r.input_tokens), [374, 396, 10, 20])
    np.testing.assert_array_equal(np.asarray(r.output_tokens), [44, 109, 1, 5])  # 0 clamped to 1
    assert np.asarray(load_azure(p, zero_output="keep").output_tokens)[2] == 0
    assert int(load_azure(p, zero_output="drop").num_valid) == 3
    # gz works too
    gz = tmp_path / "az.csv.gz"
    gz.write_bytes(gzip.compress(AZURE.encode()))
    assert int(load_trace(gz).num_valid) == 4


def test_malformed_rows_name_file_line_field(tmp_path):
    bad = AZURE.replace("396,109", "abc,109")
    p = _write(tmp_path / "azure_conv.csv", bad)
    with pytest.raises(ValueError, match=r"azure_conv.csv line 3: field 'ContextTokens': 'abc' is not an integer"):
        load_trace(p)
    p = _write(tmp_path / "t.csv", AZURE.replace("2023-11-16 18:16:46.6805900", "yesterday"))
    with pytest.raises(ValueError, match=r"t.csv line 5: field 'TIMESTAMP'"):
        load_trace(p)
    p = _write(tmp_path / "neg.csv", AZURE.replace(",0\n", ",-3\n"))
    with pytest.raises(ValueError, match=r"neg.csv line 4: field 'GeneratedTokens'"):
        load_trace(p)
    assert int(load_trace(p, drop_invalid=True).num_valid) == 3
    p = _write(tmp_path / "m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 2}\n'
                                     '{"timestamp": 10, "input_length": "x", "output_length": 2}\n')
    with pytest.raises(ValueError, match=r"m.jsonl line 2: field 'input_length'"):
        load_trace(p)
    p = _write(tmp_path / "m2.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 2}\n{oops\n')
    with pytest.raises(ValueError, match=r"m2.jsonl line 2"):
        load_trace(p)
    p = _write(tmp_path / "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,5,1\n1.0,,2\n")
    with pytest.raises(ValueError, match=r"v.csv line 3: field 'num_prefill_tokens': value is missing"):
        load_trace(p)
    p = _write(tmp_path / "x.csv", "a,b\n1,2\n")
    with pytest.raises(ValueError, match="format"):
        load_trace(p)


def test_load_mooncake(tmp_path):
    rows = [{"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [0, 1, 2]},
            {"timestamp": 500, "input_length": 600, "output_length": 3, "hash_ids": [0, 3]},
            {"timestamp": 2000, "input_length": 100, "output_length": 7, "hash_ids": [4]}]
    p = _write(tmp_path / "mc.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    r = load_mooncake(p)
    np.testing.assert_allclose(np.asarray(r.arrival), [0.0, 0.5, 2.0])
    np.testing.assert_array_equal(np.asarray(r.prefix_hash), [[0, 1, 2], [0, 3, -1], [4, -1, -1]])
    r2 = load_trace(p, max_blocks=1)
    assert r2.max_blocks == 1
    np.testing.assert_array_equal(np.asarray(r2.prefix_hash[:, 0]), [0, 0, 4])


def test_load_vidur_and_burstgpt(tmp_path):
    p = _write(tmp_path / "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,374,44\n4.3,396,109\n")
    assert detect_format(p) == "vidur"
    r = load_vidur(p)
    np.testing.assert_allclose(np.asarray(r.arrival), [0.0, 4.3])
    np.testing.assert_array_equal(np.asarray(r.output_tokens), [44, 109])
    bg = ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
          "5,ChatGPT,472,18,490,Conversation log\n"
          "45,GPT-4,1087,0,1087,API log\n"
          "118,ChatGPT,417,10,427,Conversation log\n")
    p = _write(tmp_path / "bg.csv", bg)
    assert detect_format(p) == "burstgpt"
    r = load_trace(p)
    np.testing.assert_allclose(np.asarray(r.arrival), [0.0, 40.0, 113.0])
    np.testing.assert_array_equal(np.asarray(r.output_tokens), [18, 1, 10])
    r = load_burstgpt(p, models=["ChatGPT", "GPT-4"])
    np.testing.assert_array_equal(np.asarray(r.model), [0, 1, 0])
    r = load_burstgpt(p, models=["GPT-4"])
    assert int(r.num_valid) == 1
    assert int(load_burstgpt(p, log_type="Conversation log").num_valid) == 2


def test_trace_options(tmp_path):
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"] + [f"{i * 0.5},{i + 1},1" for i in range(100)]
    p = _write(tmp_path / "v.csv", "\n".join(lines) + "\n")
    # window [10, 20) -> 20 rows, times shifted to start at 0
    r = load_trace(p, start_s=10.0, end_s=20.0)
    t = np.asarray(r.arrival)
    assert int(r.num_valid) == 20 and t[0] == 0.0 and abs(t[-1] - 9.5) < 1e-6
    assert int(r.input_tokens[0]) == 21
    # speed / target rate
    np.testing.assert_allclose(np.asarray(load_trace(p, speed=2.0).arrival)[-1], 99 * 0.25, rtol=1e-6)
    r = load_trace(p, rate=10.0)
    t = np.asarray(r.arrival, np.float64)
    assert abs((len(t) - 1) / (t[-1] - t[0]) - 10.0) < 1e-3
    # first N / random N with seed
    assert np.asarray(load_trace(p, first=5).input_tokens).tolist() == [1, 2, 3, 4, 5]
    a = np.asarray(load_trace(p, sample=10, seed=3).input_tokens)
    b = np.asarray(load_trace(p, sample=10, seed=3).input_tokens)
    c = np.asarray(load_trace(p, sample=10, seed=4).input_tokens)
    assert len(a) == 10 and np.array_equal(a, b) and not np.array_equal(a, c) and np.all(np.diff(a) > 0)
    r = load_trace(p, first=7, capacity=16)
    assert r.capacity == 16 and int(r.num_valid) == 7
    with pytest.raises(ValueError, match="field 'sample'"):
        load_trace(p, first=3, sample=3)
    with pytest.raises(ValueError, match="field 'rate'"):
        load_trace(p, rate=-1.0)


def test_bundled_traces_load():
    assert set(bundled_trace_names()) >= {"azure_conv_2023", "azure_code_2023", "mooncake_conversation"}
    conv = bundled_trace("azure_conv_2023")
    assert int(conv.num_valid) == 19366
    t = np.asarray(conv.arrival)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0) and 3000 < t[-1] < 3700
    code = bundled_trace("azure_code_2023")
    assert int(code.num_valid) == 8819
    mc = bundled_trace("mooncake_conversation", max_blocks=64)
    assert int(mc.num_valid) >= 1000 and mc.max_blocks == 64
    assert int((mc.prefix_hash[:, 0] == 0).sum()) > 0  # shared first block
    assert bundled_trace_path("azure_conv_2023").exists()
    with pytest.raises(ValueError, match="azure_conv_2023"):
        bundled_trace("azure_conv")
