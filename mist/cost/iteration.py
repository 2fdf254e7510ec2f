"""Time of one engine iteration of a model replica for a mixed batch of prefill chunks and decodes.

Pure JAX: jit-, vmap- and grad-able in the cost parameters, the replica arrays and the batch.
An iteration's latency covers every layer of the model (all pipeline stages in turn), so
pipeline parallelism changes the weights each device holds and adds stage-to-stage transfers.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .params import Comm, CostParams, Op
from .replica import Replica
from .roofline import collective_time, decode_item_keys, gemm_serial_time, kernel_time, waved_items

#: bytes moved per token and hidden element by a layer's elementwise kernels (two norms, two
#: residual adds, rotary on q/k), in units of one activation element
ELEMENTWISE_PASSES_PER_LAYER = 10.0
#: elementwise kernel launches per layer
ELEMENTWISE_KERNELS_PER_LAYER = 4.0
_BIG = 1e30


class MixedBatch(eqx.Module):
    """One iteration's work. Prefill chunks: new tokens and tokens already in the KV cache before
    the chunk; `prefill_last` marks chunks that finish their prompt (and so sample a token).
    Decodes: tokens in the KV cache before this step (the new token attends to context + 1)."""

    prefill_tokens: Float[Array, "p"]
    prefill_context: Float[Array, "p"]
    prefill_last: Bool[Array, "p"]
    prefill_mask: Bool[Array, "p"]
    decode_context: Float[Array, "d"]
    decode_mask: Bool[Array, "d"]


def make_batch(prefill_tokens=(), prefill_context=None, decode_context=(), prefill_last=None,
               prefill_capacity: int | None = None, decode_capacity: int | None = None) -> MixedBatch:
    """Build a MixedBatch from Python sequences, padded to the given capacities."""
    import numpy as np

    pt = np.asarray(prefill_tokens, dtype=np.float32).reshape(-1)
    pc = np.zeros_like(pt) if prefill_context is None else np.asarray(prefill_context, np.float32).reshape(-1)
    pl = np.ones(pt.shape, bool) if prefill_last is None else np.asarray(prefill_last, bool).reshape(-1)
    dc = np.asarray(decode_context, dtype=np.float32).reshape(-1)
    P = max(prefill_capacity or len(pt), 1)
    D = max(decode_capacity or len(dc), 1)
    if len(pt) > P or len(dc) > D:
        raise ValueError("batch larger than its capacity")
    pad = lambda a, n, v=0: np.concatenate([a, np.full(n - len(a), v, a.dtype)])  # noqa: E731
    return MixedBatch(
        prefill_tokens=jnp.asarray(pad(pt, P)), prefill_context=jnp.asarray(pad(pc, P)),
        prefill_last=jnp.asarray(pad(pl, P, False)), prefill_mask=jnp.asarray(pad(np.ones(len(pt), bool), P, False)),
        decode_context=jnp.asarray(pad(dc, D)), decode_mask=jnp.asarray(pad(np.ones(len(dc), bool), D, False)),
    )


def _windowed_pairs(q, c, causal, window):
    """Query-key pairs of a chunk of q new tokens after c cached ones (causal: only the lower
    triangle; with a sliding window W each query sees at most W keys)."""
    full_causal = q * c + q * (q + 1.0) / 2.0
    bidir = q * (c + q)
    pairs = causal * full_causal + (1.0 - causal) * bidir
    # sum_{i=1..q} min(c + i, W): the first n1 queries see c+i keys, the rest see W
    w = jnp.maximum(window, 1.0)
    n1 = jnp.clip(w - c, 0.0, q)
    win = n1 * c + n1 * (n1 + 1.0) / 2.0 + (q - n1) * w
    return pairs, jnp.where(window > 0, jnp.minimum(win, pairs), pairs)


#: widest head of the narrow-head prefill tile (CostParams.narrow_tile)
NARROW_HEAD_DIM = 64.0


def narrow_tile_ratio(params: CostParams, head_dim):
    """How much larger a prefill-attention kernel's query tile is at `head_dim` than at 128:
    params.narrow_tile[ATTN_PREFILL] at head dims <= NARROW_HEAD_DIM (FlashAttention-3 on Hopper:
    192 / 128 rows), else 1."""
    return jnp.where(head_dim <= NARROW_HEAD_DIM, params.narrow_tile[Op.ATTN_PREFILL], 1.0)


def prefill_tile_pairs(params: CostParams, q, pairs, q_per_kv=1.0, head_dim=128.0):
    """Query-key pairs a prefill attention kernel effectively computes: queries are processed in
    tiles and each query tile visits at least one key tile, so short chunks and short contexts cost
    more than their exact pairs. m_half[ATTN_PREFILL] is that tile (tokens), times
    narrow_tile_ratio at narrow heads. The query tile packs
    the q_per_kv query heads that share a KV head (GQA packing), so per query head it pads by
    tile / q_per_kv rows: (q + tile / q_per_kv) * max(mean keys per query, tile). Chunks of more
    than one token pack q_per_kv^e heads (e = params.gqa_pack[ATTN_PREFILL], fitted per device:
    FlashAttention-2 packs the group only for single-token queries, FlashAttention-3 always)."""
    tile = params.m_half[Op.ATTN_PREFILL] * narrow_tile_ratio(params, head_dim)
    qs = jnp.maximum(q, 1.0)
    pack = jnp.where(q > 1.0, jnp.power(q_per_kv, params.gqa_pack[Op.ATTN_PREFILL]), q_per_kv)
    return jnp.where(q > 0, (q + tile / pack) * jnp.maximum(pairs / qs, tile), 0.0)


#: query rows of one prefill-attention thread block (FlashAttention-2 and -3 at head dim <= 128)
PREFILL_BLOCK_M = 128.0


def prefill_blocks(params: CostParams, q, heads, q_per_kv=1.0, head_dim=128.0):
    """Thread blocks of a prefill-attention call that one sequence adding q tokens launches per
    layer: its query tiles of PREFILL_BLOCK_M rows (times narrow_tile_ratio at narrow heads) times
    its query heads, a tile holding the
    q_per_kv^e query heads of one KV head (q_per_kv for single-token queries; the packing of
    prefill_tile_pairs). Elementwise; summed over a call's sequences it is the B of the block ramp
    (see prefill_block_factor)."""
    pack = jnp.where(q > 1.0, jnp.power(q_per_kv, params.gqa_pack[Op.ATTN_PREFILL]), q_per_kv)
    rows = PREFILL_BLOCK_M * narrow_tile_ratio(params, head_dim)
    return jnp.where(q > 0, (heads / pack) * jnp.ceil(q * pack / rows), 0.0)


def prefill_block_factor(params: CostParams, blocks, multi):
    """Multiplier on a prefill-attention call's compute work for `blocks` thread blocks in all
    (prefill_blocks summed over its sequences): 1 + b / B, the kernel reaching B / (B + b) of its
    compute efficiency (b = params.block_half[ATTN_PREFILL]: too few blocks leave SMs idle or run
    one block per SM, which hides less latency). `multi`: the call has a chunk of more than one
    token; calls of single-token chunks only run the kernel's decode path (which splits the
    context to fill the machine): factor 1."""
    ramp = 1.0 + params.block_half[Op.ATTN_PREFILL] / jnp.maximum(blocks, 1.0)
    return jnp.where(multi, ramp, 1.0)


def prefill_block_time(params: CostParams, blocks):
    """Seconds per layer of the fixed work of a prefill-attention call's `blocks` thread blocks
    (prefill_blocks summed over its sequences): params.item_time[ATTN_PREFILL] per block beyond the
    first wave (roofline.waved_items with params.item_wave[ATTN_PREFILL]): each block loads its
    query tile, runs the softmax epilogue and stores its output however few keys it visits, so calls
    of many short chunks (FlashAttention-3 on H100: MHA, 128 sequences x 16 tokens x 16 heads, ~35 ns
    per block) cost more than their pairs; ~0 (off) in files written before it."""
    return params.item_time[Op.ATTN_PREFILL] * waved_items(params, blocks, Op.ATTN_PREFILL)


#: FlashAttention-2 splits a decode call's context only while its (sequence, KV head) work items
#: fill fewer than 0.8 x the SMs (108 on A100); with more it runs one kernel
SPLIT_MAX_ITEMS = 86.4


def decode_extra_launches(n, longest, q_per_kv, kv_heads, head_dim):
    """Second kernels (0 or 1 per layer) of a GQA decode-attention call of n sequences whose
    longest attends to `longest` keys. FlashAttention-2 packs the q_per_kv query heads of a KV head
    into one query tile by regrouping the query and output, which takes a copy kernel once the call
    has >= 2 sequences and >= 2 KV heads; it splits the context (and adds a combine kernel) when the
    longest sequence spans more than one KV block (256 keys at head dim <= 64, 128 at <= 128, else
    64) while few items run (SPLIT_MAX_ITEMS). MHA and MLA (q_per_kv = 1) launch one kernel. Charged
    at params.split_time[ATTN_DECODE] each (see decode_split_time)."""
    block = jnp.where(head_dim <= 64.0, 256.0, jnp.where(head_dim <= 128.0, 128.0, 64.0))
    regroup = (n >= 2.0) & (kv_heads >= 2.0)
    split = (longest > block) & (n * kv_heads < SPLIT_MAX_ITEMS)
    return jnp.where((q_per_kv > 1.0) & (regroup | split), 1.0, 0.0)


#: widest head FlashAttention-3 serves; decode calls of wider (non-MLA) heads run another kernel
#: (vLLM's FlashAttention-4 path on Hopper), see decode_wide_time
WIDE_HEAD_DIM = 256.0


def decode_wide_time(params: CostParams, n, head_dim, wide):
    """Seconds per layer of a decode call's fixed work that depends on the head width and, for
    heads wider than WIDE_HEAD_DIM, on the number of sequences (elementwise): the pipeline fill of
    a thread block, params.width_time per element of d_qk + d_v (= 2 head_dim), paid once per call
    that has a sequence; and the wide-head kernel's per-sequence time, seq_time x n x (1 + n /
    seq_half), which does not overlap across sequences (vLLM's FlashAttention-4 path on H100 at
    head dim 512: ~2.2 us per sequence at batch 8-64, ~3.6-4.8 at 512). `wide`: the call runs the
    wide-head kernel (a non-MLA head wider than WIDE_HEAD_DIM)."""
    on = n > 0
    fill = jnp.where(on, params.width_time[Op.ATTN_DECODE] * 2.0 * head_dim, 0.0)
    seq = params.seq_time[Op.ATTN_DECODE] * n * (1.0 + n / params.seq_half[Op.ATTN_DECODE])
    return fill + jnp.where(wide & on, seq, 0.0)


def decode_split_time(params: CostParams, rep: Replica, n, longest):
    """Seconds of decode attention's second kernels over every layer for n decoding sequences, the
    longest attending to `longest` keys (elementwise; see decode_extra_launches), of the GQA
    regrouped path (params.group_time) of every call that has a sequence, and of the head-width
    and wide-head terms (decode_wide_time; not for MLA's absorbed form, d_qk != d_v, which runs
    its own kernel)."""
    extra = decode_extra_launches(n, longest, rep.q_per_kv, rep.heads / rep.q_per_kv, rep.d_qk_decode)
    group = jnp.where((rep.q_per_kv > 1.0) & (n > 0), params.group_time[Op.ATTN_DECODE], 0.0)
    mha_like = rep.d_qk_decode == rep.d_v_decode
    wide = jnp.where(mha_like, decode_wide_time(params, n, rep.d_qk_decode, rep.d_qk_decode > WIDE_HEAD_DIM), 0.0)
    return rep.num_layers * (params.split_time[Op.ATTN_DECODE] * extra + group + wide)


def decode_tile_keys(params: CostParams, keys):
    """Keys a paged decode-attention kernel effectively reads per sequence: at least one KV tile
    (m_half[ATTN_DECODE] tokens), so that very short contexts still cost a tile per sequence."""
    return jnp.maximum(keys, params.m_half[Op.ATTN_DECODE])


def sum_rows(*xs):
    """Sums over the last axis of same-shaped arrays, as one matrix-vector product: on XLA CPU each
    separate reduction over more than 32 elements is two small kernels, and the simulator's step
    is bound by the number of kernels, not by arithmetic."""
    m = jnp.stack(jnp.broadcast_arrays(*[jnp.asarray(x) for x in xs]), axis=-2)
    tot = m @ jnp.ones(m.shape[-1], m.dtype)
    return tuple(tot[..., i] for i in range(len(xs)))


def decode_attention_time(params: CostParams, rep: Replica, decode_context, dm):
    """Paged decode attention over every decoding sequence (dm: 0/1 mask); the trailing axis of
    `decode_context` is the batch, leading axes (if any) are evaluated independently."""
    return decode_attention_from_aggregates(params, rep, *decode_aggregates(params, rep, decode_context + 1.0, dm > 0))


def decode_aggregates(params: CostParams, rep: Replica, att, on):
    """What decode attention needs of a batch of decoding rows attending to `att` keys (rows where
    `on`; trailing axis): (rows, rows below one KV tile, their keys summed over the rows between the
    tile and the sliding window, rows above the window, keys summed over those, the longest row's
    keys). Integer-valued sums, exact in float64 whatever the row order (see `decode_stretch`)."""
    n, c_low, keys_mid, c_high, keys_high, keys = decode_row_terms(params, rep, att, on)
    n, c_low, keys_mid, c_high, keys_high = sum_rows(n, c_low, keys_mid, c_high, keys_high)
    return n, c_low, keys_mid, c_high, keys_high, jnp.max(keys, axis=-1)


def decode_row_terms(params: CostParams, rep: Replica, att, on):
    """Each row's terms of `decode_aggregates`, elementwise (summed over rows, and maximised for the
    last, they are the aggregates): (1, below one KV tile, keys between the tile and the window,
    above the window, keys above it, keys or -inf), 0 where not `on`."""
    tile = params.m_half[Op.ATTN_DECODE]
    win = jnp.where(rep.window > 0, jnp.maximum(rep.window, tile), _BIG)
    low = on & (att < tile)
    high = on & (att > win)
    mid = on & ~low & ~high
    return (on.astype(att.dtype), low.astype(att.dtype), jnp.where(mid, att, 0.0), high.astype(att.dtype),
            jnp.where(high, att, 0.0), jnp.where(on, att, -_BIG))


def decode_attention_from_aggregates(params: CostParams, rep: Replica, n, c_low, keys_mid, c_high, keys_high,
                                     longest):
    """Seconds of one decode-attention call from `decode_aggregates` (elementwise: any shape). Every
    sequence reads at least one KV tile per layer (`decode_tile_keys`), sliding-window layers at most
    the window, plus per layer the keys that stand for the fixed work of each KV head
    (`roofline.decode_item_keys`); the longest sequence floors an unsplit (MHA) kernel through its
    serial keys; GQA calls add their second kernels (`decode_split_time`)."""
    L = rep.num_layers
    tile = params.m_half[Op.ATTN_DECODE]
    win = jnp.where(rep.window > 0, jnp.maximum(rep.window, tile), _BIG)
    item = decode_item_keys(params, rep.kv_bytes * (rep.d_qk_decode + rep.d_v_decode), rep.mem_bw)
    # the items that pay their fixed work (roofline.waved_items), in sequences: n x KV heads items
    # (MLA's absorbed form: one latent head)
    kvh = jnp.where(rep.d_qk_decode == rep.d_v_decode, rep.heads / rep.q_per_kv, 1.0)
    n_items = waved_items(params, n * kvh) / kvh
    F = L - rep.sliding_layers
    keys = (F * (tile * c_low + keys_mid + keys_high + item * n_items)
            + rep.sliding_layers * (tile * c_low + keys_mid + win * c_high + item * n_items))
    width_d = rep.heads * (rep.d_qk_decode + rep.d_v_decode)
    dc_flops = 2.0 * width_d * keys
    dc_bytes = keys * rep.kv_bytes_token_layer + L * n * width_d * rep.act_bytes
    serial = serial_keys(params, rep, longest) * rep.kv_bytes_serial
    return (kernel_time(params, Op.ATTN_DECODE, dc_flops, dc_bytes, rep.peak_attn, rep.mem_bw, _BIG, L,
                        serial_bytes=serial) + decode_split_time(params, rep, n, longest))


def serial_keys(params: CostParams, rep: Replica, att):
    """Keys, summed over the layers, that one thread block of an unsplit (MHA) decode kernel streams
    for the sequence attending to `att` keys: its context (sliding-window layers capped at the
    window) plus the fixed work of its item (see decode_attention_from_aggregates), without the KV tile floor, which a
    short context's block streams while the launch's fixed time runs (see Replica.kv_bytes_serial)."""
    item = decode_item_keys(params, rep.kv_bytes * (rep.d_qk_decode + rep.d_v_decode), rep.mem_bw)
    a = jnp.maximum(att, 0.0)
    win = jnp.minimum(a, jnp.where(rep.window > 0, rep.window, _BIG))
    keys = (rep.num_layers - rep.sliding_layers) * (a + item) + rep.sliding_layers * (win + item)
    return jnp.where(att > 0, keys, 0.0)  # no sequence (att = -inf): exactly 0, no vanishing floor


def decode_stretch(params: CostParams, rep: Replica, context, first, last, iterations: int, dense_table=None):
    """Times of `iterations` consecutive decode-only iterations j = 0, 1, ...: row i decodes in
    iteration j when first[i] <= j <= last[i], attending to context[i] + j + 1 keys (rows join
    after the iteration that made their first token and leave after the one that ends them).
    `first` must be 0 or 1 for rows that decode at all (any value > last for rows that do not);
    rows are the trailing axis of 1-D arrays (vmap for more). Returns (times [J], decoding rows
    per iteration [J]).

    Only attention depends on the contexts (`stretch_aggregates`); the rest of a decode-only
    iteration depends on the number of rows alone (`decode_dense_time`).

    `dense_table` (optional): `decode_dense_time` at n = 0, 1, 2, ... rows, evaluated once by a
    caller that costs many stretches of one replica (the engine: float64 powers per iteration
    would dominate its step otherwise); the same numbers, looked up instead of recomputed."""
    agg = stretch_aggregates(params, rep, context, first, last, iterations)
    return decode_times_from_aggregates(params, rep, agg, dense_table)[0], agg[0]


def decode_times_from_aggregates(params: CostParams, rep: Replica, agg, dense_table=None):
    """(times, attention times) of decode-only iterations from their `decode_aggregates` (elementwise
    over iterations): the non-attention part (`decode_dense_lookup`) plus decode attention; 0 for an
    iteration without rows."""
    n = agg[0]
    attn = decode_attention_from_aggregates(params, rep, *agg)
    return jnp.where(n > 0, decode_dense_lookup(params, rep, n, dense_table) + attn, 0.0), attn


def decode_dense_lookup(params: CostParams, rep: Replica, n, dense_table=None):
    """`decode_dense_time(n)`, read from `dense_table` (its values at n = 0, 1, ...) when given."""
    if dense_table is None:
        return decode_dense_time(params, rep, n)
    return dense_table[jnp.clip(n.astype(jnp.int32), 0, dense_table.shape[-1] - 1)]


def stretch_aggregates(params: CostParams, rep: Replica, context, first, last, iterations: int):
    """`decode_aggregates` of every iteration j < `iterations` of a decode stretch (see
    `decode_stretch` for the rows), each [J]. A row's keys are piecewise linear in j (one KV tile
    below the tile size, the window above it for sliding-window layers), so the sums come from
    integer counts and sums per segment, accumulated as differences at each row's breakpoints and
    prefix-summed over j: O(S + J) work instead of an [J, S] grid, and exact (integer-valued
    float64), so any split of the same iterations into stretches gives the same aggregates as
    `decode_aggregates` of each iteration's rows."""
    J = iterations
    dt = context.dtype
    tile = params.m_half[Op.ATTN_DECODE]
    win = jnp.where(rep.window > 0, jnp.maximum(rep.window, tile), _BIG)
    u1 = context + 1.0  # keys at j = 0
    first = jnp.asarray(first, dt)
    last = jnp.asarray(last, dt)
    on = first <= last
    end = last + 1.0
    # first iteration with u1 + j >= tile, and first with u1 + j > win, clipped into [first, last + 1]
    b1 = jnp.clip(jnp.ceil(tile - u1), first, end)
    b2 = jnp.clip(jnp.floor(win - u1) + 1.0, b1, end)
    # differences of (rows, rows below a tile, rows in [tile, win], rows above win, sum u1 over the
    # middle rows, sum u1 over the rows above) at the four breakpoints of each row
    one = jnp.ones_like(u1)
    zero = jnp.zeros_like(u1)
    upd = jnp.stack([
        jnp.stack([one, one, zero, zero, zero, zero], -1),  # at first
        jnp.stack([zero, -one, one, zero, u1, zero], -1),  # at b1
        jnp.stack([zero, zero, -one, one, -u1, u1], -1),  # at b2
        jnp.stack([-one, zero, zero, -one, zero, -u1], -1),  # at last + 1
    ], -2) * on[..., None, None]  # [S, 4, 6]
    pos = jnp.clip(jnp.stack([first, b1, b2, end], -1), 0, J).astype(jnp.int32)  # [S, 4]
    diff = jnp.zeros((J + 1, 6), dt).at[pos].add(upd)
    agg = _prefix_sum(diff)[:J]
    n, c_low, c_mid, c_high, s_mid, s_high = (agg[:, i] for i in range(6))
    j = jnp.arange(J, dtype=dt)
    keys_mid = s_mid + j * c_mid  # sum of u1 + j over the rows between tile and window
    keys_high = s_high + j * c_high
    # the longest row: rows decoding in iteration j >= 1 are those with first <= 1 and last >= j, a
    # maximum by `last` taken over every later `last`; iteration 0 has only the rows with first = 0
    lpos = jnp.clip(last, 0, J - 1).astype(jnp.int32)
    by_last = jnp.full((J,), -_BIG, dt).at[lpos].max(jnp.where(on & (first <= 1.0), u1, -_BIG))
    later = _suffix_max(by_last)
    at0 = jnp.max(jnp.where(on & (first <= 0.0), u1, -_BIG))
    longest = jnp.where(j == 0, at0, later) + j
    return n, c_low, keys_mid, c_high, keys_high, longest


def _prefix_sum(x):
    """Inclusive prefix sums along the first axis, as one product with a triangular matrix (a
    cumulative reduce-window is several kernels on XLA CPU); exact for integer-valued floats."""
    i = jnp.arange(x.shape[0])
    return (i[:, None] >= i[None, :]).astype(x.dtype) @ x


def _suffix_max(x):
    """max(x[j:]) for every j of a short 1-D array (one [n, n] masked reduction)."""
    i = jnp.arange(x.shape[0])
    return jnp.max(jnp.where(i[None, :] >= i[:, None], x[None, :], -_BIG), axis=1)


def decode_dense_time(params: CostParams, rep: Replica, n):
    """Seconds of everything but attention in a decode-only iteration of n sequences."""
    return sum(dense_parts(params, rep, n, n, n).values())


def decode_stretch_times(params: CostParams, rep: Replica, decode_context, decode_mask, offsets):
    """Times of decode-only iterations in which every masked sequence decodes, its context
    advanced by each of `offsets` (one `decode_stretch` iteration per offset)."""
    ctx = jnp.asarray(decode_context)
    first = jnp.where(decode_mask, 0.0, _BIG).astype(ctx.dtype)
    last = jnp.zeros_like(ctx)
    one = lambda o: decode_stretch(params, rep, ctx + o, first, last, 1)[0][0]  # noqa: E731
    return jax.vmap(one)(jnp.asarray(offsets, ctx.dtype))


def dense_parts(params: CostParams, rep: Replica, T, n_sample, n_seq, n_prompt=0.0) -> dict[str, Float[Array, "..."]]:
    """Seconds per operator class of everything in an iteration but attention: GEMMs, LM head,
    mixture of experts, elementwise kernels, collectives and the CPU side, for T tokens through
    the linear layers, n_sample rows that sample a token, n_seq sequences and n_prompt of them
    prefilling a prompt chunk. Elementwise in the counts (any common shape)."""
    return dense_combine(params, dense_token_pieces(params, rep, T), dense_sample_pieces(params, rep, n_sample),
                         T, n_seq, n_prompt)


def dense_token_pieces(params: CostParams, rep: Replica, T) -> dict[str, Float[Array, "..."]]:
    """The parts of `dense_parts` that depend only on the T tokens through the linear layers (a
    table over T can stand for them: see `dense_combine`)."""
    ab = rep.act_bytes
    L = rep.num_layers
    h = rep.hidden
    # ---- dense GEMMs of all layers (the trailing axis: the replica's GEMM shapes)
    Tg = jnp.asarray(T)[..., None]
    g_on = (rep.gemm_n > 0) & (rep.gemm_layers > 0)
    g_flops = 2.0 * Tg * rep.gemm_n * rep.gemm_k * rep.gemm_layers
    g_bytes = rep.gemm_layers * (rep.gemm_n * rep.gemm_k * rep.w_bytes + Tg * (rep.gemm_n + rep.gemm_k) * ab)
    g_bytes = jnp.where(Tg > 0, g_bytes, 0.0)
    t_gemm = jnp.sum(jnp.where(g_on, kernel_time(params, Op.GEMM, g_flops, g_bytes, rep.peak_gemm, rep.mem_bw,
                                                   Tg, rep.gemm_layers, serial_time=rep.gemm_layers
                                                   * gemm_serial_time(params, rep.gemm_k, rep.w_bytes, ab)),
                                       0.0), axis=-1)

    # ---- mixture of experts (grouped GEMMs over the experts that received tokens)
    assign = T * rep.top_k
    frac_hit = 1.0 - jnp.power(jnp.maximum(1.0 - rep.top_k / rep.experts, 0.0), T)
    local_experts = rep.experts / rep.ep
    e_w = rep.expert_mats * h * rep.expert_inter
    moe_flops = rep.moe_layers * 2.0 * (assign / rep.ep) * e_w
    moe_bytes = rep.moe_layers * (local_experts * frac_hit * e_w * rep.expert_w_bytes
                                  + (assign / rep.ep) * (2.0 * h + rep.expert_mats * rep.expert_inter) * ab)
    t_moe = kernel_time(params, Op.MOE, moe_flops, jnp.where(T > 0, moe_bytes, 0.0), rep.peak_expert, rep.mem_bw,
                        assign / rep.experts, 3.0 * rep.moe_layers)

    # ---- elementwise: norms, residuals, rotary, activations, embedding gather
    dense_inter = rep.gemm_n[4] * rep.gemm_layers[4]  # gate+up width summed over dense layers
    ew_bytes = (L * ELEMENTWISE_PASSES_PER_LAYER * T * h * ab + 1.5 * T * dense_inter * ab
                + T * h * (rep.w_bytes + ab))
    # FLOPs at the activation format's rate, as calibration counts them (5 per element and pass)
    ew_flops = L * 8.0 * T * h
    t_ew = jnp.where(T > 0, kernel_time(params, Op.ELEMENTWISE, ew_flops, ew_bytes, rep.peak_attn, rep.mem_bw,
                                        _BIG, L * ELEMENTWISE_KERNELS_PER_LAYER + 1.0), 0.0)

    # ---- collectives over the tokens
    tp_bw, tp_lat = _tp_link(rep)
    ar = 2.0 * L * collective_time(params, Comm.ALLREDUCE, T * h * ab, rep.tp, tp_bw, tp_lat)
    a2a = collective_time(params, Comm.ALLTOALL, (T * rep.top_k / rep.ep) * h * ab, rep.ep, tp_bw, tp_lat)
    span = rep.tp * rep.pp
    pp_bw = jnp.where(span <= rep.up_domain, rep.up_bw, rep.out_bw)
    pp_lat = jnp.where(span <= rep.up_domain, rep.up_lat, rep.out_lat)
    sr = (rep.pp - 1.0) * collective_time(params, Comm.SEND_RECV, T * h * ab, 2.0, pp_bw, pp_lat)
    return {"gemm": t_gemm, "moe": t_moe, "elementwise": t_ew, "allreduce": ar, "alltoall": 2.0 * rep.moe_layers * a2a,
            "sendrecv": sr}


def _tp_link(rep: Replica):
    """Bandwidth and latency of the tensor-parallel group's link (scale-up domain or scale-out)."""
    inside = rep.tp <= rep.up_domain
    return jnp.where(inside, rep.up_bw, rep.out_bw), jnp.where(inside, rep.up_lat, rep.out_lat)


def dense_sample_pieces(params: CostParams, rep: Replica, n_sample) -> dict[str, Float[Array, "..."]]:
    """The parts of `dense_parts` that depend only on the n_sample rows that sample a token: the LM
    head and the gather of the logits from the vocabulary shards."""
    ab = rep.act_bytes
    h = rep.hidden
    lm_flops = 2.0 * n_sample * h * rep.vocab_local * rep.has_lm_head
    lm_bytes = jnp.where(n_sample > 0, (h * rep.vocab_local * rep.w_bytes
                                        + n_sample * (h + rep.vocab_local) * ab) * rep.has_lm_head, 0.0)
    t_lm = kernel_time(params, Op.GEMM, lm_flops, lm_bytes, rep.peak_gemm, rep.mem_bw, n_sample, 1.0,
                       serial_time=gemm_serial_time(params, h, rep.w_bytes, ab))
    tp_bw, tp_lat = _tp_link(rep)
    # S is the whole gathered buffer (full vocabulary)
    ag = collective_time(params, Comm.ALLGATHER, n_sample * rep.vocab_local * rep.tp * 4.0 * rep.has_lm_head,
                         rep.tp, tp_bw, tp_lat)
    return {"lm_head": t_lm, "allgather": ag}


def dense_combine(params: CostParams, tok: dict, smp: dict, T, n_seq, n_prompt=0.0) -> dict[str, Float[Array, "..."]]:
    """`dense_parts` from its token and sample pieces (which may come from tables) and the CPU side
    of the serving engine (scheduling, input preparation, sampling; n_prompt of the n_seq sequences
    prefill a prompt chunk and pay params.cpu_per_prompt each; every token beyond
    params.cpu_token_knee pays params.cpu_per_token_above), in one fixed order of sums."""
    t_comm = tok["allreduce"] + smp["allgather"]
    t_comm += tok["alltoall"]
    t_comm += tok["sendrecv"]
    t_comm = jnp.where(T > 0, t_comm, 0.0)
    t_cpu = jnp.where(T > 0, params.cpu_iter + params.cpu_per_seq * n_seq + params.cpu_per_token * T
                      + params.cpu_per_prompt * n_prompt
                      + params.cpu_per_token_above * jnp.maximum(T - params.cpu_token_knee, 0.0), 0.0)
    return {"gemm": tok["gemm"], "moe": tok["moe"], "elementwise": tok["elementwise"], "lm_head": smp["lm_head"],
            "comm": t_comm, "cpu": t_cpu}


def iteration_breakdown(params: CostParams, rep: Replica, batch: MixedBatch) -> dict[str, Float[Array, ""]]:
    """Seconds spent per operator class in one iteration (keys: gemm, attn_prefill, attn_decode,
    moe, elementwise, lm_head, comm, cpu)."""
    dm = batch.decode_mask.astype(jnp.float32)
    t_attn_p, n_pre_tok, n_pf, n_pf_last = prefill_attention(params, rep, batch.prefill_tokens,
                                                             batch.prefill_context, batch.prefill_last,
                                                             batch.prefill_mask)
    n_dec = jnp.sum(dm)
    n_seq = n_pf + n_dec
    T = n_pre_tok + n_dec  # tokens through the linear layers
    n_sample = n_pf_last + n_dec
    # ---- decode attention (paged, memory bound)
    t_attn_d = decode_attention_time(params, rep, batch.decode_context, dm)
    return breakdown(dense_parts(params, rep, T, n_sample, n_seq, n_pf), t_attn_p, t_attn_d)


def breakdown(dense: dict, attn_prefill, attn_decode) -> dict[str, Float[Array, "..."]]:
    """An iteration's parts from `dense_parts` (or `dense_combine`) and its two attention times, in
    the order `iteration_time` sums them (a caller that assembles the parts itself, as the engine
    does for a mixed iteration inside a stretch, gets the same sum)."""
    return {"gemm": dense["gemm"], "attn_prefill": attn_prefill, "attn_decode": attn_decode, "moe": dense["moe"],
            "elementwise": dense["elementwise"], "lm_head": dense["lm_head"], "comm": dense["comm"],
            "cpu": dense["cpu"]}


def prefill_attention(params: CostParams, rep: Replica, tokens, context, last, mask):
    """One prefill-attention call over the chunks of a batch (trailing axis; leading axes are
    evaluated independently): (seconds, new tokens, chunks, chunks that finish their prompt).
    Per sequence, tile-padded pairs (see prefill_tile_pairs); per call, the thread-block ramp."""
    pm = mask.astype(jnp.float32)
    q = tokens * pm
    c = context * pm
    L = rep.num_layers
    full_pairs, win_pairs = _windowed_pairs(q, c, rep.causal, rep.window)
    full_layers = L - rep.sliding_layers
    width = rep.heads * (rep.d_qk_prefill + rep.d_v_prefill)
    hd = rep.d_qk_prefill
    pf_pairs_eff = (full_layers * prefill_tile_pairs(params, q, full_pairs, rep.q_per_kv, hd)
                    + rep.sliding_layers * prefill_tile_pairs(params, q, win_pairs, rep.q_per_kv, hd))
    kv_read = full_layers * (c + q) + rep.sliding_layers * jnp.minimum(c + q,
                                                                         jnp.where(rep.window > 0, rep.window + q, _BIG))
    # per pair: the dot products plus the work that does not scale with the head width (softmax)
    n_pre_tok, n_pf, n_pf_last, pf_flops_eff, pf_bytes, pf_blocks = sum_rows(
        q, pm, pm * last.astype(jnp.float32),
        2.0 * (width + rep.heads * params.pair_width[Op.ATTN_PREFILL]) * pf_pairs_eff,
        kv_read * rep.kv_bytes_token_layer + L * q * (width * rep.act_bytes + rep.kv_bytes_token_layer),
        prefill_blocks(params, q, rep.heads, rep.q_per_kv, hd))
    # the call's thread blocks against the machine (see prefill_block_factor); every masked chunk
    # has q >= 1, so the call has a multi-token chunk iff its tokens outnumber its chunks
    pf_flops_eff = pf_flops_eff * prefill_block_factor(params, pf_blocks, n_pre_tok > n_pf)
    t = jnp.where(n_pre_tok > 0, kernel_time(params, Op.ATTN_PREFILL, pf_flops_eff, pf_bytes, rep.peak_attn,
                                             rep.mem_bw, _BIG, L) + L * prefill_block_time(params, pf_blocks), 0.0)
    return t, n_pre_tok, n_pf, n_pf_last


def iteration_time(params: CostParams, rep: Replica, batch: MixedBatch) -> Float[Array, ""]:
    """Seconds for one iteration of `rep` on `batch` (0 for an empty batch)."""
    parts = iteration_breakdown(params, rep, batch)
    return sum(parts.values())


def device_time(params: CostParams, rep: Replica, batch: MixedBatch) -> Float[Array, ""]:
    """The accelerator-busy part of an iteration (everything except the CPU-side overhead)."""
    parts = iteration_breakdown(params, rep, batch)
    return sum(v for k, v in parts.items() if k != "cpu")


def operator_counts(rep: Replica, batch: MixedBatch) -> dict[str, Float[Array, ""]]:
    """Total FLOPs and bytes of one iteration (no efficiencies), for reports and hand checks."""
    pm = batch.prefill_mask.astype(jnp.float32)
    dm = batch.decode_mask.astype(jnp.float32)
    q = batch.prefill_tokens * pm
    c = batch.prefill_context * pm
    T = jnp.sum(q) + jnp.sum(dm)
    n_sample = jnp.sum(pm * batch.prefill_last.astype(jnp.float32)) + jnp.sum(dm)
    L = rep.num_layers
    gemm_flops = jnp.sum(2.0 * T * rep.gemm_n * rep.gemm_k * rep.gemm_layers)
    gemm_weight_bytes = jnp.sum(rep.gemm_n * rep.gemm_k * rep.gemm_layers) * rep.w_bytes
    full_pairs, win_pairs = _windowed_pairs(q, c, rep.causal, rep.window)
    pairs = (L - rep.sliding_layers) * full_pairs + rep.sliding_layers * win_pairs
    attn_p = jnp.sum(2.0 * rep.heads * (rep.d_qk_prefill + rep.d_v_prefill) * pairs)
    att = batch.decode_context + 1.0
    att_win = jnp.where(rep.window > 0, jnp.minimum(att, rep.window), att)
    keys = ((L - rep.sliding_layers) * att + rep.sliding_layers * att_win) * dm
    attn_d = jnp.sum(2.0 * rep.heads * (rep.d_qk_decode + rep.d_v_decode) * keys)
    kv_read_decode = jnp.sum(keys * rep.kv_bytes_token_layer)
    moe_flops = rep.moe_layers * 2.0 * T * rep.top_k * rep.expert_mats * rep.hidden * rep.expert_inter / rep.ep
    lm = 2.0 * n_sample * rep.hidden * rep.vocab_local * rep.has_lm_head
    return {"gemm_flops": gemm_flops, "gemm_weight_bytes": gemm_weight_bytes, "attn_prefill_flops": attn_p,
            "attn_decode_flops": attn_d, "kv_read_decode_bytes": kv_read_decode, "moe_flops": moe_flops,
            "lm_head_flops": lm}
