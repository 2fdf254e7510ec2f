"""Single-operator time predictions, the same formulas the iteration cost uses, exposed per kernel
so that calibration can compare them with measured operator timings. All arguments are arrays
(vectorised over rows of a measurement table); bytes per element are numbers (2.0 for bf16)."""

from __future__ import annotations

import jax.numpy as jnp

from .iteration import (WIDE_HEAD_DIM, _windowed_pairs, decode_extra_launches, decode_tile_keys,
                        decode_wide_time, prefill_block_factor, prefill_block_time, prefill_blocks,
                        prefill_tile_pairs)
from .params import Comm, CostParams, Op
from .roofline import collective_time, decode_item_keys, gemm_serial_time, kernel_time, waved_items

_BIG = 1e30


def gemm_time(params: CostParams, m, n, k, peak_flops, mem_bw, w_bytes=2.0, a_bytes=2.0):
    """C[m,n] = A[m,k] @ W[k,n] on one device."""
    flops = 2.0 * m * n * k
    bytes_ = n * k * w_bytes + m * (n + k) * a_bytes
    return kernel_time(params, Op.GEMM, flops, bytes_, peak_flops, mem_bw, m, 1.0,
                       serial_time=gemm_serial_time(params, k, w_bytes, a_bytes))


def attn_prefill_time(params: CostParams, batch, q_len, kv_len, heads, kv_heads, head_dim, peak_flops, mem_bw,
                      kv_bytes=2.0, a_bytes=2.0, causal=1.0, window=0.0):
    """`batch` sequences each adding q_len tokens to a context of kv_len tokens (kv_len includes
    the new ones), on one device holding `heads` query and `kv_heads` KV heads."""
    c = jnp.maximum(kv_len - q_len, 0.0)
    _, pairs = _windowed_pairs(q_len, c, causal, window)
    width = heads * (2.0 * head_dim + params.pair_width[Op.ATTN_PREFILL])  # see iteration_breakdown
    flops_eff = batch * 2.0 * width * prefill_tile_pairs(params, q_len, pairs, heads / kv_heads, head_dim)
    # the call's thread blocks against the machine (see iteration.prefill_block_factor)
    blocks = batch * prefill_blocks(params, q_len, heads, heads / kv_heads, head_dim)
    flops_eff = flops_eff * prefill_block_factor(params, blocks, q_len > 1.0)
    kv_tok = 2.0 * kv_heads * head_dim * kv_bytes
    bytes_ = batch * (kv_len * kv_tok + q_len * (2.0 * heads * head_dim * a_bytes + kv_tok))
    # single-token queries run the decode path of the kernel (FlashAttention-2 regroups GQA heads
    # and splits the context as in decode, see iteration.decode_extra_launches): its second kernel
    one = q_len <= 1.0
    extra = jnp.where(one, decode_extra_launches(batch, kv_len, heads / kv_heads, kv_heads, head_dim), 0.0)
    group = jnp.where(one & (heads > kv_heads), params.group_time[Op.ATTN_PREFILL], 0.0)
    return (kernel_time(params, Op.ATTN_PREFILL, flops_eff, bytes_, peak_flops, mem_bw, _BIG, 1.0)
            + prefill_block_time(params, blocks) + params.split_time[Op.ATTN_PREFILL] * extra + group)


def attn_decode_time(params: CostParams, batch, kv_len, heads, kv_heads, head_dim, peak_flops, mem_bw,
                     kv_bytes=2.0, a_bytes=2.0, d_v=None, kv_tok_bytes=None):
    """`batch` sequences each decoding one token attending to kv_len keys (including itself).
    MLA: pass head_dim = latent+rope width, d_v = latent width and kv_tok_bytes explicitly."""
    d_v = head_dim if d_v is None else d_v
    kv_tok = 2.0 * kv_heads * head_dim * kv_bytes if kv_tok_bytes is None else kv_tok_bytes
    # MHA (one query head per KV head): the kernel runs one thread block per (sequence, head) over
    # the whole context, no KV tile floor (see Replica.kv_bytes_serial, iteration.serial_keys); MLA
    # and GQA split or pack instead
    serial_tok = jnp.where(heads <= kv_heads, 2.0 * head_dim * kv_bytes, 0.0) if kv_tok_bytes is None else 0.0
    item = decode_item_keys(params, kv_bytes * (head_dim + d_v), mem_bw)
    # keys summed over the sequences: each reads at least a tile, and the items beyond the first
    # wave pay their fixed work (roofline.waved_items; MLA: one latent head per sequence)
    items = batch * (kv_heads if kv_tok_bytes is None else 1.0)
    keys = batch * decode_tile_keys(params, kv_len) + item * waved_items(params, items) * (batch / items)
    flops = 2.0 * heads * (head_dim + d_v) * keys
    bytes_ = keys * kv_tok + batch * heads * (head_dim + d_v) * a_bytes
    # GQA calls that regroup heads or split the context launch a second kernel (MLA: one kernel, as
    # the engine's absorbed form; see iteration.decode_extra_launches)
    q_per_kv = jnp.where(kv_tok_bytes is None, heads / kv_heads, 1.0)
    extra = decode_extra_launches(batch, kv_len, q_per_kv, kv_heads, head_dim)
    group = jnp.where(q_per_kv > 1.0, params.group_time[Op.ATTN_DECODE], 0.0)  # the regrouped path
    # the head-width fill and the wide-head kernel's per-sequence time (not for MLA's own kernel)
    wide = 0.0 if kv_tok_bytes is not None else decode_wide_time(params, batch, head_dim, head_dim > WIDE_HEAD_DIM)
    return (kernel_time(params, Op.ATTN_DECODE, flops, bytes_, peak_flops, mem_bw, _BIG, 1.0,
                        serial_bytes=(kv_len + item) * serial_tok) + params.split_time[Op.ATTN_DECODE] * extra
            + group + wide)


def moe_time(params: CostParams, num_tokens, hidden, inter, num_experts, top_k, peak_flops, mem_bw,
             ep=1.0, tp=1.0, w_bytes=2.0, a_bytes=2.0, mats=3.0):
    """One MoE layer's grouped expert GEMMs on one device (experts split over ep, each expert's
    intermediate split over tp/ep)."""
    inter_local = inter * ep / tp
    assign = num_tokens * top_k
    frac_hit = 1.0 - jnp.power(jnp.maximum(1.0 - top_k / num_experts, 0.0), num_tokens)
    e_w = mats * hidden * inter_local
    flops = 2.0 * (assign / ep) * e_w
    bytes_ = (num_experts / ep) * frac_hit * e_w * w_bytes + (assign / ep) * (2.0 * hidden + mats * inter_local) * a_bytes
    return kernel_time(params, Op.MOE, flops, bytes_, peak_flops, mem_bw, assign / num_experts, 3.0)


def elementwise_time(params: CostParams, bytes_, mem_bw, flops=0.0, peak_flops=1e15, kernels=1.0):
    """A memory-bound kernel (norm, activation, softmax) moving `bytes_`."""
    return kernel_time(params, Op.ELEMENTWISE, flops, bytes_, peak_flops, mem_bw, _BIG, kernels)


def comm_time(params: CostParams, kind: str, message_bytes, num_devices, bandwidth, latency):
    """A collective: kind in allreduce, allgather, reducescatter, alltoall, send_recv."""
    comm = {"allreduce": Comm.ALLREDUCE, "allgather": Comm.ALLGATHER, "reducescatter": Comm.ALLGATHER,
            "alltoall": Comm.ALLTOALL, "send_recv": Comm.SEND_RECV}[kind]
    return collective_time(params, comm, message_bytes, num_devices, bandwidth, latency)
