"""One scan step of the engine: route the next arrivals, or advance the client whose next event
comes first by one iteration (or, for a decode-only batch, by a stretch of iterations that ends
exactly where the per-iteration engine would see its next event).

Work per step is proportional to the batch slots, the admission window and the stretch length,
never to the whole workload: requests enter through a cursor over arrival-sorted arrays, waiting
requests sit in per-client ring-buffer queues, and outputs are written at the affected rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..cost.iteration import (MixedBatch, breakdown, decode_dense_time, decode_row_terms, decode_times_from_aggregates,
                              dense_combine, dense_sample_pieces, dense_token_pieces, iteration_time,
                              prefill_attention, stretch_aggregates, sum_rows)
from .state import EMPTY_SLOT, INF, SLOT_FIELDS, EngineState
from .tables import (ClientTable, EngineDims, Kind, Policy, Reject, Role, Router, Topology, Workload,
                     policy_admits_in_parts)

I32 = jnp.int32
F64 = jnp.float64


def _fdivmod(a, b):
    """(a // b, a % b) (floor division) of any int32 a and 1 <= b < 2**30, exactly: a float64
    quotient corrected by one step in (wrapping) int32 arithmetic. XLA CPU divides float64 through
    a reciprocal (237 / 237 is 1 - 2**-53), so the floor can be one off at exact multiples; the
    remainder check fixes that. On CPU these are vector instructions, where int32 division by a
    per-config divisor (block size, pool size) is a scalar loop."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    q = jnp.floor(a.astype(F64) / b.astype(F64)).astype(I32)
    r = a - q * b
    q = q - (r < 0) + (r >= b)
    return q, a - q * b


def _cdiv(a, b):
    """ceil(a / b) of int32 a and b >= 1, exactly (see `_fdivmod`)."""
    q, r = _fdivmod(a, b)
    return q + (r > 0)


def _excl_cumsum(x):
    return jnp.cumsum(x) - x


def _prefix_count(x):
    """(x[0] & ... & x[i] for every i, its number of True entries) for a 1-D x: a cumulative product
    of booleans as a compare against the first False, whose position is also the count. One
    reduction instead of a scan and a sum (each several kernels on XLA CPU)."""
    i = jnp.arange(x.shape[-1], dtype=I32)
    n = jnp.min(jnp.where(x, x.shape[-1], i), axis=-1)
    return i < n, n


def _slot_sums(*xs):
    """Integer sums over the slot axis (bools as 0/1), exactly, through the cost model's one-kernel
    row sums (float64 holds these counts exactly)."""
    tot = sum_rows(*[jnp.asarray(x).astype(F64) for x in xs])
    return tuple(t.astype(I32) for t in tot)


def _rank_among_equal(key, mask):
    """For every item: how many earlier items (lower index) have the same key, counting masked items
    only (an [M, M] compare: cheaper than a one-hot cumulative sum for the window sizes used)."""
    i = jnp.arange(key.shape[0])
    same = (key[None, :] == key[:, None]) & mask[None, :] & (i[None, :] < i[:, None])
    return jnp.sum(same, axis=1, dtype=I32)


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: a cheap, well-mixed integer hash."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _iteration_normals(key, client, iteration):
    """Standard normals indexed by (seed, client, absolute iteration number), so that a client's
    k-th iteration draws the same noise whether it runs alone or inside a stretch. A counter-based
    hash with Box-Muller: a few integer ops per draw instead of a PRNG split per iteration."""
    kd = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
    seed = _fmix32(kd[0] ^ _fmix32(kd[-1] + jnp.uint32(0x9E3779B9)))
    x = seed ^ _fmix32(jnp.asarray(client).astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(1))
    it = jnp.asarray(iteration).astype(jnp.uint32)
    h1 = _fmix32(x ^ _fmix32(it * jnp.uint32(2) + jnp.uint32(0x632BE5AB)))
    h2 = _fmix32(x ^ _fmix32(it * jnp.uint32(2) + jnp.uint32(0x2545F491)))
    u1 = (h1.astype(F64) + 1.0) / 4294967297.0  # in (0, 1)
    u2 = h2.astype(F64) / 4294967296.0
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)


def _quantise_ns(dt):
    """Round a duration to whole nanoseconds (exact sums in any order); straight-through gradient."""
    q = jnp.round(dt * 1e9) / 1e9
    return dt + jax.lax.stop_gradient(q - dt)


def client_event_times(dims: EngineDims, cl: ClientTable, st: EngineState, all_arrived):
    """When each client next acts: now if it has a running batch, else when its queue lets it start."""
    C, Q = dims.num_clients, dims.queue
    rows = jnp.arange(C)
    active = st.slots[:, 0, 0] >= 0  # slots are compacted: a client runs something iff slot 0 is used
    qlen = st.q_tail - st.q_head
    head_ready = st.q_ready[rows, st.q_head % Q]
    full = jnp.minimum(cl.max_num_seqs, dims.slots)
    kth = st.q_head + jnp.clip(jnp.minimum(full, qlen) - 1, 0, None)
    kth_ready = st.q_ready[rows, kth % Q]
    static_ready = jnp.where((qlen >= full) | all_arrived, kth_ready, INF)
    start = jnp.where(cl.policy == Policy.STATIC, static_ready, head_ready)
    t = jnp.where(active, st.t_free, jnp.where(qlen > 0, jnp.maximum(st.t_free, start), INF))
    return jnp.where(cl.enabled, t, INF)


# ----------------------------------------------------------------------------------------- routing
def _stage_shape(cl: ClientTable, topo: Topology, wl: Workload, rid, stage, client):
    """Prompt and output tokens of request `rid` at `stage` when served by `client`."""
    pipe = wl.pipeline[rid]
    prompt = wl.input_tokens[rid] + topo.stage_extra_prompt[pipe, stage]
    role = cl.role[client]
    target = jnp.where(cl.kind[client] == Kind.SERVER, 0,
                       jnp.where(role == Role.PREFILL_ONLY, 1, wl.output_tokens[rid]))
    return prompt.astype(I32), target.astype(I32)


def route_and_push(dims: EngineDims, cl: ClientTable, topo: Topology, wl: Workload, st: EngineState,
                   rid, stage, t_ready, kv_bytes, from_client, mask) -> EngineState:
    """Send items (request, stage) to a client of the stage's pool and append them to its queue.

    Items are vectors of length M; `from_client` < 0 means a fresh arrival (no link to cross).
    Requests that can never be served there are rejected with a reason.
    """
    C, Q = dims.num_clients, dims.queue
    rid_s = jnp.clip(rid, 0, dims.num_requests - 1)
    pipe = wl.pipeline[rid_s]
    pool = topo.pipeline_pools[pipe, jnp.clip(stage, 0, dims.stages - 1)]
    has_pool = (pool >= 0) & (stage < dims.stages)
    pool_s = jnp.clip(pool, 0, dims.pools - 1)
    # per pool: each member's position among the members (index order) and among them by outstanding
    # tokens (ties by index), as [P, C, C] compares (no sorting)
    pm = topo.pool_members & cl.enabled[None, :]  # [P, C]
    ci = jnp.arange(C)
    earlier = ci[None, :] < ci[:, None]  # [c, c']: c' comes before c
    pos_in_pool = jnp.sum(pm[:, None, :] & earlier[None], axis=2)  # [P, C]
    load = st.outstanding
    lighter = (load[None, :] < load[:, None]) | ((load[None, :] == load[:, None]) & earlier)  # [c, c']
    rank_in_pool = jnp.sum(pm[:, None, :] & lighter[None], axis=2)  # [P, C]
    members = pm[pool_s]  # [M, C]
    n_mem = members.sum(axis=1)
    live = mask & has_pool & (n_mem > 0)
    # rank of each item among the items going to the same pool in this step
    rank = _rank_among_equal(pool_s, live)
    router = topo.router[pool_s]
    nm = jnp.maximum(n_mem, 1)
    k_rr = _fdivmod(st.rr[pool_s] + rank, nm)[1]
    k_pfx = jnp.where(wl.prefix_key[rid_s] >= 0, _fdivmod(wl.prefix_key[rid_s], nm)[1], k_rr)
    k = jnp.where(router == Router.PREFIX_AFFINITY, k_pfx, k_rr)
    by_index = jnp.argmax(members & (pos_in_pool[pool_s] == k[:, None]), axis=1)
    by_load = jnp.argmax(members & (rank_in_pool[pool_s] == _fdivmod(rank, nm)[1][:, None]), axis=1)
    client = jnp.where(router == Router.LEAST_OUTSTANDING, by_load, by_index).astype(I32)
    uses_rr = (router == Router.ROUND_ROBIN) | ((router == Router.PREFIX_AFFINITY) & (wl.prefix_key[rid_s] < 0))
    rr = st.rr.at[pool_s].add(jnp.where(live & uses_rr, 1, 0).astype(I32))

    # feasibility on the chosen client
    prompt, target = _stage_shape(cl, topo, wl, rid_s, stage, client)
    bs = cl.block_size[client]
    is_llm = cl.kind[client] == Kind.LLM
    cached = jnp.minimum(wl.cached_tokens[rid_s], jnp.maximum(prompt - 1, 0))
    kv_bad = is_llm & (_cdiv(prompt + target, bs) > cl.kv_blocks[client])
    ctx_bad = is_llm & (prompt + target > cl.max_model_len[client])
    tok_bad = is_llm & (cl.policy[client] != Policy.CHUNKED) & (cl.role[client] != Role.DECODE_ONLY) & \
        (prompt - cached > cl.max_batched_tokens[client])
    reason = jnp.where(~has_pool | (n_mem == 0), Reject.NO_CLIENT,
                       jnp.where(ctx_bad, Reject.CONTEXT_LENGTH, jnp.where(kv_bad, Reject.KV_CAPACITY,
                                 jnp.where(tok_bad, Reject.BATCH_TOKENS, Reject.NONE))))
    ok0 = mask & (reason == Reject.NONE)
    crank = _rank_among_equal(client, ok0)
    pos = st.q_tail[client] + crank
    full = pos - st.q_head[client] >= Q
    reason = jnp.where(ok0 & full, Reject.QUEUE_FULL, reason).astype(I32)
    ok = ok0 & ~full
    rejected = mask & (reason != Reject.NONE)

    # link crossing (transfer of the KV cache, or just the latency of a message)
    fc = jnp.clip(from_client, 0, C - 1)
    if topo.stage_kv_layers is not None:  # layer-by-layer transfer: only the last layer's share is exposed
        kv_bytes = kv_bytes / topo.stage_kv_layers[pipe, jnp.clip(stage, 0, dims.stages - 1)]
    hop = jnp.where(from_client >= 0,
                    topo.link_latency[fc, client] + kv_bytes / topo.link_bandwidth[fc, client], 0.0)
    ready = t_ready + hop
    slot = jnp.where(ok, pos % Q, Q)  # out-of-range index: dropped by mode="drop"
    cidx = jnp.where(ok, client, C)
    q_item = st.q_item.at[cidx, slot].set((rid * dims.stages + stage).astype(I32), mode="drop")
    q_ready = st.q_ready.at[cidx, slot].set(ready, mode="drop")
    q_tail = st.q_tail.at[cidx].add(1, mode="drop")
    outstanding = st.outstanding.at[cidx].add((prompt + target).astype(F64), mode="drop")
    ridx = jnp.where(rejected, rid_s, dims.num_requests)
    return eqx_replace(st, q_item=q_item, q_ready=q_ready, q_tail=q_tail, outstanding=outstanding,
                       rr=rr,
                       o_reject=st.o_reject.at[ridx].set(reason, mode="drop"),
                       completed=st.completed + rejected.sum().astype(I32))


def _multi_stage(dims: EngineDims, topo: Topology):
    """Whether some pipeline has a second stage (decided by the pipelines' data, not by the stage
    capacity, so padding never changes results)."""
    return (topo.pipeline_pools[:, 1:] >= 0).any() if dims.stages > 1 else jnp.asarray(False)


def eqx_replace(st: EngineState, **kw) -> EngineState:
    import dataclasses

    return dataclasses.replace(st, **kw)


# ---------------------------------------------------------------------------------------- arrivals
def arrival_step(dims: EngineDims, cl: ClientTable, topo: Topology, wl: Workload, n_valid, st: EngineState,
                 t_limit, enabled=True) -> EngineState:
    """Route the arrivals due no later than the next client event (at least one)."""
    A = dims.window
    idx = st.cursor + jnp.arange(A, dtype=I32)
    idx_s = jnp.clip(idx, 0, dims.num_requests - 1)
    t_first = wl.arrival[jnp.clip(st.cursor, 0, dims.num_requests - 1)]
    # with multi-stage pipelines only arrivals at the first one's time: an arrival queued before its
    # time would block, in its FIFO queue, hand-offs that become ready earlier (head of line)
    multi = _multi_stage(dims, topo)
    t_lim = jnp.where(multi, t_first, jnp.maximum(t_limit, t_first))
    due = (idx < n_valid) & (wl.arrival[idx_s] <= t_lim)
    due, n_due = _prefix_count(due)
    due = due & enabled
    st = route_and_push(dims, cl, topo, wl, st, idx, jnp.zeros(A, I32), wl.arrival[idx_s], jnp.zeros(A, F64),
                        jnp.full(A, -1, I32), due)
    return eqx_replace(st, cursor=st.cursor + jnp.where(enabled, n_due, 0))


# ------------------------------------------------------------------------------------ client steps
def splits_admissions(dims: EngineDims, cl: ClientTable) -> bool:
    """Whether the compiled step splits a full window's admissions over steps (statically: not with
    swapping, whose swap-in time iteration 0 carries)."""
    return cl.swap_bandwidth is None and dims.window < dims.slots


def _gather_client(tree, c):
    return jax.tree.map(lambda x: x[c], tree)


def _to_f64(tree):
    return jax.tree.map(lambda x: x.astype(F64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def cost_tables(dims: EngineDims, cl: ClientTable):
    """Cost-model tables computed once per compiled chunk instead of in every step (float64): per
    client, the non-attention decode time for n = 0..S sequences [C, S + 1], and (when arrivals can
    be admitted inside a stretch, `dims.absorb`) the token pieces of the dense parts for 0..
    `dims.absorb_tokens` tokens [C, T + 1] and their sample pieces for 0..S + 1 samples [C, S + 2]."""
    n = jnp.arange(dims.slots + 1, dtype=F64)
    dec = jax.vmap(lambda p, r: decode_dense_time(_to_f64(p), _to_f64(r), n))(cl.params, cl.replica)
    if dims.absorb == 0 or dims.stretch == 1:
        return dec, None, None
    tt = jnp.arange(dims.absorb_tokens + 1, dtype=F64)
    ns = jnp.arange(dims.slots + 2, dtype=F64)
    tok = jax.vmap(lambda p, r: dense_token_pieces(_to_f64(p), _to_f64(r), tt))(cl.params, cl.replica)
    smp = jax.vmap(lambda p, r: dense_sample_pieces(_to_f64(p), _to_f64(r), ns))(cl.params, cl.replica)
    return dec, tok, smp


def client_step(dims: EngineDims, cl: ClientTable, topo: Topology, wl: Workload, st: EngineState, c,
                t, t_before, t_after, go=True, n_valid=None, tabs=None) -> EngineState:
    """Run client `c`'s next iteration (or decode stretch) starting at time `t`.

    A client's running requests occupy its first slots in admission order (the state keeps them
    compacted), so the most recent admissions (preemption victims) are the last running slots and
    chunk priority is slot order: no sorting. With `go` False the step changes nothing: every write
    is masked (no `lax.cond`, which under vmap would select between two copies of the whole state
    on every step)."""
    go = jnp.asarray(go)
    n_valid = wl.valid.sum() if n_valid is None else n_valid
    S, A, Q, W, K = dims.slots, min(dims.window, dims.slots), dims.queue, dims.stretch, dims.stages
    N = dims.num_requests
    pol, role, kind = cl.policy[c], cl.role[c], cl.kind[c]
    bs, cap = cl.block_size[c], cl.kv_blocks[c]
    is_llm = kind == Kind.LLM
    exclusive = pol != Policy.CHUNKED
    s_eff = jnp.minimum(cl.max_num_seqs[c], S)
    sidx = jnp.arange(S, dtype=I32)

    rid, stage, prompt, done, pf_target, prefill, gen, target, order = _unpack(st.slots[c])
    last_tok = st.s_last_tok[c]
    active = rid >= 0  # a prefix of the slots
    decoding = active & ~prefill & (gen < target)
    held = jnp.where(active, jnp.where(prefill, pf_target, prompt + gen), 0)
    blocks_held = _cdiv(held, bs)
    grown = jnp.where(decoding, _cdiv(prompt + gen + 1, bs), blocks_held)
    grown_act = jnp.where(active, grown, 0)
    run_chunk_cap = jnp.where(prefill, jnp.minimum(pf_target - done, cl.chunk_size[c]), 0)
    n_active, n_dec, need_blocks, run_chunk_tokens, blocks_held_sum = _slot_sums(
        active, decoding, grown_act, run_chunk_cap, blocks_held)

    # ---- queue window
    qlen = st.q_tail[c] - st.q_head[c]
    w = jnp.arange(A, dtype=I32)
    qpos = (st.q_head[c] + w) % Q
    w_item, w_ready = _materialise(st.q_item[c, qpos], st.q_ready[c, qpos])  # read the queues once
    w_rid, w_stage = w_item // K, w_item % K
    inq = w < qlen
    rdy, n_ready = _prefix_count(inq & (w_ready <= t))
    w_rid_s = jnp.clip(w_rid, 0, N - 1)
    w_prompt, w_target = _stage_shape(cl, topo, wl, w_rid_s, w_stage, c)
    gen0 = st.r_gen[w_rid_s]
    pre0 = st.r_preempted[w_rid_s]
    direct = (role == Role.DECODE_ONLY) & ~pre0 & (gen0 > 0)  # KV arrived over the link
    w_cached = jnp.where(gen0 == 0, jnp.minimum(wl.cached_tokens[w_rid_s], jnp.maximum(w_prompt - 1, 0)), 0)
    w_done = jnp.where(direct, w_prompt, w_cached)
    # swap mode: a preempted request's KV comes back from host memory instead of being recomputed
    swap = cl.swap_bandwidth is not None
    w_swapped = jnp.where(inq, st.r_swapped[w_rid_s], 0) if swap else jnp.zeros(A, I32)
    w_done = jnp.where(w_swapped > 0, w_swapped, w_done)
    w_pf_target = w_prompt + gen0
    w_need = jnp.where(direct, 0, w_pf_target - w_done)
    w_blocks = jnp.where(is_llm, _cdiv(jnp.where(direct, w_prompt + gen0, w_pf_target), bs), 0)

    # ---- admission (tested before preemption: exclusive policies grow decodes only when they do not admit)
    free_slots = s_eff - n_active
    gate = jnp.where(pol == Policy.CHUNKED, True,
                     jnp.where(pol == Policy.CONTINUOUS, True, n_active == 0))
    gate = gate & jnp.where(pol == Policy.STATIC, (n_ready >= s_eff) | (st.cursor >= n_valid), True)
    # token budget left for new prefills
    run_prefill_tokens = jnp.where(exclusive, 0, run_chunk_tokens)
    budget = cl.max_batched_tokens[c] - jnp.where(exclusive, 0, n_dec) - run_prefill_tokens
    capped = jnp.where(exclusive, w_need, jnp.minimum(w_need, cl.chunk_size[c]))
    before = _excl_cumsum(capped)
    w_chunk = jnp.where(exclusive, w_need, jnp.clip(budget - before, 0, capped))
    # an exclusive batch may exceed M only as a batch of one on an idle client: a recomputation after
    # preemption (prompt + generated tokens) can outgrow M, and waiting would never let it in
    tok_ok = jnp.where(exclusive, (before + w_need <= budget) | ((w == 0) & (n_active == 0)),
                       (w_chunk > 0) | (w_need == 0))
    tok_ok = tok_ok | ~is_llm
    free_blocks = cap - jnp.where(exclusive, blocks_held_sum, need_blocks)
    kv_ok = (jnp.cumsum(w_blocks) <= free_blocks) | ~is_llm
    slot_ok = w < free_slots
    preempt_chunked = (~exclusive) & (need_blocks > cap)
    admit, n_admit = _prefix_count(rdy & tok_ok & kv_ok & slot_ok)
    admit_on = gate & ~preempt_chunked & go
    admit = admit & admit_on
    n_admit = jnp.where(admit_on, n_admit, 0)
    # an exclusive policy that admits runs a prefill-only iteration; otherwise it decodes
    prefill_iter = exclusive & (n_admit > 0)
    preempting = is_llm & jnp.where(exclusive, ~prefill_iter & (need_blocks > cap), preempt_chunked) & go
    # the window is full and the entry behind it is ready too: admit only, and run iteration 0 in the
    # next step (at the same time), which admits from the entries behind the window into the same
    # iteration, so that a window smaller than a burst of admissions never caps it (see
    # tables.policy_admits_in_parts and DEFAULT_WINDOW_IN_PARTS)
    run = go
    if splits_admissions(dims, cl):
        nxt_ready = (qlen > A) & (st.q_ready[c, (st.q_head[c] + A) % Q] <= t)
        run = go & ~(policy_admits_in_parts(pol, role, is_llm) & (n_admit >= A) & nxt_ready)

    # ---- preemption (recompute): the most recent admissions (the last running slots) until the grown
    # batch fits; slot i is a victim while the blocks of the slots after it do not cover the excess
    later = need_blocks - jnp.cumsum(grown_act)
    victim = active & (later < need_blocks - cap) & preempting
    n_vict = victim.sum().astype(I32)
    n_keep = n_active - n_vict
    # victims go back to the queue front in admission order (their slot order)
    new_head = st.q_head[c] - n_vict
    vslot = jnp.where(victim, (new_head + sidx - n_keep) % Q, Q)  # out of range: dropped
    q_item = st.q_item.at[c, vslot].set(rid * K + stage, mode="drop")
    q_ready = st.q_ready.at[c, vslot].set(jnp.full(S, t, F64), mode="drop")
    vr = jnp.where(victim, rid, N)
    r_gen = st.r_gen.at[vr].set(gen, mode="drop")
    r_preempted = st.r_preempted.at[vr].set(True, mode="drop")
    o_preemptions = st.o_preemptions.at[vr].add(1, mode="drop")
    r_swapped = st.r_swapped
    swap_tokens = jnp.int32(0)
    if swap:  # victims' KV (what is in the cache) moves to host memory over the host link
        swapping = cl.swap_bandwidth[c] > 0
        kv_tokens = jnp.where(prefill, done, prompt + gen)
        r_swapped = r_swapped.at[vr].set(jnp.where(swapping, kv_tokens, 0), mode="drop")
        swap_tokens = jnp.where(swapping, jnp.where(victim, kv_tokens, 0).sum(), 0)

    # ---- admit behind the kept slots (never in the same iteration as a preemption)
    rows = _pack(w_rid, w_stage, w_prompt, w_done, w_pf_target, ~direct & (w_need > 0), gen0, w_target, st.order + w)
    kept = _pack(jnp.where(victim, -1, rid), stage, prompt, done, pf_target, prefill, gen, target, order)
    tgt = jnp.where(admit, n_keep + w, S)
    rid, stage, prompt, done, pf_target, prefill, gen, target, order = _unpack(
        kept.at[tgt].set(rows, mode="drop"))
    new_slot = (sidx >= n_keep) & (sidx < n_keep + n_admit)
    last_tok = jnp.where(new_slot, t, last_tok)
    q_head = st.q_head.at[c].set(new_head + n_admit)
    ar = jnp.where(admit, w_rid_s, N)
    r_preempted = r_preempted.at[ar].set(False, mode="drop")
    if swap:  # swapped-in KV moves back from host memory before this iteration runs
        swap_tokens = swap_tokens + jnp.where(admit, w_swapped, 0).sum()
        r_swapped = r_swapped.at[ar].set(0, mode="drop")
    active = rid >= 0

    # ---- iteration 0's work per slot
    decoding = active & ~prefill & (gen < target)
    dec_now = decoding & ~prefill_iter & run
    rem = jnp.where(prefill & active, pf_target - done, 0)
    cap_rem = jnp.where(exclusive, rem, jnp.minimum(rem, cl.chunk_size[c]))
    # chunked: prefill chunks in admission (= slot) order under the budget left by the decodes
    budget_all = cl.max_batched_tokens[c] - jnp.where(exclusive, 0, dec_now.sum())
    chunk = jnp.where(exclusive, cap_rem, jnp.clip(budget_all - _excl_cumsum(cap_rem), 0, cap_rem))
    # exclusive policies prefill only what they just admitted (whole prompts); others keep going
    chunk = jnp.where(exclusive & ~new_slot, 0, chunk)
    chunk = jnp.where(is_llm, chunk, jnp.where(active, prompt, 0))
    chunk = jnp.where(run, chunk, 0)
    n_chunk, n_items = _slot_sums(chunk, active & new_slot)
    decode_only = (n_chunk == 0) & is_llm & (n_admit == 0) & ~preempting

    # ---- apply iteration 0 (its end time is filled in below)
    gen = gen + dec_now.astype(I32)
    done = done + chunk
    pf_done = prefill & active & (chunk > 0) & ((done >= pf_target) | ~is_llm)  # a SERVER batch finishes whole
    makes_token = pf_done & (target > 0)
    gen = gen + makes_token.astype(I32)
    prefill = prefill & ~pf_done
    # rows that decode in the iterations after iteration 0: `end` of them, the last one ending the stage
    dec1 = active & ~prefill & (gen < target) & is_llm & run
    end = jnp.where(active & ~prefill, jnp.maximum(target - gen, 0), 0)

    # ---- iteration times: iteration 0 (any batch), then up to W - 1 iterations of the rows left
    # decoding (plus, see `_absorb`, arrivals admitted in the stretch). Row i decodes in iteration j
    # for first_i <= j <= end_i with context u_i + j.
    # The cost model runs in float64 here: float32 durations carry ~1 ns of rounding noise that
    # differs between the stretched and the per-iteration programs (and so flips the ns rounding).
    replica = _to_f64(_gather_client(cl.replica, c))
    params = _to_f64(_gather_client(cl.params, c))
    ctx0 = (prompt + gen - 1 - dec_now).astype(F64)  # context of iteration 0's decodes
    js = jnp.arange(W, dtype=I32)
    b0 = MixedBatch(prefill_tokens=chunk.astype(F64), prefill_context=(done - chunk).astype(F64),
                    prefill_last=pf_done, prefill_mask=chunk > 0, decode_context=ctx0, decode_mask=dec_now)
    dt_general = iteration_time(params, replica, b0)
    u = (prompt + gen - 2).astype(F64)
    first = jnp.where(dec_now, 0, jnp.where(dec1, 1, W))
    last = jnp.where(dec_now | dec1, end, -1)
    # materialised rows: the stretch's per-row kernels (breakpoints, scatters) then read them instead
    # of each recomputing the slot logic they derive from
    u_p, first_p, last_p = _materialise(u, first, last)
    agg = stretch_aggregates(params, replica, u_p, first_p.astype(F64), last_p.astype(F64), W)
    dt_server = cl.serve_base[c] + cl.serve_per_item[c] * n_items + cl.serve_per_token[c] * n_chunk
    sigma = params.step_noise_sigma
    z = _iteration_normals(st.key, c, st.iters[c] + js)
    noise = jnp.where(sigma > 0, jnp.exp(sigma * z - 0.5 * sigma * sigma), 1.0)
    swap_s = 0.0
    if swap:  # swaps happen only in iterations that preempt or admit: iteration 0
        swap_s = swap_tokens.astype(F64) * cl.kv_bytes_per_token[c] / jnp.maximum(cl.swap_bandwidth[c], 1e-30)
        swap_s = jnp.where((js == 0) & (swap_tokens > 0), swap_s, 0.0)
    dec_tab = None if tabs is None else tabs[0][c]

    def times(agg, pf_cost, pf_at):
        """Iteration durations (rounded to ns, with step noise) and decode attention, per iteration."""
        dt_dec, attn = decode_times_from_aggregates(params, replica, agg, dec_tab)
        dts_llm = jnp.where(pf_at, pf_cost, jnp.where(decode_only | (js > 0), dt_dec, dt_general))
        dts = jnp.where(is_llm, dts_llm, dt_server).astype(F64) * noise + swap_s
        dts = _quantise_ns(dts)
        return dts, t + _excl_cumsum(dts), attn

    no_pf = jnp.zeros(W, bool)
    dts, starts, attn = times(agg, jnp.zeros(W, F64), no_pf)

    # ---- how many iterations to advance. Iteration j >= 1 runs exactly as the per-iteration engine
    # would run it next: nothing can be admitted, nothing preempted, no other event comes first.
    # Admission could follow a completion only when ready entries wait (continuous and chunked
    # policies; static and decode-priority admit into an empty batch only), so a completion then ends
    # the stretch; so does one that hands a request on to a next stage.
    qrem = qlen - n_admit
    nxt_head = jnp.minimum(n_admit, A - 1)
    blocked = (qrem > 0) & ((n_admit >= A) | rdy[nxt_head])
    admit_after_free = blocked & ((pol == Policy.CHUNKED) | (pol == Policy.CONTINUOUS))
    pipe = wl.pipeline[jnp.clip(rid, 0, N - 1)]
    if K > 1:
        has_next = (stage + 1 < K) & (topo.pipeline_pools[pipe, jnp.clip(stage + 1, 0, K - 1)] >= 0)
    else:
        has_next = jnp.zeros(S, bool)
    ends_stage = active & ~prefill
    stop = ends_stage & (admit_after_free | has_next)
    j_stop = jnp.where(stop, end, W).min()
    # KV blocks of iteration j >= 1, bounded above by keeping every row that decodes after iteration 0
    # (ends free blocks, never add them): sum of ceil((y + 1 + j)/bs) with y = u + 1, from the residues
    # y mod bs: ceil((y + 1 + j)/bs) = y // bs + 1 + j // bs + [y mod bs >= bs - j mod bs]; with
    # v = bs - (y mod bs) in 1..bs, [.] <=> v <= j mod bs: a histogram of v (capped at W, since
    # j mod bs < W) and its prefix sums give the count for every j in O(S + W)
    y = prompt + gen - 1
    y_div, y_mod = _fdivmod(y, bs)
    v = jnp.where(dec1, jnp.minimum(bs - y_mod, W), W + 1)
    below = jnp.cumsum(jnp.zeros(W + 2, I32).at[v].add(1))  # below[m] = #{v <= m}
    base_blocks, n_dec1, n_pf_left = _slot_sums(jnp.where(dec1, y_div + 1, 0), dec1, prefill & active)
    j_div, j_mod = _fdivmod(js, bs)
    blocks_j = base_blocks + n_dec1 * j_div + below[j_mod]
    pending = jnp.where(inq & ~rdy & (w_ready > t), w_ready, INF).min()
    cont = is_llm & ~preempting & (n_pf_left == 0) & (decode_only | ~blocked)

    # A lone client (the only enabled one; no pipeline with a second stage) is bounded by arrivals
    # alone, and an arrival that cannot be admitted before the stretch ends anyway need not end it:
    # behind a blocked queue (which ends the stretch at its first completion) or while a static or
    # decode-priority batch runs (which admit into an empty batch only, and an empty batch ends the
    # stretch). The next step routes it, into the same queue place with the same ready time.
    lone = (cl.enabled.sum() == 1) & ~_multi_stage(dims, topo)
    waits = admit_after_free | (pol == Policy.STATIC) | (pol == Policy.DECODE_PRIORITY)
    t_before = jnp.where(lone & waits, INF, t_before)
    R = dims.absorb if (W > 1 and tabs is not None and tabs[1] is not None) else 0
    j_cut = W
    if R > 0:
        # a lone chunked client admits waiting entries and arrivals inside the stretch (see _absorb):
        # they, not completions or arrivals, then bound it
        can = run & lone & is_llm & ~preempting & (n_pf_left == 0) & (pol == Policy.CHUNKED)
        window = (w_rid_s, w_ready, w_prompt, w_target, w_done, w_pf_target, gen0, w_swapped, qrem, n_admit)
        ab = _absorb(dims, cl, topo, wl, st, c, n_valid, params, replica, tabs, agg, dts, starts, attn, blocks_j,
                     times, can=can, s_eff=s_eff, window=window,
                     rows_old=(jnp.where(dec1, y + 1, 0).astype(F64), jnp.where(dec1, end, -1)))
        agg, dts, starts, blocks_j = ab["agg"], ab["dts"], ab["starts"], ab["blocks"]
        pf_at, j_cut = ab["pf_at"], jnp.where(can, ab["j_cut"], W)
        t_before = jnp.where(can, INF, t_before)
        cont = cont | can
        j_stop = jnp.where(can, W, j_stop)
        # queue entries that become ready inside the stretch are candidates too (in queue order: one
        # that is not admitted cuts the stretch, and FIFO admission keeps the later ones behind it)
        pending = jnp.where(can, INF, pending)
    else:
        pf_at = no_pf
    n_dec_j = agg[0]
    ok = (cont & (js <= j_stop) & (js < j_cut) & ((n_dec_j > 0) | pf_at) & ((blocks_j <= cap) | ~is_llm)
          & (starts < t_before) & (starts <= t_after) & (starts < pending))
    ok = ok.at[0].set(True)
    k = _prefix_count(ok)[1]
    k = jnp.where(run, k, 0)
    ends = t + jnp.cumsum(jnp.where(js < k, dts, 0.0))  # end time of iteration j (< k)
    t_end = ends[jnp.maximum(k - 1, 0)]

    # ---- inter-token latencies: iteration 0's decodes, then n_dec_j gaps of dts[j] per later iteration
    first_gap = jnp.where(dec_now, ends[0] - last_tok, 0.0)
    hist = st.itl_hist.at[_itl_bin(first_gap, dims.itl_bins)].add(dec_now.astype(F64))
    later_it = (js >= 1) & (js < k)
    n_later = jnp.where(later_it, n_dec_j, 0.0)
    hist = hist.at[_itl_bin(dts, dims.itl_bins)].add(n_later)
    itl_sum = st.itl_sum + jnp.sum(jnp.concatenate([first_gap, dts * n_later]))

    # ---- apply the later iterations: each row's last token (and stage end) is at the end of the
    # last iteration it ran in
    j_last = jnp.where(dec1, jnp.minimum(end, k - 1), 0)
    gen = gen + jnp.where(dec1, j_last, 0)
    t_row = ends[jnp.clip(j_last, 0, W - 1)]
    last_tok = jnp.where(dec_now | makes_token | (dec1 & (k >= 2)), t_row, last_tok)
    emits = topo.stage_emits[pipe, stage]
    ft_idx = jnp.where(makes_token & emits, rid, N)
    ft_time = jnp.full(S, ends[0], F64)
    finished = ends_stage & (gen >= target) & run
    # admissions of this step (iteration 0's, then those inside the stretch): stage starts
    adm_idx, adm_stage, adm_time = ar, w_stage, jnp.full(A, t, F64)
    n_abs = 0
    rows_all = _pack(rid, stage, prompt, done, pf_target, prefill, gen, target, order)
    keep = active & ~finished
    if R > 0:
        # candidates admitted at iteration jr < k: one token at the end of jr (the prefill's), then one
        # per later iteration up to their target; those that reach it end there
        jr, P, Tt, g0, pft, fq = ab["j"], ab["prompt"], ab["target"], ab["gen0"], ab["pf_target"], ab["from_queue"]
        taken = ab["absorbed"] & (jr < k)
        n_abs = taken.sum().astype(I32)
        a_rid = jnp.where(taken, ab["rid"], N)
        a_gen = jnp.minimum(Tt - g0, k - jr)  # tokens made in the stretch
        a_last = ends[jnp.clip(jr + a_gen - 1, 0, W - 1)]
        a_fin = taken & (g0 + a_gen >= Tt)
        adm_idx = jnp.concatenate([adm_idx, a_rid])
        adm_stage = jnp.concatenate([adm_stage, jnp.zeros(R, I32)])
        adm_time = jnp.concatenate([adm_time, starts[jnp.clip(jr, 0, W - 1)]])
        ft_idx = jnp.concatenate([ft_idx, jnp.where(ab["emits"], a_rid, N)])
        ft_time = jnp.concatenate([ft_time, ends[jnp.clip(jr, 0, W - 1)]])
        rid_f = jnp.concatenate([jnp.where(finished, rid, N), jnp.where(a_fin, a_rid, N)])
        stage_f = jnp.concatenate([stage, jnp.zeros(R, I32)])
        t_row_f = jnp.concatenate([t_row, a_last])
        a_order = st.order + n_admit + jnp.arange(R, dtype=I32)
        zr = jnp.zeros(R, I32)
        rows_all = jnp.concatenate([rows_all, _pack(a_rid, zr, P, pft, pft, zr, g0 + a_gen, Tt, a_order)])
        keep = jnp.concatenate([keep, taken & ~a_fin])
        last_all = jnp.concatenate([last_tok, a_last])
        # arrivals routed here (outstanding += prompt + target); those that finished gone again
        abs_tokens, abs_done, n_abs_q = _slot_sums(jnp.where(taken & ~fq, P + Tt, 0) - jnp.where(a_fin, P + Tt, 0),
                                                   a_fin, taken & fq)
        q_head = q_head.at[c].add(n_abs_q)
        r_preempted = r_preempted.at[jnp.where(taken & fq, a_rid, N)].set(False, mode="drop")
    else:
        rid_f, stage_f, t_row_f, last_all = jnp.where(finished, rid, N), stage, t_row, last_tok
        abs_tokens = abs_done = n_abs_q = 0
    o_first_token = st.o_first_token.at[ft_idx].min(ft_time, mode="drop")
    o_stage_end = st.o_stage_end.at[rid_f, stage_f].set(t_row_f, mode="drop")
    o_stage_start = st.o_stage_start.at[adm_idx, adm_stage].min(adm_time, mode="drop")
    o_stage_client = st.o_stage_client.at[adm_idx, adm_stage].set(c, mode="drop")

    # tokens leaving the client (least-outstanding routing) and requests completing (no next stage)
    fin_tokens, n_completes = _slot_sums(jnp.where(finished, prompt + target, 0), finished & ~has_next)

    # ---- compact: running slots first, in admission order (those admitted in the stretch last)
    dest = jnp.where(keep, jnp.cumsum(keep) - 1, S)
    slots_c = jnp.broadcast_to(jnp.asarray(EMPTY_SLOT, I32), (S, rows_all.shape[-1])).at[dest].set(rows_all, mode="drop")
    last_c = jnp.zeros(S, F64).at[dest].set(last_all, mode="drop")

    st = eqx_replace(
        st,
        t_free=st.t_free.at[c].set(jnp.where(run, t_end, jnp.where(go, t, st.t_free[c]))), iters=st.iters.at[c].add(k),
        busy=st.busy.at[c].add(jnp.where(run, t_end - t, 0.0)),
        outstanding=st.outstanding.at[c].add((abs_tokens - fin_tokens).astype(F64)),
        slots=st.slots.at[c].set(slots_c), s_last_tok=st.s_last_tok.at[c].set(last_c),
        q_item=q_item, q_ready=q_ready, q_head=q_head,
        order=st.order + n_admit + n_abs, cursor=st.cursor + n_abs - n_abs_q,
        r_gen=r_gen, r_preempted=r_preempted, r_swapped=r_swapped,
        o_first_token=o_first_token, o_preemptions=o_preemptions, o_stage_start=o_stage_start,
        o_stage_end=o_stage_end, o_stage_client=o_stage_client,
        itl_hist=hist, itl_sum=itl_sum,
    )

    cr = jnp.where(finished, rid, N)
    if K > 1:  # hand finished stages on (statically absent when no pipeline has a second stage)
        nxt = stage + 1
        nxt_c = jnp.clip(nxt, 0, K - 1)
        has_next = finished & has_next
        xfer = topo.stage_kv_transfer[pipe, nxt_c]
        kv_bytes = jnp.where(xfer, (prompt + gen).astype(F64) * cl.kv_bytes_per_token[c], 0.0)
        hr = jnp.where(has_next, rid, N)
        st = eqx_replace(st, r_gen=st.r_gen.at[hr].set(jnp.where(xfer, gen, 0), mode="drop"),
                         r_preempted=st.r_preempted.at[hr].set(False, mode="drop"))
        st = route_and_push(dims, cl, topo, wl, st, rid, nxt, t_row, kv_bytes, jnp.full(S, c, I32), has_next)
        cr = jnp.where(finished & ~has_next, rid, N)
    if R > 0:
        cr = jnp.concatenate([cr, jnp.where(a_fin, a_rid, N)])
        t_row = jnp.concatenate([t_row, a_last])
    return eqx_replace(st, o_finish=st.o_finish.at[cr].set(t_row, mode="drop"),
                       completed=st.completed + n_completes + abs_done)


def _absorb(dims: EngineDims, cl: ClientTable, topo: Topology, wl: Workload, st: EngineState, c, n_valid, params,
            replica, tabs, agg, dts, starts, attn, blocks, times, can, s_eff, window, rows_old):
    """Admit waiting queue entries and then the next arrivals inside a decode stretch, exactly
    where the per-iteration engine admits them.

    When (`can`) client c is the only enabled client, no pipeline has a second stage, the policy is
    chunked prefill and iteration 0 left no prefill running, the candidates are the queue entries
    iteration 0 did not admit (in queue order), then the next arrivals. Candidate r (ready at a_r)
    may be admitted at iteration j >= 1 once it is there (s_j >= a_r; arrivals win ties), a slot is
    free and the token budget is not used up: that is its iteration j_r. It is admitted there, in one
    prefill chunk next to the running decodes, when j_r is after the previous candidate's iteration
    (one admission per iteration), its whole prompt fits the chunk size and the budget, its KV
    blocks fit next to the blocks the decoding rows hold at j_r (counted exactly), and it would not
    be rejected. The first candidate that cannot be so admitted ends the stretch before its j_r
    (`j_cut`; the next step admits it, or not, exactly), or, when only its KV blocks kept it out
    (it then waits for a completion), before the first iteration it could be considered in after
    the next completion; candidate `dims.absorb` bounds the stretch the same way.

    Candidates are taken one after another: each one's prefill iteration and later decodes change
    the iteration times and so where the next one lands. The mixed iteration is costed with the same
    pieces as `iteration_time` (GEMM-side parts read from tables over the token count), so a per-
    iteration run gives the same durations."""
    R, W, N = dims.absorb, dims.stretch, dims.num_requests
    js = jnp.arange(W, dtype=I32)
    jf = js.astype(F64)
    bs, cap = cl.block_size[c], cl.kv_blocks[c]
    M, H = cl.max_batched_tokens[c], cl.chunk_size[c]
    # ---- candidates 0..R (R: only bounds the stretch): queue entries after iteration 0's admissions
    # (from the admission window), then arrivals from the cursor
    w_rid, w_ready, w_prompt, w_target, w_done, w_pf_target, gen0, w_swapped, qrem, n_admit = window
    A = w_rid.shape[0]
    r = jnp.arange(R + 1, dtype=I32)
    from_q = r < qrem
    qpos = n_admit + r
    in_win = from_q & (qpos < A)
    qp = jnp.clip(qpos, 0, A - 1)
    idx = st.cursor + jnp.maximum(r - qrem, 0)
    rv = idx < n_valid
    rs = jnp.clip(idx, 0, N - 1)
    pipe = wl.pipeline[rs]
    pool = topo.pipeline_pools[pipe, 0]
    member = (pool >= 0) & topo.pool_members[jnp.clip(pool, 0, dims.pools - 1), c]
    P_a, T_a = _stage_shape(cl, topo, wl, rs, jnp.zeros(R + 1, I32), c)
    cached_a = jnp.minimum(wl.cached_tokens[rs], jnp.maximum(P_a - 1, 0))
    arrival_ok = rv & member & (P_a + T_a <= cl.max_model_len[c]) & (_cdiv(P_a + T_a, bs) <= cap)
    rid = jnp.where(from_q, w_rid[qp], idx)
    ready = jnp.where(from_q, jnp.where(in_win, w_ready[qp], -INF), jnp.where(rv, wl.arrival[rs], INF))
    prompt = jnp.where(from_q, w_prompt[qp], P_a)  # the stage's prompt (a slot's `prompt`)
    target = jnp.where(from_q, w_target[qp], T_a)
    g0 = jnp.where(from_q, gen0[qp], 0)  # tokens made before a preemption
    done0 = jnp.where(from_q, w_done[qp], cached_a)
    pf_t = jnp.where(from_q, w_pf_target[qp], P_a)  # KV tokens once prefilled
    need = pf_t - done0
    fits = (jnp.where(from_q, in_win & (w_swapped[qp] == 0), arrival_ok) & (target - g0 >= 1) & (need <= H)
            & (need >= 1) & (r < R))
    emits = topo.stage_emits[wl.pipeline[jnp.clip(rid, 0, N - 1)], 0]
    known = jnp.where(from_q, in_win, arrival_ok)  # an entry whose KV blocks are known (and that is queued)
    no_budget = (need <= 0) | (from_q & ~in_win)
    pf_blocks = _cdiv(pf_t, bs)
    TT = tabs[1]["gemm"].shape[-1] - 1
    one = jnp.ones((R + 1, 1), bool)
    t_pf = prefill_attention(params, replica, need[:, None].astype(F64), done0[:, None].astype(F64), one, one)[0]
    # the tables stay whole: one gather [c, index] per lookup (slicing client c's row first copies a
    # whole row per lane under vmap, ~6 x 8k float64 a step)
    tok_tab, smp_tab = tabs[1], tabs[2]

    def place(r, carry):
        """Where candidate r would be admitted (jr), whether it is (ok_r), and the stretch's end
        should it not be."""
        agg, dts, starts, attn, pf_cost, pf_at, blk_abs, comp, alive, j_prev, need_prev, j_cut, j_out, ok_out = carry
        n = agg[0]
        # where the per-iteration engine would first consider admitting it (slot free, budget left)
        same = (js == j_prev) & (j_prev > 0)
        n_i = n.astype(I32) + same
        # (an entry with nothing to prefill, e.g. swapped back in whole, needs no budget; one outside the
        # admission window is assumed to need none: an earlier j only ends the stretch earlier)
        maybe = ((js >= jnp.maximum(j_prev, 1)) & (starts >= ready[r]) & (n_i < s_eff)
                 & ((M - n.astype(I32) - same * need_prev > 0) | no_budget[r]))
        jr = _prefix_count(~maybe)[1]  # first such iteration (W: none)
        jc = jnp.clip(jr, 0, W - 1)
        nr = n[jc].astype(I32)
        T_tok = nr + need[r]
        # KV blocks at jr, exactly: the rows decoding then (old rows with their last iteration >= jr,
        # and rows admitted before) and this one's prompt
        held = sum_rows(jnp.where(old_end >= jr, jnp.ceil((old_y1 + jc) / bs), 0.0))[0].astype(I32)
        kv_ok = held + blk_abs[jc] + pf_blocks[r] <= cap
        ok_r = (alive & fits[r] & (jr < W) & (jr > j_prev) & (need[r] <= M - nr) & (T_tok <= TT) & kv_ok)
        # not admitted there: the stretch ends before jr (where the per-iteration engine admits it,
        # perhaps with a partial chunk), or, when its KV blocks do not fit at jr (it is not admitted
        # there, whatever else), before the first iteration it could be considered in after a
        # completion at or after jr (until a row ends, the blocks held only grow)
        after = _prefix_count(~(comp & (js >= jr)))[1]  # the first completion at or after jr
        jr2 = _prefix_count(~(maybe & (js > after)))[1]
        j_cut = jnp.where(alive & ~ok_r, jnp.where(known[r] & ~kv_ok & (jr < W), jr2, jr), j_cut)
        return jr, jc, nr, T_tok, ok_r, j_cut

    def admit_one(r, carry):
        agg, dts, starts, attn, pf_cost, pf_at, blk_abs, comp, alive, j_prev, need_prev, j_cut, j_out, ok_out = carry
        n, c_low, keys_mid, c_high, keys_high, longest = agg
        jr, jc, nr, T_tok, ok_r, j_cut = place(r, carry)
        # the mixed iteration: iteration_time's parts in its order of sums
        ti = jnp.clip(T_tok, 0, TT)
        ns = jnp.clip(nr + 1, 0, smp_tab["lm_head"].shape[-1] - 1)
        d = dense_combine(params, {k: v[c, ti] for k, v in tok_tab.items()}, {k: v[c, ns] for k, v in smp_tab.items()},
                          T_tok.astype(F64), (nr + 1).astype(F64), 1.0)  # one prompt chunk: this row's
        mixed = sum(breakdown(d, t_pf[r], attn[jc]).values())
        at = ok_r & (js == jr)
        pf_cost = jnp.where(at, mixed, pf_cost)
        pf_at = pf_at | at
        # its decodes: iterations jr + 1 .. jr + (target - g0) - 1, attending to pf_t + (j - jr) keys
        on = ok_r & (js > jr) & (js <= jr + target[r] - g0[r] - 1)
        att = (pf_t[r] - jr).astype(F64) + jf
        row = decode_row_terms(params, replica, att, on)  # this row's terms, per iteration
        agg = (n + row[0], c_low + row[1], keys_mid + row[2], c_high + row[3], keys_high + row[4],
               jnp.maximum(longest, row[5]))
        blk_abs = blk_abs + jnp.where(at, pf_blocks[r], 0) + jnp.where(on, _cdiv(pf_t[r] + js - jr + 1, bs), 0)
        comp = comp | (ok_r & (js == jr + target[r] - g0[r] - 1))
        j_out, ok_out = j_out.at[r].set(jr), ok_out.at[r].set(ok_r)
        dts, starts, attn = jax.lax.cond(ok_r, lambda: times(agg, pf_cost, pf_at), lambda: (dts, starts, attn))
        return (agg, dts, starts, attn, pf_cost, pf_at, blk_abs, comp, alive & ok_r, jnp.where(ok_r, jr, j_prev),
                jnp.where(ok_r, need[r], need_prev), j_cut, j_out, ok_out)

    # a loop, not unrolled (one compiled body keeps compile time down); passes after the first
    # candidate that cannot be admitted change nothing and are skipped (a fori_loop of conds rather
    # than a while_loop, which reverse-mode differentiation cannot run)
    old_y1, old_end = rows_old
    comp = jnp.zeros(W, bool).at[jnp.where(old_end >= 1, old_end, W).astype(I32)].set(True, mode="drop")
    carry = (agg, dts, starts, attn, jnp.zeros(W, F64), jnp.zeros(W, bool), jnp.zeros(W, I32), comp, can,
             jnp.int32(0), jnp.int32(0), jnp.int32(W), jnp.zeros(R, I32), jnp.zeros(R, bool))
    carry = jax.lax.fori_loop(0, R, lambda r, cr: jax.lax.cond(cr[8], admit_one, lambda r_, c_: c_, r, cr), carry)
    agg, dts, starts, attn, pf_cost, pf_at, blk_abs, comp, alive, j_prev, need_prev, j_cut, j_out, ok_out = carry
    # candidate R is never admitted here (it only bounds the stretch): its place alone, without the
    # costing passes of the others (under vmap a cond runs both branches)
    j_cut = place(R, carry)[5]
    return {"agg": agg, "dts": dts, "starts": starts, "blocks": blocks + blk_abs, "pf_at": pf_at, "can": can,
            "j_cut": j_cut, "j": j_out, "absorbed": ok_out, "rid": rid[:R], "prompt": prompt[:R],
            "pf_target": pf_t[:R], "target": target[:R], "gen0": g0[:R], "from_queue": from_q[:R],
            "emits": emits[:R]}


def _materialise(*xs):
    """The same arrays, computed once into their own buffers. XLA fuses cheap producers into each
    consumer kernel and recomputes them there: a [W, S] kernel would redo the whole slot logic per
    element, and queue reads duplicated into kernels that run after the queue writes force a copy
    of the whole queue every step. A reduction is never fused into its consumers, so each array
    goes through one (a max with the dtype's lowest value over a new axis of two)."""
    def one(x):
        low = jnp.asarray(-jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min, x.dtype)
        return jnp.max(jnp.stack([x, jnp.broadcast_to(low, x.shape)]), axis=0)
    return tuple(one(x) for x in xs)


def _pack(rid, stage, prompt, done, pf_target, prefill, gen, target, order):
    """Slot columns -> one [rows, F] int32 array (column order: SLOT_FIELDS)."""
    cols = (rid, stage, prompt, done, pf_target, prefill, gen, target, order)
    return jnp.stack([jnp.asarray(x).astype(I32) for x in cols], axis=-1)


def _unpack(packed):
    rid, stage, prompt, done, pf_target, prefill, gen, target, order = (packed[..., i] for i in range(len(SLOT_FIELDS)))
    return rid, stage, prompt, done, pf_target, prefill > 0, gen, target, order


def _itl_bin(gap, bins: int):
    """Bin of an inter-token gap in the log-spaced histogram (edges 1 us .. 100 s, see
    `itl_bin_edges`): computed from the logarithm instead of a search over the edges."""
    pos = (jnp.log10(jnp.maximum(gap, 1e-300)) + 6.0) * (bins / 8.0)
    return jnp.clip(jnp.floor(pos), 0, bins - 1).astype(I32)


# ------------------------------------------------------------------------------------------- step
def step(dims: EngineDims, cl: ClientTable, topo: Topology, wl: Workload, n_valid, st: EngineState,
         tabs=None) -> EngineState:
    """Advance the simulation by one event: route the arrivals due no later than the earliest client
    event (arrivals win ties), then run the client whose event comes first, unless a further
    arrival comes before it. A no-op once every request has completed."""
    finished = st.completed >= n_valid
    all_arrived = st.cursor >= n_valid
    t_cli = client_event_times(dims, cl, st, all_arrived)
    t_arr = jnp.where(all_arrived, INF, wl.arrival[jnp.clip(st.cursor, 0, dims.num_requests - 1)])
    route = (t_arr <= t_cli.min()) & ~all_arrived & ~finished
    st = arrival_step(dims, cl, topo, wl, n_valid, st, t_cli.min(), route)

    all_arrived = st.cursor >= n_valid
    t_cli = client_event_times(dims, cl, st, all_arrived)
    t_arr = jnp.where(all_arrived, INF, wl.arrival[jnp.clip(st.cursor, 0, dims.num_requests - 1)])
    c = jnp.argmin(t_cli).astype(I32)
    t_c = t_cli[c]
    idx = jnp.arange(dims.num_clients)
    # only the next arrival and the clients that can hand work to c bound c's decode stretch
    upstream = jnp.ones(dims.num_clients, bool) if topo.feeds is None else topo.feeds[:, c]
    t_up = jnp.where(upstream & (idx != c), t_cli, INF)
    t_before = jnp.minimum(t_arr, jnp.where(idx < c, t_up, INF).min())
    t_after = jnp.where(idx > c, t_up, INF).min()
    run_client = (t_c < t_arr) & jnp.isfinite(t_c) & ~finished

    new = client_step(dims, cl, topo, wl, st, c, t_c, t_before, t_after, go=run_client, n_valid=n_valid,
                      tabs=tabs)
    return eqx_replace(new, steps=new.steps + (route | run_client).astype(I32))
