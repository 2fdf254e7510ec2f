"""Sweeps: a vmapped sweep equals single simulations, infeasible configs are reported and skipped,
Pareto frontiers are non-dominated, sharding does not change results, multi-host shards cover the
configs, and the cross-vendor experiment runs in quick mode.

All simulations here share one set of capacities (20 requests, 2 clients, 32 slots, 2 stages,
2 lanes, as the cross-vendor experiment's quick mode) so that the vmapped program compiles once
for the whole module. Two lanes for four feasible configs: every sweep here refills its lanes (a
lane takes the next config when its own ends), and the 4-device run (4 lanes, six configs: refilled
as well) must agree with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

import mist  # noqa: F401  (enables x64)
import mist.sweep
from mist.sweep.analysis import best_under_slo, pareto_front, pareto_mask
from mist.sweep.sampling import expand, latin_hypercube
from mist.sweep.sharding import host_shard
from mist.sweep.spec import Axis, Sampling

ROOT = Path(__file__).resolve().parents[1]
RUN = {"configs_per_chunk": 2, "clients": 2, "slots": 32, "stages": 2, "pools": 2, "requests": 20, "progress": False}
BASE = {"workload": {"trace": "azure_conv_2023", "first": 20},
        "clients": [{"name": "llm", "pool": "llm", "model": "llama-3.1-8b", "hardware": "h100", "max_num_seqs": 16}]}
# config 2 is infeasible (TP 3 does not divide Llama-3.1-8B's 32 heads); config 4 disaggregates
POINTS = [{"hardware": "h100", "max_num_seqs": 16, "rate": 4.0},
          {"hardware": "a100-sxm-80gb", "max_num_seqs": 32, "rate": 2.0},
          {"hardware": "h100", "tp": 3},
          {"hardware": "h200", "replicas": 2, "rate": 8.0},
          {"hardware": "h100", "pd_ratio": "1:1", "decode.hardware": "h200", "rate": 4.0}]
# appended to POINTS in the 4-device run only
EXTRA = [{"hardware": "h100", "max_num_seqs": 16, "rate": 6.0}, {"hardware": "h200", "rate": 3.0}]
METRICS = ["completed", "rejected", "duration_s", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
           "mean_e2el_ms", "output_throughput", "energy_j", "cost_usd"]


def spec(points=POINTS) -> dict:
    return {"name": "t", "base": BASE, "points": points, "run": RUN}


@pytest.fixture(scope="module")
def sharded_proc(tmp_path_factory):
    """The same sweep on 4 forced host devices, in a subprocess (XLA_FLAGS must precede jax import)."""
    out = tmp_path_factory.mktemp("sharded")
    # two more feasible configs than its 4 lanes: lanes are refilled across the sharded batch too
    (out / "spec.json").write_text(json.dumps(spec(POINTS + EXTRA)))
    code = ("import sys, mist, mist.sweep, jax; assert len(jax.devices()) == 4; "
            "df = mist.sweep(sys.argv[1], progress=False); assert df.attrs['run']['devices'] == 4; "
            "df.to_parquet(sys.argv[2])")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out / "spec.json"), str(out / "sharded.parquet")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, out / "sharded.parquet"
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def swept(sharded_proc):
    return mist.sweep(spec(), progress=False)


def test_sweep_equals_single_simulations(swept):
    from mist.engine.run import simulate_arrays
    from mist.lowering.deployment import lower
    from mist.results import summarize
    from mist.sweep import prepare
    from mist.sweep.runner import config_keys
    from mist.sweep.sweep import slo_of

    prep = prepare(spec())
    dims = prep.lowered.dims
    assert len(swept) == len(POINTS)
    # the sweep admits arrivals inside its decode stretches (dims.absorb), the single simulations
    # here do not: the same results in fewer steps where a lone chunked client runs, and never more
    # steps (a padded topology keeps which clients feed which: replicas advance independently)
    assert dims.absorb > 0
    fewer = []
    for plan in prep.plans:
        row = swept.iloc[plan.index]
        if not plan.feasible:
            continue
        reqs = prep.workloads[plan.workload]
        from mist.sweep.configs import rescale_arrivals

        reqs = {**reqs, "arrival": rescale_arrivals(reqs["arrival"], plan.rate)}
        lo = lower(plan.deployment, reqs, slots=dims.slots, num_clients=dims.num_clients, stages=dims.stages,
                   pools=dims.pools, pipelines=dims.pipelines, num_requests=dims.num_requests, absorb=0,
                   window=dims.window)
        assert lo.dims._replace(absorb=dims.absorb) == dims
        key = jax.numpy.asarray(config_keys(0, [plan.index])[0])
        st, _ = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload, key=key)
        s = summarize(lo, jax.device_get(st), None, slo_of(prep.spec))
        for m in METRICS:
            assert np.isclose(row[m], s[m], rtol=1e-9, atol=1e-9, equal_nan=True), (plan.index, m, row[m], s[m])
        assert bool(row["slo_met"]) == s["slo_met"]
        assert row["scan_steps"] <= int(st.steps)
        fewer.append(row["scan_steps"] < int(st.steps))
    assert sum(fewer) >= 2, fewer  # configs 0 and 1 (one replica, chunked prefill)


def test_admissions_inside_stretches_only_where_most_configs_use_them():
    """Sweeps admit arrivals inside decode stretches (`SWEEP_ABSORB`) when at least half the configs
    are a lone chunked client (two of the four here); sweeps of mostly replicas and disaggregated
    units would pay the passes for little; a sweep file's `engine.absorb` decides over both."""
    from mist.sweep import prepare
    from mist.sweep.lowering import SWEEP_ABSORB

    assert SWEEP_ABSORB > 0 and prepare(spec()).lowered.dims.absorb == SWEEP_ABSORB
    assert prepare(spec([POINTS[3], POINTS[4]])).lowered.dims.absorb == 0
    s = spec([POINTS[3]])
    s["base"] = {**BASE, "engine": {"absorb": 3}}
    assert prepare(s).lowered.dims.absorb == 3


def test_padded_topology_keeps_every_field():
    """Padding a deployment's topology to a sweep's capacities keeps which clients feed which and
    the layer-by-layer KV transfer of its decode stages, and pads them inertly."""
    from mist.lowering.deployment import Deployment, PipelineSpec, StageSpec, lower
    from mist.sweep.lowering import _host, pad_topology

    dep = replace(Deployment.disaggregated("llama-3.1-8b", "h100"), pipelines=[PipelineSpec("chat", [
        StageSpec("prefill", emits=True), StageSpec("decode", kv_transfer=True, kv_layerwise=True)])])
    reqs = {"arrival": np.zeros(2), "input_tokens": np.full(2, 64), "output_tokens": np.full(2, 8)}
    t = _host(lower(dep, reqs).topology)
    p = pad_topology(t, 4, 3, 2, 3)
    np.testing.assert_array_equal(p.feeds, [[False, True, False, False]] + [[False] * 4] * 3)
    assert p.stage_kv_layers.shape == (2, 3) and p.stage_kv_layers[0, 1] == 32  # Llama-3.1-8B's layers
    np.testing.assert_array_equal(np.delete(p.stage_kv_layers.ravel(), 1), 1.0)


def test_infeasible_config_is_reported_and_others_unaffected(swept):
    assert list(swept["feasible"]) == [True, True, False, True, True]
    assert "tp" in swept.loc[2, "reason"] and "divide" in swept.loc[2, "reason"]
    assert np.isnan(swept.loc[2, "completed"])
    alone = mist.sweep(spec([p for i, p in enumerate(POINTS) if i != 2]), progress=False)
    for m in METRICS:
        np.testing.assert_array_equal(alone[m].to_numpy(), swept[swept["feasible"]][m].to_numpy())
    assert (swept.loc[swept["feasible"], "completed"] == 20).all()
    assert swept.loc[4, "deployment"].startswith("prefill: 1x h100")


def test_pareto_front_is_non_dominated_and_holds_each_best():
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"config": range(n), "feasible": rng.random(n) > 0.1,
                       "output_tokens_per_dollar": rng.lognormal(10, 1, n), "p99_ttft_ms": rng.lognormal(5, 1, n),
                       "p99_tpot_ms": rng.lognormal(3, 0.5, n)})
    front = pareto_front(df)
    feas = df[df["feasible"]]
    obj = feas[["output_tokens_per_dollar", "p99_ttft_ms", "p99_tpot_ms"]].to_numpy() * [-1, 1, 1]
    fo = front[["output_tokens_per_dollar", "p99_ttft_ms", "p99_tpot_ms"]].to_numpy() * [-1, 1, 1]
    for p in fo:  # nothing dominates a frontier point
        assert not (((obj <= p).all(1)) & ((obj < p).any(1))).any()
    for q, row in zip(obj, feas["config"]):  # every other point is dominated by a frontier point
        if row not in set(front["config"]):
            assert (((fo <= q).all(1)) & ((fo < q).any(1))).any()
    assert feas["output_tokens_per_dollar"].idxmax() in front.index
    assert feas["p99_ttft_ms"].idxmin() in front.index
    assert feas["p99_tpot_ms"].idxmin() in front.index
    assert pareto_mask(np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 0.5], [2.0, 2.0]])).tolist() == [True, True, True, False]


def test_pareto_and_best_on_sweep(swept):
    front = pareto_front(swept)
    assert set(front["config"]) <= set(swept.loc[swept["feasible"], "config"])
    feas = swept[swept["feasible"]]
    assert feas["output_tokens_per_dollar"].idxmax() in front.index
    best = best_under_slo(swept)
    if len(best):
        assert bool(best.iloc[0]["slo_met"])
    assert best_under_slo(swept, slo={"ttft_ms": 1e-6, "tpot_ms": 1e-6}).empty


def test_sharded_equals_unsharded(swept, sharded_proc):
    proc, path = sharded_proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    sh = pd.read_parquet(path)
    assert len(sh) == len(POINTS) + len(EXTRA) and sh["completed"].iloc[len(POINTS):].eq(20).all()
    sh = sh.iloc[: len(POINTS)]
    # counts and SLO verdicts are identical; times agree to float32 cost-model rounding (the sharded
    # program may fuse the float32 roofline arithmetic differently: ~1 ns on a timestamp)
    for m in ["completed", "rejected", "slo_met", "feasible", "scan_steps"]:
        np.testing.assert_array_equal(sh[m].to_numpy(), swept[m].to_numpy(), err_msg=m)
    for m in METRICS:
        np.testing.assert_allclose(sh[m].to_numpy(float), swept[m].to_numpy(float), rtol=1e-6, err_msg=m)


def test_table_columns_are_unique_and_written(tmp_path):
    from mist.sweep.table import assemble, write_table

    df = assemble([{"config": 1, "feasible": True, "hardware": "h200", "rate": 2.0, "x": 1.0},
                   {"config": 0, "feasible": True, "hardware": "h100", "rate": 1.0, "x": 2.0}],
                  ["hardware", "rate"] + sorted({"hardware", "rate"}))
    assert list(df.columns) == ["config", "feasible", "rate", "hardware", "x"]
    assert df["config"].tolist() == [0, 1]
    pq, _ = write_table(df, tmp_path)
    assert pd.read_parquet(pq).equals(df)


def test_host_shards_cover_configs_once():
    for n in (0, 1, 7, 100, 4097):
        for k in (1, 2, 3, 8):
            parts = [host_shard(n, i, k) for i in range(k)]
            assert np.array_equal(np.concatenate(parts), np.arange(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        host_shard(10, 2, 2)


def test_lane_count_refills_each_lane_more_on_cpu():
    """Lanes: max(32, configs / 32) on CPU and max(32, configs / 8) elsewhere, capped by the configs,
    a multiple of the shards, and what the memory budget holds."""
    from mist.engine.tables import EngineDims
    from mist.sweep.runner import chunk_size

    dims = EngineDims(num_requests=100, num_clients=1, slots=16, window=16, queue=128, stages=1, stretch=8,
                      pools=1, pipelines=1, absorb=0)
    big = 64.0  # GB: the memory budget never binds here
    assert chunk_size(dims, 1000, memory_gb=big, shards=2, on_cpu=True) == 32
    assert chunk_size(dims, 1000, memory_gb=big, shards=2, on_cpu=False) == 126
    assert chunk_size(dims, 4096, memory_gb=big, shards=2, on_cpu=True) == 128
    assert chunk_size(dims, 10, memory_gb=big, shards=4, on_cpu=True) == 12  # 10 configs, 4 shards
    assert chunk_size(dims, 1000, configs_per_chunk=7, shards=2, on_cpu=True) == 8
    tiny = 1e-4  # GB: ~100 kB holds one lane per shard at most
    assert chunk_size(dims, 1000, memory_gb=tiny, shards=2, on_cpu=True) == 2


def test_sampling_grid_random_lhs():
    axes = [Axis("tp", values=[1, 2, 4]), Axis("rate", low=1.0, high=16.0, num=5, log=True)]
    grid = expand(axes, Sampling("grid"))
    assert len(grid) == 15 and grid[-1] == {"tp": 4, "rate": 16.0}
    lhs = expand(axes, Sampling("lhs", n=9, seed=1))
    assert len(lhs) == 9 and all(1.0 <= p["rate"] <= 16.0 for p in lhs)
    assert sorted(p["tp"] for p in lhs) == [1, 1, 1, 2, 2, 2, 4, 4, 4]  # one draw per stratum
    u = latin_hypercube(50, 3, np.random.default_rng(0))
    for j in range(3):
        assert sorted((u[:, j] * 50).astype(int)) == list(range(50))


def test_spec_errors_name_file_and_field(tmp_path):
    from mist.specs.errors import SpecError

    p = tmp_path / "bad_sweep.yaml"
    p.write_text("base: {workload: {trace: azure_conv_2023, first: 5}, clients: [{name: a, model: llama-3.1-8b}]}\n"
                 "axes: {hardwre: [h100]}\n")
    with pytest.raises(SpecError, match="bad_sweep.yaml.*axes.hardwre"):
        mist.sweep.load_sweep(p)
    p.write_text("base: {workload: {trace: azure_conv_2023, first: 5}, clients: [{name: a, model: llama-3.1-8b}]}\n"
                 "axes: {hardware: [h1000]}\n")
    with pytest.raises(SpecError, match="axes.hardware"):
        mist.sweep.load_sweep(p)
    p.write_text("base: {workload: {trace: azure_conv_2023, first: 5}, clients: [{name: a, model: llama-3.1-8b}],"
                 " engine: {absorb: -1}}\naxes: {hardware: [h100]}\n")
    with pytest.raises(SpecError, match="engine.absorb.*>= 0"):
        mist.sweep.load_sweep(p)


def test_cross_vendor_quick_runs(tmp_path, swept):
    import runpy

    mod = runpy.run_path(str(ROOT / "experiments" / "cross_vendor_dse.py"))
    assert mod["main"](["--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cross_vendor_dse.csv").exists()
    assert (tmp_path / "cross_vendor_dse.png").exists()


def test_max_sustainable_rate_brackets_and_runs_only_open_configs(swept):
    """Each config meets the SLO at its max_rate and misses it at its finite upper bound; only
    configs whose bracket is open are simulated (all at low, those passing low at high, then the
    undecided ones each round)."""
    from mist.sweep import max_sustainable_rate, prepare

    slo = {"ttft_ms": 60.0, "tpot_ms": 12.0}  # configs 0 and 1 are bracketed, 3 and 4 pass even at `high`
    pts = [{k: v for k, v in p.items() if k != "rate"} for p in POINTS]
    prep = prepare({**spec(pts), "slo": slo})
    rounds = 2
    res = max_sustainable_rate(prep, low=0.5, high=64.0, rounds=rounds)
    assert list(res["config"]) == [0, 1, 3, 4]
    passed_lo = res["max_rate"] > 0
    open_ = passed_lo & np.isfinite(res["upper"])
    assert prep.info.configs == len(res) + int(passed_lo.sum()) + rounds * int(open_.sum())
    assert (res.loc[~passed_lo, "upper"] == 0.5).all()
    assert open_.sum() == 2 and (res["upper"] == np.inf).sum() == 2
    for col, want in (("max_rate", True), ("upper", False)):
        rate = {int(c): float(r) for c, r in zip(res["config"], res[col]) if 0 < r < np.inf}
        if not rate:
            continue
        check = mist.sweep({**spec([{**p, "rate": rate.get(i, 1.0)} for i, p in enumerate(pts)]), "slo": slo},
                           progress=False)
        for c in rate:
            assert bool(check.loc[c, "slo_met"]) is want, (col, c, rate[c])


def test_search_finds_the_cheapest_deployment_meeting_the_slo(swept):
    """`mist search` on a 4-deployment grid (sharing this module's compiled program): the answer meets
    the SLO, nothing cheaper in the table does, runners-up follow in price order; an impossible SLO
    gives no answer and says so."""
    from mist.sweep.search import search

    kw = dict(model="llama-3.1-8b", rate=4.0, hardware=("h100", "a100-sxm-80gb"), tp=(1,), max_replicas=2,
              num_requests=20, run=RUN)
    res = search(slo={"ttft_ms": 5000.0, "tpot_ms": 200.0}, **kw)
    df = res.table
    assert len(df) == 4 and df["feasible"].all()
    assert set(zip(df["hardware"], df["replicas"])) == {("h100", 1), ("h100", 2), ("a100-sxm-80gb", 1),
                                                        ("a100-sxm-80gb", 2)}
    met = df[df["slo_met"].fillna(False).astype(bool)]
    assert res.best is not None and bool(res.best["slo_met"])
    assert res.best["price_per_hour_usd"] == met["price_per_hour_usd"].min()
    assert res.best["p99_ttft_ms"] <= 5000.0 and res.best["p99_tpot_ms"] <= 200.0
    prices = [res.best["price_per_hour_usd"]] + list(res.runners_up["price_per_hour_usd"])
    assert prices == sorted(prices) and len(res.runners_up) == len(met) - 1
    assert "cheapest:" in res.report()
    out = res.to_json()
    assert out["evaluated"] == 4 and out["best"]["deployment"] == res.best["deployment"]

    none = search(slo={"ttft_ms": 1e-3, "tpot_ms": 1e-3}, **kw)
    assert none.best is None and none.runners_up.empty
    assert "no deployment meets the SLOs" in none.report()


def test_import_makes_one_cpu_device_per_core():
    """`import mist` gives JAX one CPU device per usable core (a sweep shards over them), or
    MIST_CPU_DEVICES of them; a user's own XLA_FLAGS device count wins; a bad value is a clear error."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "MIST_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    code = "import mist, jax; print(len(jax.devices()))"

    def devices(**extra):
        p = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else p.stderr

    assert devices() == str(min(len(os.sched_getaffinity(0)), 32))
    assert devices(MIST_CPU_DEVICES="3") == "3"
    assert devices(MIST_CPU_DEVICES="3", XLA_FLAGS="--xla_force_host_platform_device_count=5") == "5"
    assert "MIST_CPU_DEVICES='0'" in devices(MIST_CPU_DEVICES="0")
