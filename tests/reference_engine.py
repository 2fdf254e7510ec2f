"""A plain-Python, event-by-event reference of the engine semantics (mist/engine/SEMANTICS.md).

Slow and obvious on purpose: Python lists and dicts, one event per loop turn, one iteration per
client event (no decode stretches). It reads the numbers of a `Lowered` config (one config, no
leading batch axis) with numpy; only the LLM iteration cost is computed with JAX, by calling
`mist.cost.iteration.iteration_time` (jitted once) on the batch the semantics define.

Batch rows are laid out the way the engine lays out its slots (running requests in admission
order, then empty rows), so that the cost model sums its rows in the same order; nothing else
depends on slot numbers except the order in which one iteration's finished stages are routed on
(admission order, as in the engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np

from mist.cost import iteration as _iteration
from mist.cost.iteration import MixedBatch, iteration_time
from mist.engine.tables import Kind, Policy, Reject, Role, Router

INF = float("inf")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_ns(dt: float) -> float:
    """Durations are whole nanoseconds (Python's round, like jnp.round, rounds half to even)."""
    return round(dt * 1e9) / 1e9


@jax.jit
def _llm_time(params, replica, chunk, context, last, pmask, dctx, dmask):
    batch = MixedBatch(prefill_tokens=chunk, prefill_context=context, prefill_last=last, prefill_mask=pmask,
                       decode_context=dctx, decode_mask=dmask)
    return iteration_time(params, replica, batch)


@jax.jit
def _decode_time(params, replica, dctx, dmask):
    """A decode-only iteration. The engine costs these through the cost model's stretch function
    (the same time as `iteration_time`, computed so that only attention depends on the offset j)."""
    stretch_times = getattr(_iteration, "decode_stretch_times", None)
    if stretch_times is None:
        z = np.zeros(dctx.shape, np.float64)
        return _llm_time(params, replica, z, z, dmask & False, dmask & False, dctx, dmask)
    return stretch_times(params, replica, dctx, dmask, np.zeros(1))[0]


@dataclass
class Entry:
    """A queue entry: request `rid` waiting for stage `stage`, admissible from `ready` (s)."""

    rid: int
    stage: int
    ready: float


@dataclass
class Slot:
    rid: int
    stage: int
    prompt: int
    done: int  # tokens whose KV is in the cache
    pf_target: int  # tokens in KV when the prefill phase ends
    prefill: bool
    gen: int  # tokens generated in this stage
    target: int
    order: int  # admission number

    @property
    def decoding(self) -> bool:
        return not self.prefill and self.gen < self.target

    @property
    def held(self) -> int:
        return self.pf_target if self.prefill else self.prompt + self.gen


@dataclass
class RefResult:
    first_token: np.ndarray  # [n] s (inf: none)
    finish: np.ndarray  # [n] s (inf: never completed, e.g. rejected)
    stage_start: np.ndarray  # [n, K]
    stage_end: np.ndarray  # [n, K]
    stage_client: np.ndarray  # [n, K] (-1: never admitted)
    preemptions: np.ndarray  # [n]
    reject: np.ndarray  # [n] Reject codes
    tokens: np.ndarray  # [n, K] tokens generated in each stage (counted one by one)
    iters: np.ndarray  # [C] iterations run
    busy: np.ndarray  # [C] s
    max_kv_blocks: np.ndarray  # [C] most KV blocks physically written at the end of any iteration
    events: int = 0
    log: list = field(default_factory=list)
    swap_seconds: float = 0.0  # time spent moving KV to and from host memory (swap-mode preemption)


class ReferenceEngine:
    """Run one lowered config: `ReferenceEngine(lo).run()` (or pass dims, clients, topology, workload)."""

    def __init__(self, dims, clients=None, topology=None, workload=None, max_events: int = 200_000):
        if clients is None:  # a Lowered
            dims, clients, topology, workload = dims.dims, dims.clients, dims.topology, dims.workload
        self.dims = dims
        self.max_events = max_events
        g = lambda x: np.asarray(x)  # noqa: E731
        cl, tp, wl = clients, topology, workload
        self.C, self.S, self.K = dims.num_clients, dims.slots, dims.stages
        self.A = min(dims.window, dims.slots)  # admission window
        self.Q = dims.queue
        # clients
        self.kind, self.role, self.policy = g(cl.kind), g(cl.role), g(cl.policy)
        self.B = np.minimum(g(cl.max_num_seqs), self.S)
        self.M, self.H = g(cl.max_batched_tokens), g(cl.chunk_size)
        self.bs, self.cap, self.mml = g(cl.block_size), g(cl.kv_blocks), g(cl.max_model_len)
        self.serve = (g(cl.serve_base), g(cl.serve_per_item), g(cl.serve_per_token))
        self.kvbpt, self.enabled = g(cl.kv_bytes_per_token), g(cl.enabled)
        sw = getattr(cl, "swap_bandwidth", None)
        self.swap_bw = np.zeros(self.C) if sw is None else g(sw)  # > 0: preempt by swapping to host memory
        # chunked-prefill clients that prefill what they admit see no admission window: the engine
        # splits a full window's admissions over steps at one time (without swapping, and when the
        # window is smaller than the batch)
        self.window_free = sw is None and dims.window < dims.slots
        sigma = g(cl.params.step_noise_sigma)
        assert np.all(sigma[self.enabled] == 0), "the reference does not model step noise"
        # the engine evaluates the cost model in float64 (see SEMANTICS.md)
        f64 = lambda x: np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating) else x  # noqa: E731
        self.params = [jax.tree.map(lambda x: f64(x[c]), cl.params) for c in range(self.C)]
        self.replica = [jax.tree.map(lambda x: f64(x[c]), cl.replica) for c in range(self.C)]
        # topology
        self.lat, self.bw = g(tp.link_latency), g(tp.link_bandwidth)
        self.members = g(tp.pool_members)
        self.router = g(tp.router)
        self.pipe_pools, self.extra = g(tp.pipeline_pools), g(tp.stage_extra_prompt)
        self.emits, self.xfer = g(tp.stage_emits), g(tp.stage_kv_transfer)
        kvl = getattr(tp, "stage_kv_layers", None)
        self.kv_layers = np.ones(self.xfer.shape) if kvl is None else g(kvl)
        # workload (valid rows first)
        self.n = int(g(wl.valid).sum())
        n = self.n
        self.arrival = g(wl.arrival)[:n].astype(float)
        self.inp, self.out = g(wl.input_tokens)[:n].astype(int), g(wl.output_tokens)[:n].astype(int)
        self.cached, self.pkey = g(wl.cached_tokens)[:n].astype(int), g(wl.prefix_key)[:n].astype(int)
        self.pipe = g(wl.pipeline)[:n].astype(int)

    # ------------------------------------------------------------------------------ helpers
    def shape(self, rid: int, stage: int, c: int) -> tuple[int, int]:
        """(prompt, target) of request rid at stage on client c."""
        prompt = int(self.inp[rid] + self.extra[self.pipe[rid], stage])
        if self.kind[c] == Kind.SERVER:
            target = 0
        elif self.role[c] == Role.PREFILL_ONLY:
            target = 1
        else:
            target = int(self.out[rid])
        return prompt, target

    def event_time(self, c: int) -> float:
        if not self.enabled[c]:
            return INF
        if any(s is not None for s in self.slots[c]):
            return self.t_free[c]
        q = self.queue[c]
        if not q:
            return INF
        if self.policy[c] == Policy.STATIC:
            B = int(self.B[c])
            if len(q) < B and self.cursor < self.n:
                return INF
            start = q[min(B, len(q)) - 1].ready
        else:
            start = q[0].ready
        return max(self.t_free[c], start)

    # ------------------------------------------------------------------------------ routing
    def route(self, items):
        """items: list of (rid, stage, t, kv_bytes, from_client) routed in one event, in order."""
        rr0 = self.rr.copy()
        load0 = list(self.outstanding)
        rank_in_pool: dict[int, int] = {}
        for rid, stage, t, kv_bytes, frm in items:
            pipe = self.pipe[rid]
            pool = int(self.pipe_pools[pipe, stage]) if stage < self.K else -1
            mem = [c for c in range(self.C) if pool >= 0 and self.members[pool, c] and self.enabled[c]]
            if not mem:
                self.reject_req(rid, Reject.NO_CLIENT)
                continue
            rank = rank_in_pool.get(pool, 0)
            rank_in_pool[pool] = rank + 1
            nm = len(mem)
            r = self.router[pool]
            if r == Router.LEAST_OUTSTANDING:
                by_load = sorted(mem, key=lambda c: (load0[c], c))
                c = by_load[rank % nm]
            elif r == Router.PREFIX_AFFINITY and self.pkey[rid] >= 0:
                c = mem[self.pkey[rid] % nm]
            else:
                c = mem[(rr0[pool] + rank) % nm]
            if r == Router.ROUND_ROBIN or (r == Router.PREFIX_AFFINITY and self.pkey[rid] < 0):
                self.rr[pool] += 1
            prompt, target = self.shape(rid, stage, c)
            if self.kind[c] == Kind.LLM:
                cached = min(int(self.cached[rid]), max(prompt - 1, 0))
                if prompt + target > self.mml[c]:
                    self.reject_req(rid, Reject.CONTEXT_LENGTH)
                    continue
                if cdiv(prompt + target, int(self.bs[c])) > self.cap[c]:
                    self.reject_req(rid, Reject.KV_CAPACITY)
                    continue
                if (self.policy[c] != Policy.CHUNKED and self.role[c] != Role.DECODE_ONLY
                        and prompt - cached > self.M[c]):
                    self.reject_req(rid, Reject.BATCH_TOKENS)
                    continue
            if len(self.queue[c]) >= self.Q:
                self.reject_req(rid, Reject.QUEUE_FULL)
                continue
            # a layer-by-layer transfer exposes only the last layer's share of the KV bytes
            kv_bytes = kv_bytes / self.kv_layers[pipe, stage]
            hop = 0.0 if frm < 0 else self.lat[frm, c] + kv_bytes / self.bw[frm, c]
            self.queue[c].append(Entry(rid, stage, t + hop))
            self.outstanding[c] += float(prompt + target)

    def reject_req(self, rid: int, why: Reject):
        self.reject[rid] = int(why)
        self.completed += 1

    # ------------------------------------------------------------------------------ one iteration
    def candidate(self, e: Entry, c: int) -> dict:
        prompt, target = self.shape(e.rid, e.stage, c)
        gen0 = int(self.r_gen[e.rid])
        direct = self.role[c] == Role.DECODE_ONLY and not self.r_preempted[e.rid] and gen0 > 0
        swapped = int(self.r_swapped[e.rid])  # KV tokens waiting in host memory (swap mode)
        if direct:
            done0 = prompt
        elif swapped > 0:
            done0 = swapped
        elif gen0 == 0:
            done0 = min(int(self.cached[e.rid]), max(prompt - 1, 0))
        else:
            done0 = 0
        pf_target = prompt + gen0
        need = 0 if direct else pf_target - done0
        blocks = 0
        if self.kind[c] == Kind.LLM:
            blocks = cdiv(prompt + gen0 if direct else pf_target, int(self.bs[c]))
        return dict(entry=e, prompt=prompt, target=target, gen0=gen0, direct=direct, done0=done0,
                    pf_target=pf_target, need=need, blocks=blocks, swapped=swapped)

    def iterate(self, c: int, t: float):
        slots, queue = self.slots[c], self.queue[c]
        is_llm = self.kind[c] == Kind.LLM
        pol = self.policy[c]
        exclusive = pol != Policy.CHUNKED
        bs, cap, M, H, B = int(self.bs[c]), int(self.cap[c]), int(self.M[c]), int(self.H[c]), int(self.B[c])
        running = [s for s in slots if s is not None]

        def grown(s: Slot) -> int:
            return cdiv(s.prompt + s.gen + 1, bs) if s.decoding else cdiv(s.held, bs)

        blocks_held = sum(cdiv(s.held, bs) for s in running)
        need_blocks = sum(grown(s) for s in running)

        # 1. the ready prefix of the window
        window = []
        unbounded = self.window_free and is_llm and pol == Policy.CHUNKED and self.role[c] != Role.DECODE_ONLY
        for e in queue[: len(queue) if unbounded else self.A]:
            if e.ready > t:
                break
            window.append(self.candidate(e, c))

        # 3. admission
        if pol in (Policy.CONTINUOUS, Policy.CHUNKED):
            gate = True
        else:
            gate = not running
        if pol == Policy.STATIC:
            gate = gate and (len(window) >= B or self.cursor >= self.n)
        chunked_needs_preempt = (not exclusive) and is_llm and need_blocks > cap
        admitted = []
        if gate and not chunked_needs_preempt:
            if exclusive:
                tok = blk = 0
                for i, w in enumerate(window):
                    if i >= B - len(running):
                        break
                    over_m = tok + w["need"] > M and not (i == 0 and not running)  # alone it may exceed M
                    if is_llm and (over_m or blk + w["blocks"] > cap - blocks_held):
                        break
                    tok += w["need"]
                    blk += w["blocks"]
                    admitted.append(w)
            else:
                n_dec = sum(s.decoding for s in running)
                budget = M - n_dec - sum(min(s.pf_target - s.done, H) for s in running if s.prefill)
                used = blk = 0
                for i, w in enumerate(window):
                    if i >= B - len(running):
                        break
                    if is_llm:
                        capped = min(w["need"], H)
                        chunk = min(max(budget - used, 0), capped)
                        if not (chunk > 0 or w["need"] == 0) or blk + w["blocks"] > cap - need_blocks:
                            break
                        used += capped
                    blk += w["blocks"]
                    admitted.append(w)

        # 4. preemption (recompute, or swap), most recently admitted first
        swap_tokens = 0
        preempting = is_llm and need_blocks > cap and (not exclusive or not admitted)
        if preempting:
            excess, freed, victims = need_blocks - cap, 0, []
            for s in sorted(running, key=lambda s: -s.order):
                if freed >= excess:
                    break
                victims.append(s)
                freed += grown(s)
            victims.sort(key=lambda s: s.order)
            for s in victims:
                self.r_gen[s.rid] = s.gen
                self.r_preempted[s.rid] = True
                self.preemptions[s.rid] += 1
                if self.swap_bw[c] > 0:  # its KV (what is in the cache) goes to host memory
                    kv = s.done if s.prefill else s.prompt + s.gen
                    self.r_swapped[s.rid] = kv
                    swap_tokens += kv
                slots[slots.index(s)] = None
            queue[:0] = [Entry(s.rid, s.stage, t) for s in victims]
            self.compact(c)
            slots = self.slots[c]
            self.log.append(("preempt", c, t, [s.rid for s in victims]))

        # admit behind the running requests (slots stay in admission order)
        new = set()
        for w in admitted:
            e = w["entry"]
            assert queue[0] is e
            queue.pop(0)
            i = slots.index(None)
            slots[i] = Slot(rid=e.rid, stage=e.stage, prompt=w["prompt"], done=w["done0"], pf_target=w["pf_target"],
                            prefill=not w["direct"] and w["need"] > 0, gen=w["gen0"], target=w["target"],
                            order=self.order)
            swap_tokens += w["swapped"]  # swapped back in from host memory
            self.r_swapped[e.rid] = 0
            self.order += 1
            new.add(i)
            self.stage_start[e.rid, e.stage] = min(self.stage_start[e.rid, e.stage], t)
            self.stage_client[e.rid, e.stage] = c
            self.r_preempted[e.rid] = False

        # 5. this iteration's work
        S = self.S
        chunk = [0] * S
        dec = [False] * S
        if not is_llm:
            chunk = [s.prompt if s is not None else 0 for s in slots]
        elif exclusive and admitted:
            for i in new:
                if slots[i].prefill:
                    chunk[i] = slots[i].pf_target - slots[i].done
        else:
            dec = [s is not None and s.decoding for s in slots]
            if not exclusive:
                budget = M - sum(dec)
                used = 0
                pre = sorted((i for i, s in enumerate(slots) if s is not None and s.prefill), key=lambda i: slots[i].order)
                for i in pre:
                    capped = min(slots[i].pf_target - slots[i].done, H)
                    chunk[i] = min(max(budget - used, 0), capped)
                    used += capped

        f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
        dctx = [s.prompt + s.gen - 1 if dec[i] else 0 for i, s in enumerate(slots)]
        if is_llm and sum(chunk) == 0 and not admitted and not preempting:
            dt = float(_decode_time(self.params[c], self.replica[c], f64(dctx), np.asarray(dec)))
        elif is_llm:
            ctx = [s.done if s is not None else 0 for s in slots]
            last = [s is not None and s.done + chunk[i] >= s.pf_target for i, s in enumerate(slots)]
            dt = float(_llm_time(self.params[c], self.replica[c], f64(chunk), f64(ctx), np.asarray(last),
                                 np.asarray([x > 0 for x in chunk]), f64(dctx), np.asarray(dec)))
        else:
            base, per_item, per_tok = (float(x[c]) for x in self.serve)
            dt = base + per_item * len(new) + per_tok * sum(chunk)
        if swap_tokens > 0:
            swap_s = float(swap_tokens) * float(self.kvbpt[c]) / float(self.swap_bw[c])
            self.swap_seconds += swap_s
            dt = dt + swap_s
        dt = round_ns(dt)
        t_end = t + dt
        self.iters[c] += 1
        self.busy[c] += dt
        self.log.append(("iter", c, t, t_end, [s.rid if s else -1 for s in slots], chunk, dec))

        # 7. apply
        finished = []
        for i, s in enumerate(slots):
            if s is None:
                continue
            if dec[i]:
                s.gen += 1
                self.tokens[s.rid, s.stage] += 1
            if chunk[i] > 0 and s.prefill:
                s.done += chunk[i]
                if s.done >= s.pf_target or not is_llm:  # a SERVER batch finishes whole
                    s.prefill = False
                    if s.target > 0:
                        s.gen += 1
                        self.tokens[s.rid, s.stage] += 1
                        if self.emits[self.pipe[s.rid], s.stage] and self.first_token[s.rid] == INF:
                            self.first_token[s.rid] = t_end
            if not s.prefill and s.gen >= s.target:
                finished.append(i)
        # KV physically written (the last sampled token's KV is written by the next decode)
        kv = sum(cdiv(s.done if s.prefill else s.prompt + max(s.gen - 1, 0), bs) for s in slots if s is not None)
        self.max_kv[c] = max(self.max_kv[c], kv)

        handoffs = []
        for i in finished:
            s = slots[i]
            slots[i] = None
            self.stage_end[s.rid, s.stage] = t_end
            self.outstanding[c] -= float(s.prompt + s.target)
            pipe, nxt = self.pipe[s.rid], s.stage + 1
            if nxt < self.K and self.pipe_pools[pipe, nxt] >= 0:
                xfer = bool(self.xfer[pipe, nxt])
                self.r_gen[s.rid] = s.gen if xfer else 0
                self.r_preempted[s.rid] = False
                kv_bytes = float(s.prompt + s.gen) * self.kvbpt[c] if xfer else 0.0
                handoffs.append((s.rid, nxt, t_end, kv_bytes, c))
            else:
                self.finish[s.rid] = t_end
                self.completed += 1
        self.compact(c)
        if handoffs:
            self.route(handoffs)
        self.t_free[c] = t_end

    def compact(self, c: int):
        """Running slots first, in admission order; empty slots after them."""
        running = [s for s in self.slots[c] if s is not None]
        self.slots[c] = running + [None] * (self.S - len(running))

    # ------------------------------------------------------------------------------ main loop
    def run(self) -> RefResult:
        n, C, K = self.n, self.C, self.K
        self.t_free = [0.0] * C
        self.slots = [[None] * self.S for _ in range(C)]
        self.queue = [[] for _ in range(C)]
        self.outstanding = [0.0] * C
        self.rr = np.zeros(len(self.router), int)
        self.cursor = self.order = self.completed = 0
        self.r_gen = np.zeros(n, int)
        self.r_preempted = np.zeros(n, bool)
        self.r_swapped = np.zeros(n, int)
        self.swap_seconds = 0.0
        self.first_token = np.full(n, INF)
        self.finish = np.full(n, INF)
        self.stage_start = np.full((n, K), INF)
        self.stage_end = np.full((n, K), INF)
        self.stage_client = np.full((n, K), -1)
        self.preemptions = np.zeros(n, int)
        self.reject = np.zeros(n, int)
        self.tokens = np.zeros((n, K), int)
        self.iters = np.zeros(C, int)
        self.busy = np.zeros(C)
        self.max_kv = np.zeros(C, int)
        self.log = []
        events = 0
        while self.completed < n:
            events += 1
            if events > self.max_events:
                raise RuntimeError("reference engine: too many events")
            times = [self.event_time(c) for c in range(C)]
            c = int(np.argmin(times))  # first index on ties
            t_c = times[c]
            if self.cursor < n and self.arrival[self.cursor] <= t_c:
                limit = max(t_c, self.arrival[self.cursor])
                if (self.pipe_pools[:, 1:] >= 0).any():  # multi-stage: an early arrival would block hand-offs
                    limit = self.arrival[self.cursor]
                items = []
                while (self.cursor < n and len(items) < self.dims.window
                       and self.arrival[self.cursor] <= limit):
                    items.append((self.cursor, 0, float(self.arrival[self.cursor]), 0.0, -1))
                    self.cursor += 1
                self.route(items)
            elif math.isfinite(t_c):
                self.iterate(c, t_c)
            else:
                raise RuntimeError("reference engine stuck: requests remain but no event can happen")
        return RefResult(first_token=self.first_token, finish=self.finish, stage_start=self.stage_start,
                         stage_end=self.stage_end, stage_client=self.stage_client, preemptions=self.preemptions,
                         reject=self.reject, tokens=self.tokens, iters=self.iters, busy=self.busy,
                         max_kv_blocks=self.max_kv, events=events, log=self.log, swap_seconds=self.swap_seconds)


def reference_run(lo) -> RefResult:
    return ReferenceEngine(lo).run()
