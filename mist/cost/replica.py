"""A model replica (model x device x precision x parallelism) lowered to array leaves.

Everything the cost model needs is a float32 array here, so replicas of different models,
devices and parallelism degrees stack along a leading axis and share one compiled program.
Shapes of one layer's GEMMs are held as a fixed set of slots (absent ones have zero layers),
already divided by the tensor/expert-parallel degree, i.e. as seen by one device.
"""

from __future__ import annotations

from enum import IntEnum

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..specs.dtypes import nbytes
from ..specs.errors import SpecError
from ..specs.hardware import Device
from ..specs.model import ModelSpec, Precision


class Gemm(IntEnum):
    """GEMM slots of a transformer layer."""

    QKV = 0  # fused Q/K/V projection (MLA: fused q_a + kv_a down-projections)
    Q_UP = 1  # MLA q_b up-projection
    KV_UP = 2  # MLA kv_b up-projection (absorbed in decode: same FLOPs)
    O = 3  # attention output projection
    MLP_UP = 4  # dense MLP gate+up (or up)
    MLP_DOWN = 5
    SHARED_UP = 6  # MoE shared experts gate+up
    SHARED_DOWN = 7
    ROUTER = 8  # MoE router


NUM_GEMMS = len(Gemm)


class Replica(eqx.Module):
    """Per-device quantities of one model replica. Units: elements, bytes, FLOP/s, bytes/s, s."""

    # one layer's GEMMs, per device: C[T, n] = A[T, k] @ W[k, n]; `layers` = how many layers have it
    gemm_n: Float[Array, "gemms"]
    gemm_k: Float[Array, "gemms"]
    gemm_layers: Float[Array, "gemms"]
    # attention, per device
    num_layers: Float[Array, ""]
    heads: Float[Array, ""]  # query heads on one device
    d_qk_prefill: Float[Array, ""]  # per-head dot-product width in prefill
    d_v_prefill: Float[Array, ""]
    q_per_kv: Float[Array, ""]  # query heads per KV head in prefill (GQA group; 1 for MHA, MLA)
    d_qk_decode: Float[Array, ""]  # MLA decodes in the absorbed (latent) form
    d_v_decode: Float[Array, ""]
    kv_bytes_token_layer: Float[Array, ""]  # KV bytes one token adds in one layer on one device
    # KV bytes per token and layer that one decode thread block reads when the kernel does not split
    # the context (MHA: one head's K and V; 0 for GQA and MLA, whose kernels split or pack heads)
    kv_bytes_serial: Float[Array, ""]
    causal: Float[Array, ""]  # 1 decoder, 0 bidirectional encoder
    window: Float[Array, ""]  # sliding window (tokens), 0 = none
    sliding_layers: Float[Array, ""]
    # mixture of experts
    moe_layers: Float[Array, ""]
    experts: Float[Array, ""]
    top_k: Float[Array, ""]
    expert_inter: Float[Array, ""]  # expert intermediate width on one device
    expert_mats: Float[Array, ""]  # 3 gated, 2 plain
    # embedding / head
    hidden: Float[Array, ""]
    vocab_local: Float[Array, ""]
    has_lm_head: Float[Array, ""]
    # bytes per element
    w_bytes: Float[Array, ""]
    expert_w_bytes: Float[Array, ""]
    kv_bytes: Float[Array, ""]
    act_bytes: Float[Array, ""]
    # parallelism
    tp: Float[Array, ""]
    pp: Float[Array, ""]
    ep: Float[Array, ""]
    # hardware
    peak_gemm: Float[Array, ""]  # FLOP/s of the GEMMs' numeric format
    peak_expert: Float[Array, ""]
    peak_attn: Float[Array, ""]
    peak_vector: Float[Array, ""]  # elementwise/softmax rate (fp32 units)
    mem_bw: Float[Array, ""]
    up_bw: Float[Array, ""]
    up_lat: Float[Array, ""]
    up_domain: Float[Array, ""]
    out_bw: Float[Array, ""]
    out_lat: Float[Array, ""]


def _gemm_rate(device: Device, w: str, act: str) -> float:
    # weight-only low-bit formats (int4 AWQ/GPTQ) dequantise and run at the activation rate
    if w == "int4":
        return device.flops(act)
    return device.flops(w)


def lower_replica(model: ModelSpec, device: Device, precision: Precision | None = None,
                  tp: int = 1, pp: int = 1, ep: int = 1) -> Replica:
    """Lower one replica to arrays; inconsistent parallelism is a SpecError naming the knob."""
    prec = precision or model.default_precision
    for knob, v in (("tp", tp), ("pp", pp), ("ep", ep)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise SpecError("<deployment>", knob, f"must be a positive integer, got {v!r}", "use 1, 2, 4, 8 ...")
    if model.num_heads % tp:
        raise SpecError("<deployment>", "tp", f"tensor parallel {tp} does not divide {model.num_heads} heads of "
                        f"{model.name}", f"use a divisor of {model.num_heads}")
    if pp > model.num_layers:
        raise SpecError("<deployment>", "pp", f"pipeline parallel {pp} exceeds {model.num_layers} layers",
                        f"use at most {model.num_layers}")
    if ep > 1 and not model.is_moe:
        raise SpecError("<deployment>", "ep", f"{model.name} has no experts", "use ep = 1")
    if model.is_moe and (tp % ep or model.num_experts % ep):
        raise SpecError("<deployment>", "ep", f"expert parallel {ep} must divide tp={tp} and "
                        f"{model.num_experts} experts", "pick ep among the common divisors")

    h = model.hidden
    wb, ewb, kvb, ab = (nbytes(prec.weight), nbytes(prec.expert_weight), nbytes(prec.kv), nbytes(prec.act))
    n = np.zeros(NUM_GEMMS)
    k = np.zeros(NUM_GEMMS)
    layers = np.zeros(NUM_GEMMS)
    L = model.num_layers
    H = model.num_heads
    m_up = 2 if model.gated_mlp else 1
    if model.is_mla:
        qk = model.qk_nope_dim + model.qk_rope_dim
        # down-projections are replicated across TP ranks in common implementations
        n[Gemm.QKV] = (model.q_lora_rank or H * qk / tp) + model.kv_lora_rank + model.qk_rope_dim
        k[Gemm.QKV] = h
        if model.q_lora_rank:
            n[Gemm.Q_UP], k[Gemm.Q_UP], layers[Gemm.Q_UP] = H * qk / tp, model.q_lora_rank, L
        n[Gemm.KV_UP] = H * (model.qk_nope_dim + model.v_head_dim) / tp
        k[Gemm.KV_UP], layers[Gemm.KV_UP] = model.kv_lora_rank, L
        n[Gemm.O], k[Gemm.O] = h, H * model.v_head_dim / tp
        d_qk_p, d_v_p = qk, model.v_head_dim
        q_per_kv = 1.0  # prefill runs the expanded form: one key/value head per query head
        kv_serial = 0.0
        d_qk_d, d_v_d = model.kv_lora_rank + model.qk_rope_dim, model.kv_lora_rank
        kv_tok_layer = model.kv_elements_per_token_per_layer * kvb  # latent is replicated per rank
    else:
        kvh_local = max(model.num_kv_heads / tp, 1.0)  # KV heads replicate when tp > kv heads
        q_per_kv = (H / tp) / kvh_local
        kv_serial = 2 * model.head_dim * kvb if (q_per_kv <= 1.0 and model.kind == "decoder") else 0.0
        n[Gemm.QKV] = (H / tp + 2 * kvh_local) * model.head_dim
        k[Gemm.QKV] = h
        n[Gemm.O], k[Gemm.O] = h, H * model.head_dim / tp
        d_qk_p = d_v_p = d_qk_d = d_v_d = model.head_dim
        kv_tok_layer = 2 * kvh_local * model.head_dim * kvb if model.kind == "decoder" else 0.0
    layers[Gemm.QKV] = layers[Gemm.O] = L
    dense_layers = model.num_dense_layers if model.is_moe else L
    n[Gemm.MLP_UP], k[Gemm.MLP_UP], layers[Gemm.MLP_UP] = m_up * model.intermediate / tp, h, dense_layers
    n[Gemm.MLP_DOWN], k[Gemm.MLP_DOWN], layers[Gemm.MLP_DOWN] = h, model.intermediate / tp, dense_layers
    if model.is_moe:
        moe_l = model.num_moe_layers
        if model.num_shared_experts:
            si = model.num_shared_experts * model.shared_intermediate
            n[Gemm.SHARED_UP], k[Gemm.SHARED_UP], layers[Gemm.SHARED_UP] = m_up * si / tp, h, moe_l
            n[Gemm.SHARED_DOWN], k[Gemm.SHARED_DOWN], layers[Gemm.SHARED_DOWN] = h, si / tp, moe_l
        n[Gemm.ROUTER], k[Gemm.ROUTER], layers[Gemm.ROUTER] = model.num_experts, h, moe_l

    up = device.scale_up
    f = lambda x: jnp.asarray(x, dtype=jnp.float32)  # noqa: E731
    return Replica(
        gemm_n=f(n), gemm_k=f(k), gemm_layers=f(layers),
        num_layers=f(L), heads=f(H / tp),
        d_qk_prefill=f(d_qk_p), d_v_prefill=f(d_v_p), q_per_kv=f(q_per_kv), d_qk_decode=f(d_qk_d), d_v_decode=f(d_v_d),
        kv_bytes_token_layer=f(kv_tok_layer), kv_bytes_serial=f(kv_serial), causal=f(1.0 if model.causal else 0.0),
        window=f(model.sliding_window), sliding_layers=f(model.num_sliding_layers),
        moe_layers=f(model.num_moe_layers), experts=f(max(model.num_experts, 1)), top_k=f(model.top_k),
        expert_inter=f(model.moe_intermediate * ep / tp), expert_mats=f(model.mlp_matrices),
        hidden=f(h), vocab_local=f(model.vocab / tp), has_lm_head=f(1.0 if model.kind == "decoder" else 0.0),
        w_bytes=f(wb), expert_w_bytes=f(ewb), kv_bytes=f(kvb), act_bytes=f(ab),
        tp=f(tp), pp=f(pp), ep=f(ep),
        peak_gemm=f(_gemm_rate(device, prec.weight, prec.act)),
        peak_expert=f(_gemm_rate(device, prec.expert_weight, prec.act)),
        peak_attn=f(device.flops(prec.act)),
        peak_vector=f(device.flops("fp32")),
        mem_bw=f(device.mem_bandwidth),
        up_bw=f(up.bandwidth), up_lat=f(up.latency),
        up_domain=f(min(up.domain_size, max(device.devices_per_node, up.domain_size))),
        out_bw=f(device.scale_out.bandwidth), out_lat=f(device.scale_out.latency),
    )


def stack(replicas: list[Replica]) -> Replica:
    """Stack replicas along a new leading axis (for vmap or per-client tables)."""
    import jax

    return jax.tree.map(lambda *xs: jnp.stack(xs), *replicas)

