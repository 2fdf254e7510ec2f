"""Multi-stage pipelines: stage lowering (mist.lowering.stages), hand-computed stage sums, shared-tier
contention, disaggregation vs colocation, CPU vs GPU encoders, config validation, example configs,
and the case studies' --quick modes.

Every simulation here runs at the same engine capacities (`QUICK_CAPS`), so the engine compiles once
for the whole file (the case studies' --quick modes use the same capacities too).
"""

from __future__ import annotations

import glob
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mist  # noqa: F401  (x64)
from mist.cost.iteration import iteration_time, make_batch
from mist.cost.memory import DoesNotFit
from mist.lowering import stages as S
from mist.lowering.config import load_config, parse_config
from mist.lowering.deployment import ClientSpec, Deployment, LinkSpec, PipelineSpec, StageSpec, lower
from mist.specs.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
CAPS = S.QUICK_CAPS
MODEL = "llama-3.2-1b"


def reqs(inp, out, arrival=None, pipeline=None, cached=None):
    inp = np.atleast_1d(np.asarray(inp, np.int64))
    n = len(inp)
    return {"arrival": np.zeros(n) if arrival is None else np.asarray(arrival, float), "input_tokens": inp,
            "output_tokens": np.broadcast_to(np.asarray(out, np.int64), (n,)).copy(),
            "cached_tokens": np.zeros(n, np.int64) if cached is None else np.asarray(cached, np.int64),
            "pipeline": np.zeros(n, np.int64) if pipeline is None else np.asarray(pipeline, np.int64)}


def run(dep, r):
    df, summary, lo = S.simulate_at(dep, r, CAPS)
    return df, lo


def q(dt):
    return np.round(np.asarray(dt, np.float64) * 1e9) / 1e9


def client_cost(lo, c, batch):
    """Client c's iteration time, in float64 as the engine evaluates it (SEMANTICS.md 5): in float32
    the rounding to whole nanoseconds can come out 1 ns apart."""
    f64 = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)
    take = lambda tree: jax.tree.map(lambda x: x[c], tree)  # noqa: E731
    return float(iteration_time(f64(take(lo.clients.params)), f64(take(lo.clients.replica)), f64(batch)))


# ------------------------------------------------------------------------------ hand-computed sums
def test_two_stage_pipeline_is_sum_of_stages_and_transfers():
    """CPU pre-processing -> prefill client -> decode client (KV over a 10 GB/s, 20 us link)."""
    P, O = 300, 4
    clients = [S.cpu_client("pre", "pre", base_ms=1.0, per_item_ms=0.5, per_token_us=2.0),
               ClientSpec("p", "prefill", hardware="h100", model=MODEL, role="prefill", max_num_seqs=8),
               ClientSpec("d", "decode", hardware="h100", model=MODEL, role="decode", max_num_seqs=8)]
    pipe = PipelineSpec("pd", [StageSpec("pre"), StageSpec("prefill", emits=True),
                               StageSpec("decode", kv_transfer=True)])
    links = [LinkSpec("pre", "prefill", 32.0, 5.0), LinkSpec("prefill", "decode", 10.0, 20.0)]
    dep = Deployment(clients, [pipe], links=links)
    df, lo = run(dep, reqs(P, O))
    r = df.iloc[0]
    t_pre = q(1e-3 + 0.5e-3 + P * 2e-6)
    hop1 = 5e-6
    t_pf = q(client_cost(lo, 1, make_batch([P])))
    kvb = S.kv_bytes_per_token(MODEL)
    hop2 = 20e-6 + (P + 1) * kvb / 10e9
    t_dec = sum(q(client_cost(lo, 2, make_batch(decode_context=[P + j]))) for j in range(O - 1))
    assert r["stage0_end"] - r["stage0_start"] == pytest.approx(t_pre, rel=1e-9)
    assert r["stage1_start"] == pytest.approx(t_pre + hop1, rel=1e-9)
    assert r["ttft"] == pytest.approx(t_pre + hop1 + t_pf, rel=1e-9)
    assert r["stage2_start"] == pytest.approx(t_pre + hop1 + t_pf + hop2, rel=1e-9)
    assert r["e2e"] == pytest.approx(t_pre + hop1 + t_pf + hop2 + t_dec, rel=1e-6)


def test_layerwise_transfer_exposes_one_layer():
    P = 1000
    base = dict(model=MODEL, hardware="h100", max_num_seqs=8)
    clients = [ClientSpec("p", "prefill", role="prefill", **base), ClientSpec("d", "decode", role="decode", **base)]
    out = {}
    for lw in (False, True):
        pipe = PipelineSpec("pd", [StageSpec("prefill", emits=True), StageSpec("decode", kv_transfer=True,
                                                                               kv_layerwise=lw)])
        dep = Deployment(clients, [pipe], links=[LinkSpec("prefill", "decode", 1.0, 0.0)])
        df, lo = run(dep, reqs(P, 2))
        out[lw] = df.iloc[0]["stage1_start"] - df.iloc[0]["stage0_end"]
    kvb = S.kv_bytes_per_token(MODEL)
    assert out[False] == pytest.approx((P + 1) * kvb / 1e9, rel=1e-9)
    assert out[True] == pytest.approx(out[False] / 16, rel=1e-9)  # Llama-3.2-1B has 16 layers


# ------------------------------------------------------------------------------ contention
def test_shared_tier_slows_both_users():
    kvb = S.kv_bytes_per_token(MODEL)
    llm = [ClientSpec(f"llm{i}", "llm", hardware="h100", model=MODEL, max_num_seqs=8) for i in range(2)]

    def tier_time(shared, n):
        tiers = [S.kv_tier_client(f"t{i}", "tier", 5.0, 50.0, 1.0, kv_bytes_per_token=kvb)
                 for i in range(1 if shared else 2)]
        pipe = [PipelineSpec("hit", [StageSpec("tier"), StageSpec("llm", emits=True)])]
        dep = Deployment(llm + tiers, pipe, links=[LinkSpec("tier", "llm", 25.0, 10.0)])
        r = reqs([4000] * n, 2, cached=[3999] * n)
        df, _ = run(dep, r)
        return (df["stage0_end"] - df["stage0_start"]).to_numpy()

    alone = tier_time(True, 1)[0]
    assert alone == pytest.approx(q(50e-6 + 4000 * kvb / 5e9), rel=1e-9)
    together = tier_time(True, 2)
    assert np.all(together > 1.9 * alone)  # both readers wait for the sum of the bytes
    private = tier_time(False, 2)
    assert np.allclose(private, alone)


# ------------------------------------------------------------------------------ disaggregation
def test_disaggregated_zero_cost_link_equals_colocated():
    P, O = 500, 6
    base = dict(model=MODEL, hardware="h100", max_num_seqs=8)
    col = Deployment([ClientSpec("c", "llm", **base)], [PipelineSpec("chat", [StageSpec("llm", emits=True)])])
    dis = Deployment([ClientSpec("p", "prefill", role="prefill", **base),
                      ClientSpec("d", "decode", role="decode", **base)],
                     [PipelineSpec("pd", [StageSpec("prefill", emits=True), StageSpec("decode", kv_transfer=True)])],
                     links=[LinkSpec("prefill", "decode", 1e12, 0.0)])
    a, _ = run(col, reqs(P, O))
    b, _ = run(dis, reqs(P, O))
    assert b.iloc[0]["ttft"] == pytest.approx(a.iloc[0]["ttft"], rel=1e-12)
    assert b.iloc[0]["e2e"] == pytest.approx(a.iloc[0]["e2e"], rel=1e-6)


# ------------------------------------------------------------------------------ hybrid placement
def test_cpu_embedding_slower_than_gpu_by_cost_model_ratio():
    P = 700  # longer than the encoder's 512-token block: two blocks of attention
    times, costs = {}, {}
    for hw in ("epyc-9654", "h100"):
        dep = Deployment([S.encoder_client("emb", "embed", "bge-large-en-v1.5", hardware=hw),
                          ClientSpec("llm", "llm", hardware="h100", model=MODEL, max_num_seqs=8)],
                         [PipelineSpec("rag", [StageSpec("embed"), StageSpec("llm", emits=True)])])
        df, lo = run(dep, reqs(P, 2))
        times[hw] = df.iloc[0]["stage0_end"] - df.iloc[0]["stage0_start"]
        costs[hw] = q(client_cost(lo, 0, make_batch([P])))
        assert times[hw] == pytest.approx(costs[hw], rel=1e-6)
    assert times["epyc-9654"] / times["h100"] == pytest.approx(costs["epyc-9654"] / costs["h100"], rel=1e-6)
    assert times["epyc-9654"] > 5 * times["h100"]


def test_encoder_blocks_cost_less_attention_than_one_long_sequence():
    from mist.cost.replica import lower_replica
    from mist.specs.catalog import get_hardware, get_model

    lo = lower(Deployment([S.encoder_client("rr", "rr", "bge-reranker-base")],
                          [PipelineSpec("x", [StageSpec("rr")])]), reqs(10, 1))
    take = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
    rep_blk = take(lo.clients.replica)
    rep_full = lower_replica(get_model("bge-reranker-base"), get_hardware("h100"))
    params = take(lo.clients.params)
    b = make_batch([20 * 512])
    assert float(iteration_time(params, rep_blk, b)) < float(iteration_time(params, rep_full, b))


# ------------------------------------------------------------------------------ search costs
def test_search_costs_are_the_line_through_1_and_batch():
    idx = dict(num_vectors=1e9, dim=768, centroids=4e6, nprobe=50, points_per_probe=5000, top_k=20)
    base, per = S.search_costs("epyc-9654", 64, **idx)
    assert base + per == pytest.approx(S.search_time("epyc-9654", 1, **idx), rel=1e-6)
    assert base + 64 * per == pytest.approx(S.search_time("epyc-9654", 64, **idx), rel=1e-6)
    assert S.search_time("h100", 1, **idx) < S.search_time("epyc-9654", 1, **idx)


# ------------------------------------------------------------------------------ workloads
def test_reasoning_branches_and_parent_frame():
    import pandas as pd

    d = S.apply_reasoning(reqs([100, 200], [10, 20], arrival=[0.0, 1.0]), multiplier=3.0, branches=3)
    assert list(d["output_tokens"]) == [30] * 3 + [60] * 3
    assert list(d["cached_tokens"]) == [0, 99, 99, 0, 199, 199]
    assert list(d["parent"]) == [0, 0, 0, 1, 1, 1]
    assert list(d["prefix_hash"][:, 0]) == [0, 0, 0, 1, 1, 1]
    df = pd.DataFrame({"request_id": np.arange(6), "arrival": d["arrival"], "first_token": [1, 2, 3, 4, 5, 6.0],
                       "finish": [5, 9, 7, 8, 8, 10.0], "output_tokens": d["output_tokens"], "tpot": np.ones(6),
                       "completed": [True] * 6})
    pf = S.parent_frame(df, d["parent"])
    assert list(pf["e2e"]) == [9.0, 9.0] and list(pf["ttft"]) == [1.0, 3.0]
    e = S.apply_reasoning(reqs([100] * 50, 10), extra_tokens={"kind": "uniform", "low": 100, "high": 200}, seed=1)
    assert np.all((e["output_tokens"] >= 110) & (e["output_tokens"] <= 210))


def test_kv_hits_follow_tier_hit_rates():
    kvb = 1000.0
    dep = Deployment([ClientSpec("llm", "llm", model=MODEL),
                      S.kv_tier_client("dram", "dram", 64, 2, 0.5, kv_bytes_per_token=kvb),
                      S.kv_tier_client("ssd", "ssd", 10, 100, 0.6, kv_bytes_per_token=kvb)],
                     [PipelineSpec("d", [StageSpec("dram"), StageSpec("llm")]),
                      PipelineSpec("s", [StageSpec("ssd"), StageSpec("llm")]),
                      PipelineSpec("r", [StageSpec("llm")])])
    n = 20000
    d = S.assign_kv_hits(reqs(np.full(n, 100), 5), dep, context_tokens=4096, seed=3)
    frac = np.bincount(d["pipeline"], minlength=3) / n
    assert frac == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    assert np.all(d["input_tokens"] == 4196)
    assert np.all((d["cached_tokens"] == 4096) == (d["pipeline"] < 2))
    assert np.all(d["cached_tokens"][d["pipeline"] == 2] == 0)


# ------------------------------------------------------------------------------ validation
BASE_CFG = {"workload": {"num_requests": 4, "arrival": {"kind": "poisson", "rate": 1.0}, "input": 64, "output": 4}}


def test_rejects_stage_without_client():
    cfg = {**BASE_CFG, "clients": [{"name": "llm", "model": MODEL}],
           "pipelines": [{"name": "p", "stages": [{"pool": "embed"}, {"pool": "llm"}]}]}
    with pytest.raises(SpecError, match="embed"):
        parse_config(cfg, "cfg.yaml")


def test_rejects_model_that_does_not_fit():
    cfg = {**BASE_CFG, "clients": [{"name": "big", "model": "llama-3.1-70b", "hardware": "h100", "tp": 1}]}
    with pytest.raises(DoesNotFit, match="clients.big"):
        parse_config(cfg, "cfg.yaml")


def test_rejects_tier_without_link():
    cfg = {**BASE_CFG, "clients": [{"name": "llm", "model": MODEL},
                                   {"name": "ssd", "kind": "kv_tier", "bandwidth_gbs": 10, "latency_us": 100,
                                    "hit_rate": 0.5}],
           "pipelines": [{"name": "hit", "stages": [{"pool": "ssd"}, {"pool": "llm"}]},
                         {"name": "miss", "stages": [{"pool": "llm"}]}]}
    with pytest.raises(SpecError, match="ssd.*no link to pool 'llm'"):
        parse_config(cfg, "cfg.yaml")
    cfg["links"] = [{"a": "ssd", "b": "llm", "bandwidth_gbs": 5, "latency_us": 10}]
    c = parse_config(cfg, "cfg.yaml")
    tier = next(x for x in c.deployment.clients if x.name == "ssd")
    assert tier.serve_per_token == pytest.approx(S.kv_bytes_per_token(MODEL) / 5e9)  # min(tier, link)


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "experiments/configs/*.yaml"))),
                         ids=lambda p: Path(p).stem)
def test_example_configs_load_and_lower(path):
    if "sweep" in Path(path).stem:
        pytest.skip("sweep configs belong to the sweep front end")
    cfg = load_config(path)
    lo = lower(cfg.deployment, cfg.requests)
    assert lo.dims.num_requests > 0


# ------------------------------------------------------------------------------ case studies (--quick)
def _script(name):
    p = ROOT / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_case_{name}", p)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["reasoning", "hybrid_batching", "remote_kv"])
def test_case_study_quick(name, tmp_path):
    mod = _script(name)
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("*.csv")) and list(tmp_path.glob("*.png"))
