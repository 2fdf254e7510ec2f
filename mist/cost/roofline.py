"""Smooth, differentiable roofline: time of a kernel from its FLOPs and bytes.

time = overhead + smax(compute time, memory time), where
  compute time = FLOPs / (peak * eff_c * rows / (rows + m_half))   (small kernels reach less of peak)
  memory time  = bytes / (bandwidth * eff_m)
  smax(a, b)   = (a^p + b^p)^(1/p)  (p -> inf is the hard roofline; finite p models partial overlap)
All inputs are arrays; absent kernels (zero work) cost nothing, including no overhead.
"""

from __future__ import annotations

import jax.numpy as jnp

from .params import Comm, CostParams, Op

_TINY = 1e-30


def smooth_max(a, b, p):
    """(a^p + b^p)^(1/p) for a, b >= 0, computed without overflow and with finite gradients at 0."""
    big = jnp.maximum(a, b)
    on = big > 0
    # "double where": with a = b = 0 every intermediate stays finite, so that the gradient of the
    # untaken branch is 0 rather than 0 * inf = NaN (s^(1/p) has an infinite slope at s = 0)
    m = jnp.where(on, big, 1.0)
    # the larger term divided by m is exactly 1 (and 1^p = 1 exactly): two powers instead of three,
    # the same numbers (powers of float64 dominate the engine's step when a sweep vmaps it)
    s = 1.0 + jnp.power(jnp.maximum(jnp.minimum(a, b) / m, _TINY), p)
    return jnp.where(on, m * jnp.power(s, 1.0 / p), 0.0)


def kernel_time(params: CostParams, op: int, flops, bytes_, peak_flops, bandwidth, rows, kernels,
                serial_bytes=None, serial_time=None):
    """Time (s) of `kernels` launches of operator class `op` doing `flops` and moving `bytes_` in all.

    `rows` is the M dimension that decides how well a kernel fills the machine (tokens for a
    GEMM, query tokens for attention); `kernels` the number of launches (0 when absent).
    `serial_bytes` (optional): bytes that one thread block streams alone (a kernel that cannot
    split its longest piece of work); their time at params.serial_bw[op] floors the memory time.
    `serial_time` (optional): such a floor given as seconds (see gemm_serial_time).
    """
    rows = jnp.maximum(rows, _TINY)
    eff_c = params.compute_eff[op] * rows / (rows + params.m_half[op])
    t_c = flops / (peak_flops * eff_c)
    t_m = bytes_ / (bandwidth * params.memory_eff[op])
    if serial_bytes is not None:
        t_m = smooth_max(t_m, serial_bytes / params.serial_bw[op], params.sharpness[op])
    if serial_time is not None:
        t_m = smooth_max(t_m, serial_time, params.sharpness[op])
    active = (flops + bytes_) > 0
    return jnp.where(active, smooth_max(t_c, t_m, params.sharpness[op]) + kernels * params.overhead[op], 0.0)


#: output tile edge (rows = columns) whose K loop a GEMM's thread block runs serially
GEMM_TILE = 128.0


def gemm_serial_bytes(k, w_bytes, a_bytes):
    """Operand bytes one GEMM thread block streams alone over its K loop: a GEMM_TILE x GEMM_TILE
    output tile reads GEMM_TILE rows of the activation and GEMM_TILE columns of the weight per step
    of K. With params.serial_bw[GEMM] this floors small-M, small-N GEMMs with a long K loop, whose
    few output tiles cannot fill the machine (see kernel_time's serial_bytes)."""
    return k * GEMM_TILE * (w_bytes + a_bytes)


def gemm_serial_time(params: CostParams, k, w_bytes, a_bytes):
    """Seconds of the K loop of one GEMM output tile (gemm_serial_bytes at params.serial_bw[GEMM])
    when the library may split K: split s ways, the loop takes t / s plus s x tau for the partial
    tiles' reduction (tau = params.split_time[GEMM]), whose best split costs 2 sqrt(t tau); smoothly,
    t / sqrt(1 + t / 4 tau): t for short loops (no split), 2 sqrt(t tau) for long ones (cuBLAS's
    split-K: a small-M, small-N GEMM with K = 64K takes ~3x, not 25x, the time of one with K = 2.5K).
    tau ~ 0 (files written before it): the unsplit loop, t."""
    t = gemm_serial_bytes(k, w_bytes, a_bytes) / params.serial_bw[Op.GEMM]
    tau = params.split_time[Op.GEMM]
    on = tau > 1e-15
    ts = jnp.where(on, tau, 1.0)  # "double where": finite gradients when off
    return jnp.where(on, t / jnp.sqrt(1.0 + t / (4.0 * ts)), t)


def decode_item_keys(params: CostParams, head_bytes, bandwidth):
    """Keys that stand for the fixed work of one decode-attention item (a sequence's KV head in one
    layer: block-table walk, query load, softmax merge, output store, paid however short the
    context): the keys one head's K and V (`head_bytes` per token) stream, at the kernel's
    bandwidth, in params.item_time[ATTN_DECODE]. Added to each sequence's keys per layer, so a
    sequence pays item_time per KV head and layer, whatever its head width."""
    return params.item_time[Op.ATTN_DECODE] * bandwidth * params.memory_eff[Op.ATTN_DECODE] / head_bytes


def waved_items(params: CostParams, items, op: int = Op.ATTN_DECODE):
    """Attention work items of one call and layer that pay params.item_time[op] (decode: (sequence,
    KV head) items; prefill: thread blocks, see iteration.prefill_blocks): x - w (1 - exp(-x / w))
    of x items, w = params.item_wave[op]. The
    items of the first wave run side by side on the SMs while the call's fixed time runs, so their
    fixed work hides (~x^2 / 2w for x << w); beyond a wave each item adds its time (x - w). w -> 0
    charges every item (the form before the wave)."""
    w = params.item_wave[op]
    x = jnp.maximum(items, 0.0)
    # "double where": the off value (w ~ 1e-30) would overflow x / w^2 in the gradient
    on = w > 1e-3
    ws = jnp.where(on, w, 1.0)
    return jnp.where(on, x + ws * jnp.expm1(-x / ws), x)


def collective_time(params: CostParams, comm: int, size_bytes, group, bandwidth, latency):
    """Time (s) of one collective over `group` devices on a link of `bandwidth` (B/s per direction).

    all-reduce (ring/tree):  2 r(g) * V(S) / bw + 2 log2(g) * lat + o
    all-gather, all-to-all:    r(g) * V(S) / bw +   log2(g) * lat + o
    send/recv:                        V(S) / bw +            lat + o
    r(g) = ((g-1)/g)^gamma is the ring factor, V(S) = S + s_half^beta * S^(1-beta) the bytes
    charged at the link's large-message rate (the achieved bandwidth bw * S / V(S) grows with the
    message: the communication library's protocol and channel choices), o a fixed time per call.
    With gamma = 1 and s_half, o -> 0 this is the plain ring cost. S is the size of the whole
    buffer on each device: the (reduced) tensor for all-reduce, the gathered result (g shards) for
    all-gather (the input for reduce-scatter), each device's send buffer for all-to-all, the
    message for send/recv.
    """
    g = jnp.maximum(group, 1.0)
    multi = g > 1.0
    # "double where": g = 1 and S = 0 keep every intermediate finite, so gradients stay finite
    frac = jnp.where(multi, (g - 1.0) / g, 1.0)
    ring = jnp.where(multi, jnp.exp(params.comm_group_exp[comm] * jnp.log(frac)), 0.0)
    steps = jnp.log2(g)
    on = size_bytes > 0
    s_pos = jnp.where(on, size_bytes, 1.0)
    beta = params.comm_beta[comm]
    vol = size_bytes + jnp.where(on, jnp.exp(beta * params.log_comm_s_half[comm]
                                             + (1.0 - beta) * jnp.log(s_pos)), 0.0)
    bw = bandwidth * params.comm_bw_eff[comm]
    lat = latency * params.comm_latency_scale[comm]
    ovh = params.comm_overhead[comm]
    if comm == Comm.ALLREDUCE:
        t = 2.0 * ring * vol / bw + 2.0 * steps * lat + ovh
    elif comm == Comm.SEND_RECV:
        t = vol / bw + lat + ovh
    else:
        t = ring * vol / bw + steps * lat + ovh
    active = on & (multi | (comm == Comm.SEND_RECV))
    return jnp.where(active, t, 0.0)
