"""Hand checks of the cost model (mist.cost): FLOP and byte counts of tiny models worked out by
hand from their architecture, collective and roofline formulas with exact efficiencies, gradients
against finite differences, vmap/jit consistency, the memory check, every catalog model, and a
sanity comparison with GenZ's published Llama-3.1-8B numbers.

Kept fast: every jitted function below is compiled once (all replicas share one shape, all tiny
batches share one capacity)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mist.cost import Comm, Op, default_params, make_params
from mist.cost.params import CostParams
from mist.cost.iteration import MixedBatch, iteration_breakdown, iteration_time, make_batch, operator_counts
from mist.cost.memory import DoesNotFit, kv_bytes_per_token_per_device, plan_memory
from mist.cost.replica import Gemm, lower_replica, stack
from mist.cost.roofline import collective_time, kernel_time
from mist.specs.catalog import all_models, get_hardware, get_model
from mist.specs.model import Precision, parse_hf_config

IT = jax.jit(iteration_time)
BD = jax.jit(iteration_breakdown)
OC = jax.jit(operator_counts)

H100 = get_hardware("h100")
CAP = 4  # capacity of every tiny batch (one compiled program)


def batch(prefill=(), context=None, decode=(), last=None):
    return make_batch(prefill, context, decode, last, prefill_capacity=CAP, decode_capacity=CAP)


def ideal_params(compute_eff=0.5, memory_eff=0.5, sharpness=200.0, comm_bw_eff=0.5, overhead=0.0,
                 m_half=1e-6):
    """Efficiencies that make hand computation exact: sigmoid(0) = 0.5 exactly, exp(0) = 1 exactly,
    negligible m_half (full efficiency at any size), a nearly hard max, no overheads."""
    return make_params(compute_eff=[compute_eff] * 5, memory_eff=[memory_eff] * 5, m_half=[m_half] * 5,
                       overhead_s=[overhead] * 5, sharpness=[sharpness] * 5, comm_bw_eff=[comm_bw_eff] * 4,
                       comm_latency_scale=[1.0] * 4, cpu_iter_s=0.0, cpu_per_seq_s=0.0, cpu_per_token_s=0.0)


def f(x):
    return float(np.asarray(x))


def close(a, b, rel=1e-5, abs_=0.0):
    return a == pytest.approx(b, rel=rel, abs=abs_)


# ------------------------------------------------------------------ tiny models (HF config dicts)
def cfg_dense(**over):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 100, "hidden_act": "silu", "tie_word_embeddings": False,
         "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    c.update(over)
    return c


DENSE = parse_hf_config(cfg_dense(), name="tiny-dense")
DENSE_TIED = parse_hf_config(cfg_dense(tie_word_embeddings=True), name="tiny-dense-tied")
# DeepSeek-style MoE (no MLA): 3 layers, the first dense, 8 routed experts top-2, 2 shared experts
MOE = parse_hf_config({
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
    "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2,
    "first_k_dense_replace": 1, "vocab_size": 100, "hidden_act": "silu", "tie_word_embeddings": False},
    name="tiny-moe")
# MLA (dense MLP): q_lora 24, kv_lora 16, nope 8, rope 4, v 8
MLA = parse_hf_config({
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
    "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
    "vocab_size": 100, "hidden_act": "silu", "tie_word_embeddings": False}, name="tiny-mla")
ENCODER = parse_hf_config({
    "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100, "hidden_act": "gelu",
    "max_position_embeddings": 512}, name="tiny-bert")
SLIDING = parse_hf_config(cfg_dense(model_type="mistral", sliding_window=8), name="tiny-swa")
HYBRID = parse_hf_config(cfg_dense(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                         name="tiny-hybrid")

# the reference batch: two prefill chunks (10 new after 5 cached, 6 new from scratch), two decodes
REF = dict(prefill=[10, 6], context=[5, 0], decode=[20, 3])
T_REF = 10 + 6 + 2  # tokens through the linear layers
PAIRS_REF = (10 * 5 + 10 * 11 / 2) + (6 * 7 / 2)  # causal: q*c + q(q+1)/2 per chunk = 105 + 21
KEYS_REF = 21 + 4  # decode: context + the new token


# ------------------------------------------------------------------ architecture and counts
def test_tiny_model_parse():
    assert (DENSE.hidden, DENSE.num_layers, DENSE.num_heads, DENSE.num_kv_heads, DENSE.head_dim) == (64, 2, 4, 2, 16)
    assert DENSE.gated_mlp and DENSE.causal and not DENSE.is_moe and not DENSE.is_mla
    assert MOE.is_moe and MOE.num_moe_layers == 2 and MOE.num_shared_experts == 2 and MOE.shared_intermediate == 32
    assert MLA.is_mla and MLA.head_dim == 12 and MLA.num_kv_heads == 4
    assert ENCODER.kind == "embedder" and not ENCODER.causal and not ENCODER.gated_mlp and ENCODER.tied_embeddings
    assert SLIDING.num_sliding_layers == 2 and SLIDING.sliding_window == 8
    assert HYBRID.num_sliding_layers == 1


def test_param_counts_by_hand():
    h, L = 64, 2
    attn = h * (4 + 2 * 2) * 16 + 4 * 16 * h  # fused qkv + o = 12288
    mlp = 3 * h * 128  # gate, up, down
    norms = 2 * h * L + h
    embed = 100 * h
    pc = DENSE.param_counts()
    assert pc["total"] == L * (attn + mlp) + norms + 2 * embed == 86848
    assert pc["active"] == pc["total"] and pc["experts"] == 0
    assert DENSE_TIED.param_counts()["total"] == 86848 - embed  # tied LM head stored once

    # MoE: 1 dense layer, 2 MoE layers of 8 experts x 3 x 64 x 32, 2 shared experts, a router
    attn = h * (4 + 8) * 16 + 64 * h
    expert = 3 * h * 32
    pm = MOE.param_counts()
    non_expert = 3 * attn + 3 * h * 128 + 2 * (h * 8) + 2 * (2 * expert) + (2 * h * 3 + h) + 2 * embed
    assert pm["experts"] == 2 * 8 * expert == 98304
    assert pm["non_expert"] == non_expert == 112576
    assert pm["total"] == non_expert + 98304
    assert pm["active"] == non_expert + 2 * 2 * expert  # top-2 in 2 layers

    # MLA: q = h*q_lora + q_lora*H*(nope+rope); kv = h*(kv_lora+rope) + kv_lora*H*(nope+v); o = H*v*h
    mla_attn = (64 * 24 + 24 * 4 * 12) + (64 * 20 + 16 * 4 * 16) + 4 * 8 * 64
    assert MLA.attn_params_per_layer == mla_attn == 7040
    assert MLA.param_counts()["total"] == 2 * (mla_attn + mlp) + (2 * h * 2 + h) + 2 * embed
    # encoders: two-matrix MLP, no LM head
    assert ENCODER.param_counts()["total"] == 2 * (h * 12 * 16 + 64 * h + 2 * h * 128) + (2 * h * 2 + h) + embed


def test_kv_bytes_per_token_dtypes():
    # dense: 2 (K,V) x 2 kv heads x 16 x 2 layers = 128 elements; MLA: (16 + 4) x 2 layers = 40
    for dt, b in (("bf16", 2.0), ("fp8", 1.0), ("fp4", 0.5)):
        assert DENSE.kv_bytes_per_token(dt) == 128 * b
        assert MLA.kv_bytes_per_token(dt) == 40 * b
    assert ENCODER.kv_bytes_per_token() == 0


def _per_layer_nk(rep):
    return float(np.sum(np.asarray(rep.gemm_n) * np.asarray(rep.gemm_k) * np.asarray(rep.gemm_layers)))


def test_gemm_flops_dense_by_hand():
    rep = lower_replica(DENSE, H100)
    # per layer: qkv 128x64, o 64x64, gate+up 256x64, down 64x128
    nk = 2 * (128 * 64 + 64 * 64 + 256 * 64 + 64 * 128)
    assert _per_layer_nk(rep) == nk == 73728
    oc = OC(rep, batch(**REF))
    assert close(f(oc["gemm_flops"]), 2 * T_REF * nk)
    assert close(f(oc["gemm_weight_bytes"]), nk * 2.0)
    assert close(f(oc["lm_head_flops"]), 2 * 4 * 64 * 100)  # 2 finishing chunks + 2 decodes sample
    # a chunk that does not finish its prompt samples nothing
    oc2 = OC(rep, batch(prefill=[10, 6], context=[5, 0], last=[False, True]))
    assert close(f(oc2["lm_head_flops"]), 2 * 1 * 64 * 100)


def test_gemm_flops_moe_and_mla_by_hand():
    rep = lower_replica(MOE, H100)
    nk = 3 * (192 * 64 + 64 * 64) + 1 * (256 * 64 + 64 * 128) + 2 * (128 * 64 + 64 * 64 + 8 * 64)
    assert _per_layer_nk(rep) == nk == 99328
    oc = OC(rep, batch(**REF))
    assert close(f(oc["gemm_flops"]), 2 * T_REF * nk)
    assert close(f(oc["moe_flops"]), 2 * 2 * T_REF * 2 * 3 * 64 * 32)  # layers x 2 x T x top_k x 3 h i

    rep = lower_replica(MLA, H100)
    # fused q_a + kv_a (24 + 16 + 4) x 64, q_b 48 x 24, kv_b 64 x 16, o 64 x 32, MLP as dense
    nk = 2 * (44 * 64 + 48 * 24 + 64 * 16 + 64 * 32 + 256 * 64 + 64 * 128)
    assert _per_layer_nk(rep) == nk == 63232
    assert close(f(OC(rep, batch(**REF))["gemm_flops"]), 2 * T_REF * nk)


def test_attention_flops_by_hand():
    b = batch(**REF)
    oc = OC(lower_replica(DENSE, H100), b)
    # prefill: 4 * heads * head_dim per pair (QK^T and PV, 2 FLOPs per MAC), causal halving
    assert close(f(oc["attn_prefill_flops"]), 4 * 4 * 16 * PAIRS_REF * 2)
    assert close(f(oc["attn_decode_flops"]), 4 * 4 * 16 * KEYS_REF * 2)
    # MLA: prefill width heads * (qk + v) = 4 * (12 + 8); decode absorbed: heads * (kv_lora + rope + kv_lora)
    oc = OC(lower_replica(MLA, H100), b)
    assert close(f(oc["attn_prefill_flops"]), 2 * 4 * (12 + 8) * PAIRS_REF * 2)
    assert close(f(oc["attn_decode_flops"]), 2 * 4 * (20 + 16) * KEYS_REF * 2)


def test_attention_bidirectional_encoder():
    oc = OC(lower_replica(ENCODER, H100), batch(prefill=[10, 6]))
    pairs = 10 * 10 + 6 * 6  # every token sees every token of its sequence
    assert close(f(oc["attn_prefill_flops"]), 4 * 4 * 16 * pairs * 2)
    assert f(oc["lm_head_flops"]) == 0.0
    # q(c+q) with cached context too
    oc = OC(lower_replica(ENCODER, H100), batch(prefill=[10], context=[5]))
    assert close(f(oc["attn_prefill_flops"]), 4 * 4 * 16 * 10 * 15 * 2)


def test_attention_sliding_window():
    b = batch(**REF)
    # W = 8, chunk of 10 after 5: query i sees min(5 + i, 8) keys -> 6 + 7 + 8 * 8 = 77
    # chunk of 6 from scratch: min(i, 8) = i -> 21 (window not reached)
    win_pairs = 77 + 21
    oc = OC(lower_replica(SLIDING, H100), b)
    assert close(f(oc["attn_prefill_flops"]), 4 * 4 * 16 * win_pairs * 2)
    keys_win = min(21, 8) + min(4, 8)
    assert close(f(oc["attn_decode_flops"]), 4 * 4 * 16 * keys_win * 2)
    assert close(f(oc["kv_read_decode_bytes"]), keys_win * 2 * (2 * 2 * 16 * 2.0))
    # one sliding and one full layer
    oc = OC(lower_replica(HYBRID, H100), b)
    assert close(f(oc["attn_prefill_flops"]), 4 * 4 * 16 * (win_pairs + PAIRS_REF))
    assert close(f(oc["attn_decode_flops"]), 4 * 4 * 16 * (keys_win + KEYS_REF))


@pytest.mark.parametrize("kv", ["bf16", "fp8", "fp4"])
def test_decode_kv_bytes_dtype(kv):
    b = batch(**REF)
    for model in (DENSE, MLA):
        prec = Precision(weight="bf16", kv=kv)
        oc = OC(lower_replica(model, H100, prec), b)
        assert close(f(oc["kv_read_decode_bytes"]), KEYS_REF * model.kv_bytes_per_token(kv))


def test_tp_splits_n_and_k():
    r1, r2 = lower_replica(DENSE, H100, tp=1), lower_replica(DENSE, H100, tp=2)
    n1, k1, n2, k2 = (np.asarray(x) for x in (r1.gemm_n, r1.gemm_k, r2.gemm_n, r2.gemm_k))
    # column-parallel (qkv, gate+up) split N; row-parallel (o, down) split K
    for g in (Gemm.QKV, Gemm.MLP_UP):
        assert n2[g] == n1[g] / 2 and k2[g] == k1[g]
    for g in (Gemm.O, Gemm.MLP_DOWN):
        assert k2[g] == k1[g] / 2 and n2[g] == n1[g]
    b = batch(**REF)
    o1, o2 = OC(r1, b), OC(r2, b)
    for key in ("gemm_flops", "attn_prefill_flops", "attn_decode_flops", "kv_read_decode_bytes", "lm_head_flops"):
        assert close(f(o2[key]), f(o1[key]) / 2), key
    # MoE: ep=2 holds half the experts at full width, tp=2 (ep=1) all experts at half width
    o_moe1 = f(OC(lower_replica(MOE, H100), b)["moe_flops"])
    for tp, ep in ((2, 1), (2, 2)):
        assert close(f(OC(lower_replica(MOE, H100, tp=tp, ep=ep), b)["moe_flops"]), o_moe1 / 2)
    # MLA: down-projections replicated, up-projections and o split, latent KV replicated
    rm = lower_replica(MLA, H100, tp=2)
    assert np.asarray(rm.gemm_n)[Gemm.QKV] == 24 + 16 + 4
    assert np.asarray(rm.gemm_n)[Gemm.Q_UP] == 24 and np.asarray(rm.gemm_n)[Gemm.KV_UP] == 32
    assert np.asarray(rm.gemm_k)[Gemm.O] == 16
    assert f(rm.kv_bytes_token_layer) == 20 * 2.0


def test_kv_heads_replicated_beyond_tp():
    # 2 KV heads at tp = 4: each rank still holds (a copy of) one whole KV head
    r4 = lower_replica(DENSE, H100, tp=4)
    assert np.asarray(r4.gemm_n)[Gemm.QKV] == (4 / 4 + 2 * 1) * 16
    assert f(r4.kv_bytes_token_layer) == 2 * 1 * 16 * 2.0
    assert kv_bytes_per_token_per_device(DENSE, DENSE.default_precision, 4, 1) == 2 * 1 * 16 * 2 * 2.0
    r2 = lower_replica(DENSE, H100, tp=2)
    assert f(r2.kv_bytes_token_layer) == f(r4.kv_bytes_token_layer)  # no further saving past tp = kv heads
    with pytest.raises(Exception, match="tp"):
        lower_replica(DENSE, H100, tp=3)


# ------------------------------------------------------------------ collectives and roofline
@pytest.mark.parametrize("g", [2, 4, 8])
def test_collective_formulas(g):
    p = ideal_params(comm_bw_eff=0.5)
    S, bw, lat = 1e6, 1e9, 1e-6
    beff = 0.5 * bw
    frac, steps = (g - 1) / g, math.log2(g)
    ar = f(collective_time(p, Comm.ALLREDUCE, S, g, bw, lat))
    assert close(ar, 2 * frac * S / beff + 2 * steps * lat)
    for c in (Comm.ALLGATHER, Comm.ALLTOALL):
        assert close(f(collective_time(p, c, S, g, bw, lat)), frac * S / beff + steps * lat)
    assert close(f(collective_time(p, Comm.SEND_RECV, S, 2, bw, lat)), S / beff + lat)



@pytest.mark.parametrize("g", [2, 4, 8])
def test_collective_bandwidth_ramp_group_exponent_and_overhead_by_hand(g):
    # V(S) = S + s^beta S^(1-beta) bytes at the link rate, ring factor ((g-1)/g)^gamma, o per call;
    # beta = 0.5 (logit 0) and s = 4^2 S make the ramp exactly 4 S: V = 5 S
    p = make_params(**_phys(ideal_params(comm_bw_eff=0.5)), comm_s_half=[16e6] * 4, comm_beta=[0.5] * 4,
                    comm_group_exp=[2.0] * 4, comm_overhead_s=[3e-6] * 4)
    S, bw, lat = 1e6, 1e9, 1e-6
    beff = 0.5 * bw
    ring, steps, V = ((g - 1) / g) ** 2, math.log2(g), 5.0 * S
    assert close(f(collective_time(p, Comm.ALLREDUCE, S, g, bw, lat)), 2 * ring * V / beff + 2 * steps * lat + 3e-6)
    for c in (Comm.ALLGATHER, Comm.ALLTOALL):
        assert close(f(collective_time(p, c, S, g, bw, lat)), ring * V / beff + steps * lat + 3e-6)
    assert close(f(collective_time(p, Comm.SEND_RECV, S, 2, bw, lat)), V / beff + lat + 3e-6)
    # nothing to move, or a group of one: no time, no overhead, finite gradients (in S too)
    assert f(collective_time(p, Comm.ALLREDUCE, 0.0, g, bw, lat)) == 0.0
    assert f(collective_time(p, Comm.ALLREDUCE, S, 1, bw, lat)) == 0.0
    for S0, g0 in ((0.0, g), (S, 1.0), (0.0, 1.0)):
        gp = jax.grad(lambda q: collective_time(q, Comm.ALLREDUCE, S0, g0, bw, lat))(p)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(gp))
        gs = jax.grad(lambda s_: collective_time(p, Comm.ALLREDUCE, s_, g0, bw, lat))(S0)
        assert np.isfinite(float(gs))
    # the achieved bandwidth grows with the message: time per byte falls towards 2 ring / beff
    per_byte = [f(collective_time(p, Comm.ALLREDUCE, s_, g, bw, 0.0)) / s_ for s_ in (1e4, 1e6, 1e8, 1e10)]
    assert all(a > b for a, b in zip(per_byte, per_byte[1:]))


def test_params_files_without_the_collective_terms_load_with_them_off():
    # a file written before the ramp / group exponent / per-call terms existed means the plain ring
    d = ideal_params(comm_bw_eff=0.5).to_dict()
    for c in d["comms"].values():
        for k in ("s_half_bytes", "beta", "group_exp", "overhead_us"):
            del c[k]
    p = CostParams.from_dict(d)
    S, g, bw, lat = 1e6, 4, 1e9, 1e-6
    assert close(f(collective_time(p, Comm.ALLREDUCE, S, g, bw, lat)), 2 * 0.75 * S / (0.5 * bw) + 2 * 2 * lat)


def test_prefill_tile_packs_the_query_heads_of_a_kv_group_by_hand():
    from mist.cost.iteration import prefill_tile_pairs

    ph = _phys(ideal_params())
    p = make_params(**{**ph, "m_half": [1e-6, 16.0, 1e-6, 1e-6, 1e-6]})  # prefill tile of 16 tokens
    # a 4-token prompt: 10 causal pairs, 2.5 keys per query, padded to one 16-key tile; the query
    # tile holds 16 rows, shared by the q_per_kv query heads of one KV head
    assert close(f(prefill_tile_pairs(p, 4.0, 10.0)), (4 + 16) * 16)
    assert close(f(prefill_tile_pairs(p, 4.0, 10.0, 2.0)), (4 + 8) * 16)
    assert close(f(prefill_tile_pairs(p, 4.0, 10.0, 4.0)), (4 + 4) * 16)
    assert f(prefill_tile_pairs(p, 0.0, 0.0, 2.0)) == 0.0
    # the replica carries the GQA group per device (KV heads replicate past tp = kv heads; MLA's
    # prefill runs one KV head per query head)
    assert f(lower_replica(DENSE, H100).q_per_kv) == 2.0  # 4 query heads, 2 KV heads
    assert f(lower_replica(DENSE, H100, tp=2).q_per_kv) == 2.0
    assert f(lower_replica(DENSE, H100, tp=4).q_per_kv) == 1.0
    assert f(lower_replica(MLA, H100).q_per_kv) == 1.0
    # the iteration cost uses it: compute-bound (tiny compute efficiency), the prefill attention
    # time scales with the padded pairs, (4 + 16/2) * 16 against (4 + 16) * 16 unpacked
    import equinox as eqx

    pc = make_params(**{**ph, "m_half": [1e-6, 16.0, 1e-6, 1e-6, 1e-6], "compute_eff": [1e-4] * 5})
    rep = lower_replica(DENSE, H100)
    b = batch(prefill=[4])
    t2 = f(BD(pc, rep, b)["attn_prefill"])
    t1 = f(BD(pc, eqx.tree_at(lambda r: r.q_per_kv, rep, jnp.asarray(1.0, jnp.float32)), b)["attn_prefill"])
    assert close(t2 / t1, 12 / 20, rel=1e-3)


def test_prefill_pair_width_by_hand():
    # compute-bound prefill of one 4-token prompt on the tiny dense model (4 heads of 16, 2 layers,
    # no tile padding): each of the 10 causal pairs costs 2 (d_qk + d_v + pair_width) per head
    from mist.cost.operators import attn_prefill_time

    ph = _phys(ideal_params())
    rep = lower_replica(DENSE, H100)
    peak = f(rep.peak_attn)
    ts = []
    for w in (1e-6, 32.0):
        p = make_params(**{**ph, "compute_eff": [1e-4] * 5, "pair_width": [1e-6, w, 1e-6, 1e-6, 1e-6]})
        t = f(BD(p, rep, batch(prefill=[4]))["attn_prefill"])
        flops = 2 * 2 * 4 * (16 + 16 + w) * 10  # layers * 2 * heads * (d_qk + d_v + w) * pairs
        assert close(t, flops / (peak * 1e-4), rel=1e-3)
        # the per-operator predictor (one layer) charges the same
        t1 = f(attn_prefill_time(p, 1.0, 4.0, 4.0, 4.0, 2.0, 16.0, peak, 1e30))
        assert close(t1, flops / 2 / (peak * 1e-4), rel=1e-3)
        ts.append(t)
    assert close(ts[1] / ts[0], (32 + 32) / 32, rel=1e-3)
    # files written before the pair width existed load with it off
    d = ideal_params().to_dict()
    for o in d["ops"].values():
        del o["pair_width"]
    assert np.allclose(np.asarray(CostParams.from_dict(d).pair_width), 1e-6, rtol=1e-5)


def test_unsplit_mha_decode_floor_by_hand():
    # MHA (4 query heads, 4 KV heads of 16, 2 layers, bf16): a decode kernel that does not split
    # contexts reads the longest sequence's K and V of one head (2 * 16 * 2 = 64 B per key and layer)
    # in one thread block; at serial_bw = 1 MB/s that floor dominates everything else
    from mist.cost.iteration import decode_stretch_times
    from mist.cost.operators import attn_decode_time

    mha = parse_hf_config(cfg_dense(num_key_value_heads=4), name="tiny-mha")
    ph = _phys(ideal_params())
    p = make_params(**ph, serial_bw=[1e18, 1e18, 1e6, 1e18, 1e18])
    rep = lower_replica(mha, H100)
    assert f(rep.kv_bytes_serial) == 64.0
    assert f(lower_replica(DENSE, H100).kv_bytes_serial) == 0.0  # GQA kernels split or pack
    assert f(lower_replica(MLA, H100).kv_bytes_serial) == 0.0
    t = f(BD(p, rep, batch(decode=[9, 99]))["attn_decode"])  # longest: 100 keys
    assert close(t, 2 * 100 * 64 / 1e6, rel=1e-3)
    # without the floor (GQA), the same batch is far faster
    assert f(BD(p, lower_replica(DENSE, H100), batch(decode=[9, 99]))["attn_decode"]) < 1e-3 * t
    # the stretch advances the longest context by each offset, as the iteration cost does
    b = batch(decode=[9, 99])
    st = np.asarray(decode_stretch_times(p, rep, b.decode_context, b.decode_mask, jnp.asarray([0.0, 5.0])))
    it = [f(IT(p, rep, batch(decode=[9 + o, 99 + o]))) for o in (0, 5)]
    assert np.allclose(st, it, rtol=1e-5)
    assert close(it[1] - it[0], 2 * 5 * 64 / 1e6, rel=1e-3)
    # the per-operator predictor (one layer) charges the same floor, and none for GQA rows
    peak = f(rep.peak_attn)
    assert close(f(attn_decode_time(p, 2.0, 100.0, 4.0, 4.0, 16.0, peak, 1e30)), 100 * 64 / 1e6, rel=1e-3)
    assert f(attn_decode_time(p, 2.0, 100.0, 4.0, 2.0, 16.0, peak, 1e30)) < 1e-3 * 100 * 64 / 1e6


def test_decode_item_time_by_hand():
    # GQA (4 query heads, 2 KV heads of 16, 2 layers, bf16): every (sequence, KV head, layer) item
    # pays params.item_time of fixed work, charged as the keys one head streams in that time; at
    # 1 ms per item it dominates: 2 sequences x 2 KV heads x 2 layers = 8 ms
    from mist.cost.iteration import decode_stretch_times
    from mist.cost.operators import attn_decode_time

    ph = _phys(ideal_params())
    p = make_params(**ph, item_time=[1e-30, 1e-30, 1e-3, 1e-30, 1e-30])
    rep = lower_replica(DENSE, H100)
    t = f(BD(p, rep, batch(decode=[9, 99]))["attn_decode"])
    assert close(t, 8e-3, rel=1e-3)
    # whatever the contexts, and the same in every iteration of a stretch
    b = batch(decode=[9, 99])
    st = np.asarray(decode_stretch_times(p, rep, b.decode_context, b.decode_mask, jnp.asarray([0.0, 5.0])))
    it = [f(IT(p, rep, batch(decode=[9 + o, 99 + o]))) for o in (0, 5)]
    assert np.allclose(st, it, rtol=1e-5)
    # the per-operator predictor (one layer) charges the same per item: 2 sequences x 2 KV heads
    peak = f(rep.peak_attn)
    assert close(f(attn_decode_time(p, 2.0, 100.0, 4.0, 2.0, 16.0, peak, f(rep.mem_bw))), 4e-3, rel=1e-3)
    # off (the default and files written before it existed): no such time
    assert f(BD(ideal_params(), rep, batch(decode=[9, 99]))["attn_decode"]) < 1e-6
    d = ideal_params().to_dict()
    for o in d["ops"].values():
        del o["item_time_ns"]
    assert np.allclose(np.asarray(CostParams.from_dict(d).item_time), 1e-30, rtol=1e-4)


def test_decode_second_kernel_by_hand():
    # GQA (4 query heads, 2 KV heads of 16, 2 layers): a call that regroups heads (>= 2 sequences
    # and >= 2 KV heads) or splits the context (longest > 256 keys at head dim 16, few items)
    # launches a second kernel per layer, params.split_time[ATTN_DECODE] each (1 ms here)
    from mist.cost.iteration import SPLIT_MAX_ITEMS, decode_extra_launches, decode_stretch_times
    from mist.cost.operators import attn_decode_time, attn_prefill_time

    ph = _phys(ideal_params())
    p = make_params(**ph, split_time=[1e-30, 1e-3, 1e-3, 1e-30, 1e-30])
    rep = lower_replica(DENSE, H100)
    mha = lower_replica(parse_hf_config(cfg_dense(num_key_value_heads=4), name="tiny-mha"), H100)
    t = lambda r, d: f(BD(p, r, batch(decode=d))["attn_decode"])  # noqa: E731
    assert t(rep, [9]) < 1e-6  # one sequence, one KV block: one kernel
    assert close(t(rep, [9, 99]), 2e-3, rel=1e-3)  # regrouped heads
    assert close(t(rep, [299]), 2e-3, rel=1e-3)  # split context
    assert close(t(rep, [9, 299]), 2e-3, rel=1e-3)  # both: still one second kernel
    assert t(mha, [9, 299]) < 1e-6  # MHA: one unsplit kernel
    # the split stops once the items fill the machine
    assert f(decode_extra_launches(SPLIT_MAX_ITEMS, 1000.0, 4.0, 1.0, 128.0)) == 0.0
    assert f(decode_extra_launches(SPLIT_MAX_ITEMS - 1.0, 1000.0, 4.0, 1.0, 128.0)) == 1.0
    # a stretch charges it per iteration as the iteration cost does (the longest crosses 256 keys)
    b = batch(decode=[250])
    offs = (0.0, 10.0)
    st = np.asarray(decode_stretch_times(p, rep, b.decode_context, b.decode_mask, jnp.asarray(offs)))
    it = [f(IT(p, rep, batch(decode=[250 + o]))) for o in offs]
    assert np.allclose(st, it, rtol=1e-5)
    assert close(it[1] - it[0], 2e-3, rel=1e-3)
    # the per-operator predictors (one layer) charge the same, and single-token prefill rows too
    peak, bw = f(rep.peak_attn), f(rep.mem_bw)
    assert close(f(attn_decode_time(p, 2.0, 100.0, 4.0, 2.0, 16.0, peak, bw)), 1e-3, rel=1e-3)
    assert f(attn_decode_time(p, 1.0, 100.0, 4.0, 2.0, 16.0, peak, bw)) < 1e-6
    assert f(attn_decode_time(p, 2.0, 100.0, 4.0, 1.0, 16.0, peak, bw, kv_tok_bytes=64.0)) < 1e-6  # MLA
    assert close(f(attn_prefill_time(p, 2.0, 1.0, 100.0, 4.0, 2.0, 16.0, peak, bw)), 1e-3, rel=1e-3)
    assert f(attn_prefill_time(p, 2.0, 2.0, 100.0, 4.0, 2.0, 16.0, peak, bw)) < 1e-6
    # the regrouped GQA path: params.group_time per layer of every GQA call (1 us here), none for MHA
    # or an empty batch; the stretch and both predictors agree
    g = make_params(**ph, split_time=[1e-30, 1e-3, 1e-3, 1e-30, 1e-30], group_time=[1e-30, 1e-6, 1e-6, 1e-30, 1e-30])
    tg = lambda r, d: f(BD(g, r, batch(decode=d))["attn_decode"])  # noqa: E731
    assert close(tg(rep, [9]), 2e-6, rel=1e-3)
    assert close(tg(rep, [9, 99]), 2e-3 + 2e-6, rel=1e-3)
    assert close(tg(mha, [9, 299]), t(mha, [9, 299]))  # MHA: no regrouped path
    assert f(BD(g, rep, batch(prefill=[4]))["attn_decode"]) == 0.0
    st = np.asarray(decode_stretch_times(g, rep, b.decode_context, b.decode_mask, jnp.asarray(offs)))
    assert np.allclose(st, [f(IT(g, rep, batch(decode=[250 + o]))) for o in offs], rtol=1e-5)
    assert close(f(attn_decode_time(g, 1.0, 100.0, 4.0, 2.0, 16.0, peak, bw))
                 - f(attn_decode_time(p, 1.0, 100.0, 4.0, 2.0, 16.0, peak, bw)), 1e-6, rel=1e-3)
    assert close(f(attn_prefill_time(g, 1.0, 1.0, 100.0, 4.0, 2.0, 16.0, peak, bw))
                 - f(attn_prefill_time(p, 1.0, 1.0, 100.0, 4.0, 2.0, 16.0, peak, bw)), 1e-6, rel=1e-3)
    assert close(f(attn_decode_time(g, 1.0, 100.0, 4.0, 4.0, 16.0, peak, bw)),
                 f(attn_decode_time(p, 1.0, 100.0, 4.0, 4.0, 16.0, peak, bw)))
    # off (the default and files written before it existed)
    d = ideal_params().to_dict()
    for o in d["ops"].values():
        del o["split_time_us"], o["group_time_us"], o["gqa_pack"]
    q = CostParams.from_dict(d)
    assert np.allclose(np.asarray(q.split_time), 1e-30, rtol=1e-4)
    assert np.allclose(np.asarray(q.group_time), 1e-30, rtol=1e-4)
    assert np.all(np.asarray(q.gqa_pack) == 1.0)


def test_prefill_gqa_packing_exponent_by_hand():
    # FlashAttention-2 packs a KV group's query heads into one tile only for single-token queries:
    # with gqa_pack -> 0 a 4-token chunk pads a whole 16-row tile per head, a 1-token one packs
    from mist.cost.iteration import prefill_tile_pairs

    ph = _phys(ideal_params())
    p = make_params(**{**ph, "m_half": [1e-6, 16.0, 1e-6, 1e-6, 1e-6]}, gqa_pack=[1.0, 1e-6, 1.0, 1.0, 1.0])
    assert close(f(prefill_tile_pairs(p, 4.0, 10.0, 4.0)), (4 + 16) * 16, rel=1e-4)
    assert close(f(prefill_tile_pairs(p, 1.0, 1.0, 4.0)), (1 + 4) * 16, rel=1e-4)
    h = make_params(**{**ph, "m_half": [1e-6, 16.0, 1e-6, 1e-6, 1e-6]}, gqa_pack=[1.0, 0.5, 1.0, 1.0, 1.0])
    assert close(f(prefill_tile_pairs(h, 4.0, 10.0, 4.0)), (4 + 8) * 16, rel=1e-4)


def test_prefill_narrow_head_tile_by_hand():
    # FlashAttention-3 on Hopper runs 192-row query tiles at head dim 64 and 128-row ones at 128:
    # params.narrow_tile[ATTN_PREFILL] scales the padding tile and the thread block's query rows at
    # head dims <= 64 only; 1 (off) is the default and what files written before it mean
    from mist.cost.iteration import prefill_blocks, prefill_tile_pairs
    from mist.cost.operators import attn_prefill_time

    ph = _phys(ideal_params())
    p = make_params(**{**ph, "m_half": [1e-6, 16.0, 1e-6, 1e-6, 1e-6]}, narrow_tile=[1.0, 1.5, 1.0, 1.0, 1.0])
    assert close(f(prefill_tile_pairs(p, 4.0, 10.0, 1.0, 64.0)), (4 + 24) * 24, rel=1e-5)
    assert close(f(prefill_tile_pairs(p, 4.0, 10.0, 1.0, 128.0)), (4 + 16) * 16, rel=1e-5)
    assert close(f(prefill_tile_pairs(p, 4.0, 10.0)), (4 + 16) * 16, rel=1e-5)  # default: wide heads
    # 300-token chunk, 4 heads, MHA: ceil(300 / 192) = 2 tiles a head at head dim 64, ceil(300 / 128) = 3 at 128
    assert f(prefill_blocks(p, 300.0, 4.0, 1.0, 64.0)) == 8.0
    assert f(prefill_blocks(p, 300.0, 4.0, 1.0, 128.0)) == 12.0
    # the operator predictor: compute-bound, q = kv = 4 (the tile dominates): (4 + 24) 24 / ((4 + 16) 16)
    p1 = make_params(**{**ph, "m_half": [1e-6, 16.0, 1e-6, 1e-6, 1e-6]})
    op = lambda q, hd: f(attn_prefill_time(q, 1.0, 4.0, 4.0, 4.0, 4.0, hd, 1e12, 1e18))  # noqa: E731
    assert close(op(p, 64.0) / op(p1, 64.0), 28 * 24 / (20 * 16), rel=1e-4)
    assert close(op(p, 128.0) / op(p1, 128.0), 1.0, rel=1e-6)
    d = p.to_dict()
    for o in d["ops"].values():
        del o["narrow_tile"]
    assert np.allclose(np.asarray(CostParams.from_dict(d).narrow_tile), 1.0)


def test_prefill_block_ramp_by_hand():
    # a prefill-attention call of B thread blocks (128-row query tiles x query heads / q_per_kv^e x
    # sequences) costs 1 + b / B times its compute (b = params.block_half[ATTN_PREFILL]); calls of
    # single-token chunks only run the decode path: no ramp. Compute-bound here (memory ~free).
    import equinox as eqx

    from mist.cost.iteration import prefill_block_factor, prefill_blocks
    from mist.cost.operators import attn_prefill_time

    ph = _phys(ideal_params())
    p0 = make_params(**ph)  # full GQA packing (e = 1), ramp off
    p = make_params(**ph, block_half=[1e-30, 18.0, 1e-30, 1e-30, 1e-30])
    # 4 query heads, 2 KV heads: a 300-token chunk packs 2 heads per tile: 2 x ceil(600 / 128) = 10
    assert f(prefill_blocks(p, 300.0, 4.0, 2.0)) == 10.0
    assert f(prefill_blocks(p, 1.0, 4.0, 2.0)) == 2.0  # single token: the KV heads
    assert f(prefill_blocks(p, 0.0, 4.0, 2.0)) == 0.0
    fa2 = make_params(**ph, gqa_pack=[1.0, 1e-6, 1.0, 1.0, 1.0])  # FlashAttention-2: one head a tile
    assert close(f(prefill_blocks(fa2, 300.0, 4.0, 2.0)), 4 * 3, rel=1e-4)
    assert close(f(prefill_block_factor(p, 18.0, True)), 2.0, rel=1e-6)
    assert f(prefill_block_factor(p, 18.0, False)) == 1.0
    # the operator predictor: 2 sequences of 300 tokens, B = 20: 1.9 x; single-token rows: 1 x
    op = lambda q, b, n: f(attn_prefill_time(q, n, b, b, 4.0, 2.0, 16.0, 1e12, 1e18))  # noqa: E731
    assert close(op(p, 300.0, 2.0) / op(p0, 300.0, 2.0), 1.9, rel=1e-3)
    assert close(op(p, 1.0, 2.0) / op(p0, 1.0, 2.0), 1.0, rel=1e-6)
    # the iteration cost: the blocks summed over the call's chunks (2 layers share one B)
    rep = eqx.tree_at(lambda r: (r.mem_bw, r.peak_attn), lower_replica(DENSE, H100),
                      (jnp.asarray(1e18, jnp.float32), jnp.asarray(1e12, jnp.float32)))
    it = lambda q, pf: f(BD(q, rep, batch(prefill=pf))["attn_prefill"])  # noqa: E731
    assert close(it(p, [300, 200]) / it(p0, [300, 200]), 1.0 + 18.0 / (10 + 8), rel=1e-3)
    assert close(it(p, [300, 1]) / it(p0, [300, 1]), 1.0 + 18.0 / (10 + 2), rel=1e-3)
    assert close(it(p, [1, 1]) / it(p0, [1, 1]), 1.0, rel=1e-6)  # single-token chunks only
    # off (the default and files written before it existed)
    d = p.to_dict()
    for o in d["ops"].values():
        del o["block_half"]
    q = CostParams.from_dict(d)
    assert np.allclose(np.asarray(q.block_half), 1e-30, rtol=1e-4)
    assert close(it(q, [300, 200]), it(p0, [300, 200]), rel=1e-6)


def test_gemm_serial_k_loop_floor_by_hand():
    # C[4, 64] = A[4, 4096] @ W[4096, 64] in bf16: one 128 x 128 output tile streams
    # 4096 x 128 x (2 + 2) bytes over its K loop; at serial_bw = 1 GB/s that floor dominates
    from mist.cost.operators import gemm_time
    from mist.cost.roofline import gemm_serial_bytes

    assert gemm_serial_bytes(4096.0, 2.0, 2.0) == 4096 * 128 * 4
    ph = _phys(ideal_params())
    p = make_params(**ph, serial_bw=[1e9, 1e18, 1e18, 1e18, 1e18])
    t = f(gemm_time(p, 4.0, 64.0, 4096.0, 1e15, 3e12))
    assert close(t, 4096 * 128 * 4 / 1e9, rel=1e-3)
    # off (the default): the plain roofline
    t0 = f(gemm_time(ideal_params(), 4.0, 64.0, 4096.0, 1e15, 3e12))
    assert close(t0, (64 * 4096 * 2 + 4 * (64 + 4096) * 2) / (0.5 * 3e12), rel=1e-3)
    # the iteration cost floors every dense GEMM launch the same way (K of each GEMM, per layer)
    rep = lower_replica(DENSE, H100)
    bd = BD(p, rep, batch(decode=[10]))
    k, layers = np.asarray(rep.gemm_k), np.asarray(rep.gemm_layers)
    on = (np.asarray(rep.gemm_n) > 0) & (layers > 0)
    assert close(f(bd["gemm"]), float(np.sum(layers[on] * k[on] * 128 * 4)) / 1e9, rel=1e-3)
    assert close(f(bd["lm_head"]), 64 * 128 * 4 / 1e9, rel=1e-3)  # K = hidden

def test_gemm_split_k_floor_by_hand():
    # the same GEMM with the K loop split (cuBLAS split-K): the serial time t = 4096 x 128 x 4 B at
    # 1 GB/s becomes t / sqrt(1 + t / 4 tau) with tau = params.split_time[GEMM] (2 sqrt(t tau) for
    # long loops); tau ~ 0 (older files) keeps the unsplit floor
    from mist.cost.operators import gemm_time
    from mist.cost.roofline import gemm_serial_time

    ph = _phys(ideal_params())
    tau = 1e-4
    p = make_params(**ph, serial_bw=[1e9, 1e18, 1e18, 1e18, 1e18], split_time=[tau, 1e-30, 1e-30, 1e-30, 1e-30])
    t = 4096 * 128 * 4 / 1e9
    want = t / math.sqrt(1.0 + t / (4.0 * tau))
    assert close(f(gemm_serial_time(p, 4096.0, 2.0, 2.0)), want, rel=1e-4)
    assert close(f(gemm_time(p, 4.0, 64.0, 4096.0, 1e15, 3e12)), want, rel=1e-3)
    off = make_params(**ph, serial_bw=[1e9, 1e18, 1e18, 1e18, 1e18])
    assert close(f(gemm_serial_time(off, 4096.0, 2.0, 2.0)), t, rel=1e-4)
    # the iteration cost floors every dense GEMM launch the same way, per layer
    rep = lower_replica(DENSE, H100)
    bd = BD(p, rep, batch(decode=[10]))
    k, layers = np.asarray(rep.gemm_k), np.asarray(rep.gemm_layers)
    on = (np.asarray(rep.gemm_n) > 0) & (layers > 0)
    ts = k[on] * 128 * 4 / 1e9
    assert close(f(bd["gemm"]), float(np.sum(layers[on] * ts / np.sqrt(1 + ts / (4 * tau)))), rel=1e-3)
    t_lm = 64 * 128 * 4 / 1e9
    assert close(f(bd["lm_head"]), t_lm / math.sqrt(1 + t_lm / (4 * tau)), rel=1e-3)
    # gradients stay finite with the split off
    g = jax.grad(lambda q: gemm_serial_time(q, 4096.0, 2.0, 2.0))(off)
    assert np.all(np.isfinite(np.asarray(g.log_split_time))) and np.all(np.isfinite(np.asarray(g.log_serial_bw)))


def test_decode_width_wave_and_wide_head_terms_by_hand():
    # (1) a decode call's fixed time grows with the head width: params.width_time per element of
    # d_qk + d_v per layer (1 ms here: 2 x 16 x 1 ms per layer, 2 layers); not for MLA's own kernel
    from mist.cost.iteration import decode_stretch_times
    from mist.cost.operators import attn_decode_time, attn_prefill_time
    from mist.cost.roofline import waved_items

    ph = _phys(ideal_params())
    off = [1e-30] * 5
    rep = lower_replica(DENSE, H100)
    peak, bw = f(rep.peak_attn), f(rep.mem_bw)
    w = make_params(**ph, width_time=[1e-30, 1e-30, 1e-3, 1e-30, 1e-30])
    assert close(f(BD(w, rep, batch(decode=[9, 99]))["attn_decode"]), 2 * 32e-3, rel=1e-3)
    assert f(BD(w, rep, batch(prefill=[4]))["attn_decode"]) == 0.0
    assert close(f(attn_decode_time(w, 2.0, 100.0, 4.0, 2.0, 16.0, peak, bw)), 32e-3, rel=1e-3)
    assert f(attn_decode_time(w, 2.0, 100.0, 4.0, 1.0, 16.0, peak, bw, kv_tok_bytes=64.0)) < 1e-6  # MLA
    mla = lower_replica(MLA, H100)
    assert f(BD(w, mla, batch(decode=[9, 99]))["attn_decode"]) < 1e-3
    # (2) the first wave of (sequence, KV head) items hides their fixed work: x - w (1 - e^(-x/w))
    # of x items pay item_time (1 ms; w = 2): 2 sequences x 2 KV heads = 4 items -> 2.2707
    v = make_params(**ph, item_time=[1e-30, 1e-30, 1e-3, 1e-30, 1e-30], item_wave=[1e-30, 1e-30, 2.0, 1e-30, 1e-30])
    x = 4.0 - 2.0 * (1.0 - math.exp(-2.0))
    assert close(f(waved_items(v, 4.0)), x, rel=1e-5)
    assert close(f(BD(v, rep, batch(decode=[9, 99]))["attn_decode"]), 2 * x * 1e-3, rel=1e-3)
    assert close(f(attn_decode_time(v, 2.0, 100.0, 4.0, 2.0, 16.0, peak, bw)), x * 1e-3, rel=1e-3)
    assert f(waved_items(ideal_params(), 4.0)) == 4.0  # off: every item pays
    # (3) heads wider than FlashAttention-3's 256 run another kernel with a time per sequence and
    # layer, seq_time x n x (1 + n / seq_half) (1 ms, 4 sequences: 2 x 1.5 ms per layer)
    s = make_params(**ph, seq_time=[1e-30, 1e-30, 1e-3, 1e-30, 1e-30], seq_half=[1e30, 1e30, 4.0, 1e30, 1e30])
    wide = lower_replica(parse_hf_config(cfg_dense(head_dim=512), name="tiny-wide"), H100)
    assert close(f(BD(s, wide, batch(decode=[9, 99]))["attn_decode"]), 2 * 3e-3, rel=1e-2)
    assert f(BD(s, rep, batch(decode=[9, 99]))["attn_decode"]) < 1e-6  # head dim 16: not wide
    assert close(f(attn_decode_time(s, 2.0, 100.0, 4.0, 2.0, 512.0, peak, bw)), 3e-3, rel=1e-2)
    assert f(attn_decode_time(s, 2.0, 100.0, 4.0, 2.0, 256.0, peak, bw)) < 1e-5
    # a stretch charges all three per iteration as the iteration cost does
    allp = make_params(**ph, width_time=[1e-30, 1e-30, 1e-6, 1e-30, 1e-30], item_time=[1e-30, 1e-30, 1e-6, 1e-30, 1e-30],
                       item_wave=[1e-30, 1e-30, 3.0, 1e-30, 1e-30], seq_time=[1e-30, 1e-30, 1e-6, 1e-30, 1e-30],
                       seq_half=[1e30, 1e30, 4.0, 1e30, 1e30])
    for r in (rep, wide):
        b = batch(decode=[9, 99, 5])
        offs = (0.0, 7.0)
        st = np.asarray(decode_stretch_times(allp, r, b.decode_context, b.decode_mask, jnp.asarray(offs)))
        it = [f(IT(allp, r, batch(decode=[9 + o, 99 + o, 5 + o]))) for o in offs]
        assert np.allclose(st, it, rtol=1e-5)
    # prefill rows are untouched by the decode terms
    assert f(attn_prefill_time(allp, 2.0, 8.0, 8.0, 4.0, 2.0, 512.0, peak, bw)) == pytest.approx(
        f(attn_prefill_time(ideal_params(), 2.0, 8.0, 8.0, 4.0, 2.0, 512.0, peak, bw)), rel=1e-6)
    # off (the default and files written before them existed)
    d = ideal_params().to_dict()
    for o in d["ops"].values():
        del o["width_time_ns"], o["seq_time_us"], o["seq_half"], o["item_wave"]
    q = CostParams.from_dict(d)
    assert np.allclose(np.asarray(q.width_time), off, rtol=1e-4)
    assert np.allclose(np.asarray(q.seq_time), off, rtol=1e-4)
    assert np.all(np.asarray(q.seq_half) >= 1e29) and np.all(np.asarray(q.item_wave) <= 1e-29)


def test_prefill_block_time_by_hand():
    # every prefill thread block beyond the first wave pays params.item_time[ATTN_PREFILL] (1 ms):
    # 4 query heads, 2 KV heads, full packing: a 300-token chunk launches 10 blocks, 200 tokens 8
    import equinox as eqx

    from mist.cost.operators import attn_prefill_time

    ph = _phys(ideal_params())
    p0 = make_params(**ph)
    p = make_params(**ph, item_time=[1e-30, 1e-3, 1e-30, 1e-30, 1e-30])
    op = lambda q, b, n: f(attn_prefill_time(q, n, b, b, 4.0, 2.0, 16.0, 1e12, 1e18))  # noqa: E731
    assert close(op(p, 300.0, 2.0) - op(p0, 300.0, 2.0), 20e-3, rel=1e-3)
    rep = eqx.tree_at(lambda r: (r.mem_bw, r.peak_attn), lower_replica(DENSE, H100),
                      (jnp.asarray(1e18, jnp.float32), jnp.asarray(1e12, jnp.float32)))
    it = lambda q, pf: f(BD(q, rep, batch(prefill=pf))["attn_prefill"])  # noqa: E731
    assert close(it(p, [300, 200]) - it(p0, [300, 200]), 2 * 18e-3, rel=1e-3)  # 2 layers
    # with a first wave of 5 blocks: 18 - 5 (1 - e^(-18/5)) blocks pay
    pw = make_params(**ph, item_time=[1e-30, 1e-3, 1e-30, 1e-30, 1e-30], item_wave=[1e-30, 5.0, 1e-30, 1e-30, 1e-30])
    x = 18.0 - 5.0 * (1.0 - math.exp(-18.0 / 5.0))
    assert close(it(pw, [300, 200]) - it(p0, [300, 200]), 2 * x * 1e-3, rel=1e-3)
    assert f(BD(p, rep, batch(decode=[5]))["attn_prefill"]) == 0.0  # no prefill chunk: nothing


def test_collective_trivial_cases():
    p = default_params()
    for c in (Comm.ALLREDUCE, Comm.ALLGATHER, Comm.ALLTOALL):
        assert f(collective_time(p, c, 1e6, 1, 1e9, 1e-6)) == 0.0  # a group of one moves nothing
    for c in Comm:
        assert f(collective_time(p, c, 0.0, 8, 1e9, 1e-6)) == 0.0
    # latency scale multiplies the per-step latency
    p2 = make_params(**{**_phys(ideal_params()), "comm_latency_scale": [2.0] * 4})
    assert close(f(collective_time(p2, Comm.ALLREDUCE, 1.0, 4, 1e30, 1e-6)), 2 * 2 * 2e-6, rel=1e-4)


def _phys(p):
    d = p.to_dict()
    ops = d["ops"]
    return dict(compute_eff=[ops[o.name.lower()]["compute_eff"] for o in Op],
                memory_eff=[ops[o.name.lower()]["memory_eff"] for o in Op],
                m_half=[ops[o.name.lower()]["m_half_tokens"] for o in Op],
                overhead_s=[ops[o.name.lower()]["overhead_us"] * 1e-6 for o in Op],
                sharpness=[ops[o.name.lower()]["sharpness"] for o in Op],
                comm_bw_eff=[d["comms"][c.name.lower()]["bw_eff"] for c in Comm],
                comm_latency_scale=[d["comms"][c.name.lower()]["latency_scale"] for c in Comm],
                cpu_iter_s=d["cpu"]["iter_us"] * 1e-6, cpu_per_seq_s=d["cpu"]["per_seq_us"] * 1e-6,
                cpu_per_token_s=d["cpu"]["per_token_us"] * 1e-6)


def test_tp_communication_in_iteration_by_hand():
    # one decode token of the tiny dense model at tp = 2 over NVLink: two all-reduces of the
    # hidden state per layer, and an all-gather of the fp32 logits (the whole vocabulary)
    p = ideal_params(comm_bw_eff=0.5)
    rep = lower_replica(DENSE, H100, tp=2)
    bw, lat = 0.5 * H100.scale_up.bandwidth, H100.scale_up.latency
    ar = 2 * 0.5 * (1 * 64 * 2.0) / bw + 2 * 1 * lat
    ag = 0.5 * (1 * 100 * 4.0) / bw + 1 * lat
    comm = f(BD(p, rep, batch(decode=[7]))["comm"])
    assert close(comm, 2 * 2 * ar + ag, rel=1e-4)
    assert f(BD(p, lower_replica(DENSE, H100), batch(decode=[7]))["comm"]) == 0.0


def test_cpu_terms_by_hand():
    # a mixed batch: a prompt's last chunk (5 tokens), another prompt's first chunk (3 of more) and
    # two decodes: 4 sequences, 10 tokens, 2 prompt chunks
    d = ideal_params().to_dict()
    d["cpu"] = {"iter_us": 1000.0, "per_seq_us": 20.0, "per_token_us": 0.5, "per_prompt_us": 300.0}
    p = CostParams.from_dict(d)
    rep = lower_replica(DENSE, H100)
    b = batch(prefill=[5, 3], context=[4, 0], last=[True, False], decode=[7, 9])
    assert close(f(BD(p, rep, b)["cpu"]), 1e-3 + 4 * 20e-6 + 10 * 0.5e-6 + 2 * 300e-6, rel=1e-5)
    # decode-only iterations pay no per-prompt time; an empty one pays nothing
    assert close(f(BD(p, rep, batch(decode=[7, 9]))["cpu"]), 1e-3 + 2 * 20e-6 + 2 * 0.5e-6, rel=1e-5)
    assert f(BD(p, rep, batch())["cpu"]) == 0.0
    # files written before the per-prompt term load with it off
    del d["cpu"]["per_prompt_us"]
    q = CostParams.from_dict(d)
    assert close(f(BD(q, rep, b)["cpu"]), 1e-3 + 4 * 20e-6 + 10 * 0.5e-6, rel=1e-6)
    assert f(default_params().cpu_per_prompt) < 1e-11


def test_cpu_time_per_token_beyond_the_knee_by_hand():
    # 10 tokens (prompt chunks of 5 and 3, two decodes); 4 us per token beyond a knee of 6 tokens
    d = ideal_params().to_dict()
    d["cpu"] = {"iter_us": 1000.0, "per_seq_us": 20.0, "per_token_us": 0.5, "per_token_above_us": 4.0,
                "token_knee": 6.0}
    p = CostParams.from_dict(d)
    rep = lower_replica(DENSE, H100)
    b = batch(prefill=[5, 3], context=[4, 0], last=[True, False], decode=[7, 9])
    assert close(f(BD(p, rep, b)["cpu"]), 1e-3 + 4 * 20e-6 + 10 * 0.5e-6 + (10 - 6) * 4e-6, rel=1e-5)
    # at or below the knee nothing more: two decodes are 2 tokens
    assert close(f(BD(p, rep, batch(decode=[7, 9]))["cpu"]), 1e-3 + 2 * 20e-6 + 2 * 0.5e-6, rel=1e-5)
    # round trip through the JSON form; files written before the term load with it off (exactly:
    # the whole iteration time is unchanged in float64)
    q = CostParams.from_dict(p.to_dict())
    assert close(f(q.cpu_per_token_above), 4e-6, rel=1e-5) and f(q.cpu_token_knee) == 6.0
    del d["cpu"]["per_token_above_us"], d["cpu"]["token_knee"]
    off = CostParams.from_dict(d)
    assert f(off.cpu_token_knee) == 2048.0 and f(off.cpu_per_token_above) < 1e-29
    big = batch(prefill=[4000], context=[0], last=[True])
    p64 = jax.tree.map(lambda x: x.astype(np.float64), off)
    no_hinge = dataclasses.replace(p64, cpu_token_knee=np.float64(1e9))  # max(T - knee, 0) = 0
    assert f(iteration_time(p64, rep, big)) == f(iteration_time(no_hinge, rep, big))
    # a malformed value names its field instead of being clipped to "off" or failing inside JAX
    from mist.specs.errors import SpecError

    for bad in ({"token_knee": "2k"}, {"per_token_above_us": -1.0}, {"per_prompt_us": float("nan")}):
        e = dict(d, cpu={**d["cpu"], **bad})
        with pytest.raises(SpecError, match=f"cpu.{next(iter(bad))}"):
            CostParams.from_dict(e, "x.json")
    # the gradient of the term: d cpu / d log(per_token_above) = per_token_above x (T - knee)
    g = jax.grad(lambda lg: BD(dataclasses.replace(p, log_cpu_per_token_above=lg), rep, b)["cpu"])(
        p.log_cpu_per_token_above)
    assert close(f(g), 4e-6 * 4, rel=1e-4)


def test_roofline_limits():
    p = ideal_params(sharpness=200.0)
    peak, bw = 1e15, 1e12
    kt = jax.jit(kernel_time, static_argnums=1)
    # compute bound: 1e12 FLOPs at 0.5 x 1e15 = 2 ms; 1e6 bytes at 0.5 x 1e12 = 2 us
    t = f(kt(p, Op.GEMM, 1e12, 1e6, peak, bw, 1e6, 1.0))
    assert close(t, 2e-3, rel=1e-5)
    # memory bound
    t = f(kt(p, Op.GEMM, 1e6, 1e12, peak, bw, 1e6, 1.0))
    assert close(t, 2.0, rel=1e-5)
    # equal times: a smooth max of sharpness p is 2^(1/p) above the hard max
    t = f(kt(p, Op.GEMM, 1e9, 1e6, peak, bw, 1e6, 1.0))
    assert close(t, 2e-6 * 2 ** (1 / 200), rel=1e-4)
    # sharpness 1: compute and memory do not overlap at all (sum)
    t = f(kt(ideal_params(sharpness=1.0), Op.GEMM, 1e9, 1e6, peak, bw, 1e6, 1.0))
    assert close(t, 4e-6, rel=1e-4)
    # at rows = m_half a kernel reaches half its compute efficiency
    pm = ideal_params(m_half=64.0)
    assert close(f(kt(pm, Op.GEMM, 1e12, 0.0, peak, bw, 64.0, 1.0)), 4e-3, rel=1e-5)
    # overheads add per kernel launch ...
    po = ideal_params(overhead=1e-5)
    assert close(f(kt(po, Op.GEMM, 1e12, 1e6, peak, bw, 1e6, 3.0)), 2e-3 + 3e-5, rel=1e-5)
    # ... but zero work costs zero, overhead included
    for op in Op:
        assert f(kt(po, op, 0.0, 0.0, peak, bw, 0.0, 5.0)) == 0.0


def test_empty_batch_costs_nothing():
    p = default_params()
    for m in (DENSE, MOE, MLA):
        assert f(IT(p, lower_replica(m, H100, tp=2), batch())) == 0.0


# ------------------------------------------------------------------ gradients
_GRAD_SCRIPT = textwrap.dedent("""
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import equinox as eqx
    from jax.flatten_util import ravel_pytree
    from mist.cost import default_params, lower_replica
    from mist.cost.iteration import iteration_time, make_batch
    from mist.cost.replica import stack
    from mist.specs.catalog import get_hardware, get_model

    def f64(t):
        return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, t)

    h100 = get_hardware("h100")
    names = ["qwen3-30b-a3b", "llama-3.1-8b", "llama-2-7b"]
    reps = f64(stack([
        # MoE with TP, EP and PP: every collective class is active
        lower_replica(get_model(names[0]), h100, tp=2, ep=2, pp=2),
        # dense, one device: absent MoE/communication terms must not poison gradients
        lower_replica(get_model(names[1]), h100),
        # MHA: the unsplit decode floor is active (its bandwidth set low enough to matter)
        lower_replica(get_model(names[2]), h100)]))
    b = f64(make_batch([300, 40], [0, 700], decode_context=[100, 2000, 5000]))
    p0 = default_params()
    # serial floors on (GEMM K loop, unsplit decode), low enough to matter
    p0 = eqx.tree_at(lambda q: q.log_serial_bw, p0,
                     p0.log_serial_bw.at[0].set(jnp.log(2e11)).at[2].set(jnp.log(25e9)))
    x0, unravel = ravel_pytree(f64(p0))

    def times(x):
        return jax.vmap(lambda r: iteration_time(unravel(x), r, b))(reps)

    jac = np.asarray(jax.jit(jax.jacrev(times))(x0))  # reverse mode, as calibration uses: (cases, leaves)
    h = 1e-5
    n = len(x0)
    E = np.concatenate([np.eye(n), -np.eye(n)]) * h
    vals = np.asarray(jax.jit(jax.vmap(times))(x0 + E))  # (2n, cases)
    fd = ((vals[:n] - vals[n:]) / (2 * h)).T
    print(json.dumps([{"model": m, "grad": jac[i].tolist(), "fd": fd[i].tolist()} for i, m in enumerate(names)]))
""")


_FD_PROC: list = []


@pytest.fixture(scope="module", autouse=True)
def _start_fd_subprocess():
    """Float64 finite differences run in a subprocess (so that enabling x64 does not leak into the
    other tests), started with the module's first test so that it overlaps with them."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _GRAD_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _FD_PROC.append(proc)
    yield
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    _FD_PROC.clear()


@pytest.fixture(scope="module")
def fd_results():
    proc = _FD_PROC[-1]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_gradient_matches_finite_differences(fd_results):
    from jax.flatten_util import ravel_pytree

    # names of the flattened leaves, to say which one disagrees
    p = default_params()
    names = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
        names += [f"{jax.tree_util.keystr(path)}[{i}]" for i in range(max(np.size(leaf), 1))]
    assert len(names) == ravel_pytree(p)[0].size
    for res in fd_results:
        g, fd = np.asarray(res["grad"]), np.asarray(res["fd"])
        assert np.all(np.isfinite(g)), res["model"]
        scale = np.max(np.abs(g))
        assert scale > 0
        bad = [(names[i], g[i], fd[i]) for i in range(len(g))
               if abs(g[i] - fd[i]) > 1e-6 * scale + 1e-4 * abs(fd[i])]
        assert not bad, (res["model"], bad)
        # every efficiency/overhead leaf that the batch exercises moves the time
        live = {n for n, gi in zip(names, g) if gi != 0.0}
        for must in ("compute_logit", "memory_logit", "log_overhead", "log_sharpness", "log_cpu_iter",
                     "log_pair_width"):
            assert any(must in n for n in live), (res["model"], must)
        if res["model"].startswith("qwen3"):
            assert sum("comm_bw_logit" in n for n in live) == 4  # all-reduce, all-gather, all-to-all, send/recv
            for must in ("log_comm_s_half", "comm_beta_logit", "log_comm_overhead"):
                assert sum(must in n for n in live) == 4, must
            assert sum("log_comm_group_exp" in n for n in live) == 3  # send/recv has no ring factor
        assert any("log_serial_bw[0]" in n for n in live), res["model"]  # GEMM K loop
        if res["model"] == "llama-2-7b":
            assert any("log_serial_bw[2]" in n for n in live)  # unsplit MHA decode


def test_gradients_finite_float32():
    p = default_params()
    cases = [(DENSE, {}), (MOE, dict(tp=2, ep=2)), (MLA, dict(tp=2)), (ENCODER, {}), (HYBRID, dict(pp=2))]
    batches = [batch(**REF), batch(decode=[0]), batch(prefill=[1]), batch()]
    def t(p, rep, floats, b):  # differentiate the batch's float arrays too
        pt, pc, dc = floats
        return iteration_time(p, rep, MixedBatch(pt, pc, b.prefill_last, b.prefill_mask, dc, b.decode_mask))

    # cost parameters (calibration) and the batch's token counts (end-to-end fits through the
    # scan); not the replica leaves, whose reverse pass only slows XLA's compile down
    # (two separate gradients compile faster on XLA:CPU than one with respect to both)
    grad_p = jax.jit(jax.grad(t, argnums=0))
    grad_b = jax.jit(jax.grad(t, argnums=2))
    for model, par in cases:
        rep = lower_replica(model, H100, **par)
        for b in batches:
            floats = (b.prefill_tokens, b.prefill_context, b.decode_context)
            for tree in (grad_p(p, rep, floats, b), grad_b(p, rep, floats, b)):
                for leaf in jax.tree.leaves(tree):
                    if jnp.issubdtype(leaf.dtype, jnp.floating):
                        assert np.all(np.isfinite(np.asarray(leaf))), (model.name, b)


# ------------------------------------------------------------------ vmap / jit
def test_vmap_batches_equals_loop():
    p = default_params()
    rep = lower_replica(get_model("llama-3.1-8b"), H100)
    bs = [batch([512], [0], [100, 300]), batch([64, 64, 128], [0, 1000, 50], [4000]), batch(decode=[1, 2, 3, 4]),
          batch([2048]), batch()]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *bs)
    v = np.asarray(jax.jit(jax.vmap(iteration_time, in_axes=(None, None, 0)))(p, rep, stacked))
    one = np.array([f(IT(p, rep, b)) for b in bs])
    np.testing.assert_allclose(v, one, rtol=1e-5)
    assert one[-1] == 0.0 and np.all(one[:-1] > 0)


def test_vmap_stacked_replicas_equals_loop_and_jit_equals_eager():
    p = default_params()
    reps = [lower_replica(get_model("llama-3.1-8b"), H100),
            lower_replica(get_model("qwen3-30b-a3b"), H100, tp=2, ep=2),
            lower_replica(get_model("deepseek-v3"), H100, tp=8, pp=2),
            lower_replica(get_model("gpt-oss-20b"), H100),
            lower_replica(get_model("bge-large-en-v1.5"), H100)]
    b = batch([256, 32], [0, 600], [100, 900, 20])
    v = np.asarray(jax.jit(jax.vmap(iteration_time, in_axes=(None, 0, None)))(p, stack(reps), b))
    one = np.array([f(IT(p, r, b)) for r in reps])
    np.testing.assert_allclose(v, one, rtol=1e-5)
    np.testing.assert_allclose(f(iteration_time(p, reps[1], b)), one[1], rtol=1e-5)  # eager == jit


# ------------------------------------------------------------------ memory
def test_memory_70b_needs_tp():
    m = get_model("llama-3.1-70b")
    with pytest.raises(DoesNotFit) as e:
        plan_memory(m, H100)
    assert e.value.field == "memory" and "memory" in str(e.value)
    plan = plan_memory(m, H100, tp=4)
    assert plan.kv_capacity_tokens > 0 and plan.weights == pytest.approx(m.param_counts()["total"] * 2 / 4)


def test_kv_capacity_by_hand_llama_8b():
    m = get_model("llama-3.1-8b")
    plan = plan_memory(m, H100, max_num_batched_tokens=8192, max_num_seqs=256, memory_utilization=0.9)
    weights = 8_030_261_248 * 2  # bf16
    acts = 8192 * (4 * 4096 + 2 * 14336) * 2 + 256 * 128256 * 4  # activations + fp32 logits
    budget = 80e9 * 0.9 - weights - acts - 1.5e9  # 1.5 GB CUDA runtime reserve
    kv_tok = 2 * 8 * 128 * 32 * 2  # K and V, 8 kv heads x 128, 32 layers, bf16 = 131072
    assert plan.kv_bytes_per_token == kv_tok
    assert plan.kv_capacity_tokens == int(budget // kv_tok)
    assert 400_000 < plan.kv_capacity_tokens < 420_000
    plan8 = plan_memory(m, H100, Precision(kv="fp8"))
    assert plan8.kv_capacity_tokens == int(budget // (kv_tok / 2))


# ------------------------------------------------------------------ the whole catalog
def _fitting_parallelism(model, device):
    for pp in (1, 2, 4):
        for tp in (1, 2, 4, 8):
            if model.num_heads % tp:
                continue
            try:
                plan_memory(model, device, tp=tp, pp=pp)
            except DoesNotFit:
                continue
            return tp, pp
    raise AssertionError(f"{model.name} fits nowhere up to tp=8, pp=4")


def test_every_catalog_model_on_h100():
    p = default_params()
    mixed = batch([512, 64], [0, 300], [1000, 20, 7])
    prefill = batch([512, 64])
    seen = 0
    for m in all_models():
        tp, pp = _fitting_parallelism(m, H100)
        rep = lower_replica(m, H100, tp=tp, pp=pp)
        t = f(IT(p, rep, mixed if m.kind == "decoder" else prefill))
        assert np.isfinite(t) and t > 0, (m.name, t)
        assert t < 10.0, (m.name, t)
        seen += 1
    assert seen >= 20


# ------------------------------------------------------------------ sanity against GenZ
def test_llama_8b_against_genz():
    """GenZ (efficiency 1): Llama-3.1-8B bf16 on one H100, 2048-token prefill 35.5 ms, decode
    4.2 ms per token. With efficiencies ~1 and no overheads, MIST's prefill is within 10% of
    35.5 ms (MIST halves causal attention, which GenZ does not, hence slightly lower).

    Decode is weight streaming: the 16.06 GB of weights include the 1.05 GB embedding table,
    which MIST (correctly) costs as a gather of one row per token, so a batch-1 step reads
    ~15.0 GB of weights + the KV cache: 15.3 GB / 3.35 TB/s = 4.56 ms, close to the naive
    16.06 GB / 3.35 TB/s = 4.8 ms. GenZ's 4.2 ms would need 16.06 GB / 4.2 ms = 3.8 TB/s, more
    than the H100 SXM's 3.35 TB/s peak: GenZ's bandwidth assumption (a higher HBM figure and/or
    memory efficiency > what the datasheet allows) makes its decode optimistic, so we check
    against the bandwidth bound rather than its number."""
    p = make_params(compute_eff=[1.0] * 5, memory_eff=[1.0] * 5, m_half=[1e-6] * 5, overhead_s=[0.0] * 5,
                    sharpness=[50.0] * 5, comm_bw_eff=[1.0] * 4, comm_latency_scale=[1.0] * 4,
                    cpu_iter_s=0.0, cpu_per_seq_s=0.0, cpu_per_token_s=0.0)
    m = get_model("llama-3.1-8b")
    rep = lower_replica(m, H100)
    prefill = f(IT(p, rep, batch([2048])))
    assert abs(prefill - 35.5e-3) / 35.5e-3 < 0.10, prefill
    decode = f(IT(p, rep, batch(decode=[2048])))
    streamed = (m.param_counts()["total"] - m.embedding_params) * 2.0 + 2049 * m.kv_bytes_per_token()
    assert close(decode, streamed / H100.mem_bandwidth, rel=0.03), decode
    assert abs(decode - 16.06e9 / 3.35e12) / (16.06e9 / 3.35e12) < 0.10
    assert decode > 4.2e-3  # not faster than GenZ's bandwidth-optimistic figure
