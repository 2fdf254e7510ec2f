"""Deployment specs (clients, pools, pipelines, links) and their lowering to engine arrays."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np

from ..cost.memory import plan_memory
from ..cost.params import CostParams, load_params, with_cpu_stack
from ..cost.replica import lower_replica
from ..specs.catalog import get_hardware, get_model
from ..specs.errors import SpecError
from ..specs.model import Precision
from ..engine.tables import (ClientTable, EngineDims, Kind, Policy, Role, Router, Topology, Workload, admits_in_parts,
                             default_queue, default_window, uniform_swap)

POLICIES = {"static": Policy.STATIC, "continuous": Policy.CONTINUOUS, "chunked": Policy.CHUNKED,
            "decode-priority": Policy.DECODE_PRIORITY, "decode_priority": Policy.DECODE_PRIORITY}
ROLES = {"both": Role.PREFILL_DECODE, "colocated": Role.PREFILL_DECODE, "prefill": Role.PREFILL_ONLY,
         "decode": Role.DECODE_ONLY}
ROUTERS = {"round-robin": Router.ROUND_ROBIN, "round_robin": Router.ROUND_ROBIN, "rr": Router.ROUND_ROBIN,
           "least-outstanding": Router.LEAST_OUTSTANDING, "least_outstanding": Router.LEAST_OUTSTANDING,
           "lot": Router.LEAST_OUTSTANDING, "prefix-affinity": Router.PREFIX_AFFINITY,
           "prefix_affinity": Router.PREFIX_AFFINITY}


def _choice(table: dict, value: str, where: str, fld: str):
    v = str(value).lower()
    if v not in table:
        raise SpecError(where, fld, f"'{value}' is not one of {', '.join(sorted(set(table)))}",
                        f"use one of {', '.join(sorted(set(table)))}")
    return table[v]


@dataclass
class ClientSpec:
    """One client: an LLM replica (model on hardware with parallelism and a batching policy), or a
    fixed-cost server (CPU work, vector search, a KV-tier reader)."""

    name: str
    pool: str
    hardware: str = "h100"
    model: str | None = None
    kind: str = "llm"  # llm | server
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    policy: str = "chunked"
    role: str = "both"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    chunk_size: int | None = None
    block_size: int = 16
    memory_utilization: float = 0.9
    max_model_len: int | None = None
    # vLLM's --preemption-mode: "recompute" (drop the KV, prefill again) or "swap" (move the KV to host
    # memory over the host link and back; host swap space is not bounded)
    preemption_mode: str = "recompute"
    # server clients: seconds per batch, per request, per prompt token
    serve_base: float = 0.0
    serve_per_item: float = 0.0
    serve_per_token: float = 0.0
    devices: int | None = None  # devices a server client occupies (for power and cost)
    params: CostParams | None = None
    step_noise_sigma: float | None = None
    # GEMM kernels of this measuring software stack (a key of the device's calibrated params.stacks,
    # e.g. "vidur": Vidur's 2024 cuBLAS) instead of the device's newest (see mist.calibration.stacks)
    gemm_stack: str | None = None
    # host-side (CPU) terms fitted end to end for this serving stack (a key of the device file's
    # cpu.variants, e.g. "trtllm", "vllm-2023") instead of the device's default (see with_cpu_stack)
    cpu_stack: str | None = None
    # encoders: attention sees at most this many tokens at once (blocks of bidirectional attention)
    attention_block: int | None = None
    # declarative stage this client was lowered from (mist.lowering.stages), None for plain clients
    stage: dict | None = None


@dataclass
class StageSpec:
    pool: str
    extra_prompt: int = 0  # tokens this stage adds to the prompt (retrieved documents)
    emits: bool = False  # its first token is what the user sees (TTFT)
    kv_transfer: bool = False  # entering this stage moves the previous stage's KV cache over the link
    kv_layerwise: bool = False  # that transfer runs layer by layer, overlapped with the previous stage


@dataclass
class PipelineSpec:
    name: str
    stages: list[StageSpec]


@dataclass
class LinkSpec:
    """A link between two pools (both directions)."""

    a: str
    b: str
    bandwidth_gbs: float
    latency_us: float


@dataclass
class Deployment:
    clients: list[ClientSpec]
    pipelines: list[PipelineSpec]
    routers: dict[str, str] = field(default_factory=dict)  # pool -> router
    links: list[LinkSpec] = field(default_factory=list)
    name: str = "deployment"

    @classmethod
    def single(cls, model: str, hardware: str = "h100", tp: int = 1, pp: int = 1, ep: int = 1, replicas: int = 1,
               router: str = "round-robin", **client_kw) -> "Deployment":
        """`replicas` identical replicas of one model behind a router; one prefill+decode stage."""
        clients = [ClientSpec(name=f"replica{i}", pool="llm", hardware=hardware, model=model, tp=tp, pp=pp, ep=ep,
                              **client_kw) for i in range(replicas)]
        return cls(clients=clients, pipelines=[PipelineSpec("chat", [StageSpec("llm", emits=True)])],
                   routers={"llm": router}, name=f"{replicas}x {model} on {hardware} tp{tp}")

    @classmethod
    def disaggregated(cls, model: str, prefill_hardware: str = "h100", decode_hardware: str | None = None,
                      num_prefill: int = 1, num_decode: int = 1, tp: int = 1, decode_tp: int | None = None,
                      link_gbs: float = 50.0, link_us: float = 5.0, router: str = "round-robin",
                      **client_kw) -> "Deployment":
        """Prefill clients hand the KV cache to decode clients over a link of the given speed."""
        dh = decode_hardware or prefill_hardware
        clients = [ClientSpec(name=f"prefill{i}", pool="prefill", hardware=prefill_hardware, model=model, tp=tp,
                              role="prefill", **client_kw) for i in range(num_prefill)]
        clients += [ClientSpec(name=f"decode{i}", pool="decode", hardware=dh, model=model, tp=decode_tp or tp,
                               role="decode", **client_kw) for i in range(num_decode)]
        pipe = PipelineSpec("chat", [StageSpec("prefill", emits=True), StageSpec("decode", kv_transfer=True)])
        return cls(clients=clients, pipelines=[pipe], routers={"prefill": router, "decode": router},
                   links=[LinkSpec("prefill", "decode", link_gbs, link_us)],
                   name=f"{num_prefill}P/{num_decode}D {model}")


@dataclass
class Lowered:
    """A deployment + workload as engine arrays, with what the results layer needs to label them."""

    dims: EngineDims
    clients: ClientTable
    topology: Topology
    workload: Workload
    client_names: list[str]
    pool_names: list[str]
    pipeline_names: list[str]
    notes: dict


def lower_workload(requests, capacity: int | None = None) -> Workload:
    """Engine view of a `mist.workload.Requests` (or a dict of numpy arrays)."""
    if hasattr(requests, "to_numpy"):
        d = requests.to_numpy(valid_only=True)
    else:
        d = dict(requests)
    arr = np.asarray(d["arrival"], dtype=np.float64)
    n = len(arr)
    if n == 0:
        raise SpecError("<workload>", "requests", "no requests", "give at least one request")
    if np.any(~np.isfinite(arr)) or np.any(arr < 0) or np.any(np.diff(arr) < 0):
        raise SpecError("<workload>", "arrival", "arrival times must be finite, >= 0 and sorted",
                        "sort requests by arrival")
    inp = np.asarray(d["input_tokens"], dtype=np.int64)
    out = np.asarray(d["output_tokens"], dtype=np.int64)
    if np.any(inp < 1) or np.any(out < 0):
        raise SpecError("<workload>", "input_tokens/output_tokens", "input must be >= 1 and output >= 0",
                        "fix the workload")
    cap = max(capacity or n, n)
    pad = cap - n
    ph = d.get("prefix_hash")
    pk = np.asarray(ph)[:, 0] if ph is not None and np.asarray(ph).ndim == 2 else np.full(n, -1)
    f = lambda a, v, dt: jnp.asarray(np.concatenate([np.asarray(a).astype(dt), np.full(pad, v, dt)]))  # noqa: E731
    return Workload(
        arrival=f(arr, np.inf, np.float64), input_tokens=f(inp, 0, np.int32), output_tokens=f(out, 0, np.int32),
        cached_tokens=f(d.get("cached_tokens", np.zeros(n)), 0, np.int32), prefix_key=f(pk, -1, np.int32),
        pipeline=f(d.get("pipeline", np.zeros(n)), 0, np.int32), valid=f(np.ones(n, bool), False, bool))


def _default_link(dev_a, dev_b, na: int, nb: int) -> tuple[float, float]:
    bw = min(dev_a.scale_out.bandwidth * na, dev_b.scale_out.bandwidth * nb)
    lat = max(dev_a.scale_out.latency, dev_b.scale_out.latency)
    return bw, lat


def lower(dep: Deployment, requests, *, slots: int | None = None, window: int | None = None,
          queue: int | None = None, stretch: int = 64, num_requests: int | None = None,
          num_clients: int | None = None, stages: int | None = None, pools: int | None = None,
          pipelines: int | None = None, absorb: int | None = None, absorb_tokens: int | None = None) -> Lowered:
    """Lower a deployment and a workload to engine arrays. Capacities (slots, clients, stages ...)
    may be raised above what this deployment needs so that several configs share one program.
    `absorb`, `absorb_tokens`: see `EngineDims` (defaults there; `absorb` is 0 for deployments of
    more than one client, where it cannot apply; `stack_lowered` reconciles it)."""
    if not dep.clients:
        raise SpecError(dep.name, "clients", "no clients", "add at least one client")
    if any(c.stage is not None for c in dep.clients):
        from .stages import finalize

        dep = finalize(dep)
    pool_names = sorted({c.pool for c in dep.clients})
    for p in dep.pipelines:
        for s in p.stages:
            if s.pool not in pool_names:
                raise SpecError(dep.name, f"pipelines.{p.name}.stages", f"stage pool '{s.pool}' has no client",
                                f"add a client with pool = '{s.pool}' or use one of {', '.join(pool_names)}")
    for pool in dep.routers:
        if pool not in pool_names:
            raise SpecError(dep.name, f"routers.{pool}", "router for a pool with no client", "remove it or add clients")
    if num_requests is None:
        # pad to a size bucket so that runs of similar sizes share one compiled program
        n_req = len(requests["arrival"]) if isinstance(requests, dict) else int(requests.num_valid)
        num_requests = bucket(n_req)
    wl = lower_workload(requests, num_requests)
    n_pipe = len(dep.pipelines)
    if int(np.max(np.asarray(wl.pipeline))) >= n_pipe:
        raise SpecError("<workload>", "pipeline", f"a request names pipeline {int(np.max(np.asarray(wl.pipeline)))} "
                        f"but the deployment has {n_pipe}", "fix the requests' pipeline ids")

    C_real = len(dep.clients)
    C = max(num_clients or C_real, C_real)
    S = max(slots or max(min(c.max_num_seqs, 1024) for c in dep.clients), 1)
    if slots is not None and any(min(c.max_num_seqs, 1024) > slots for c in dep.clients):
        raise SpecError(dep.name, "max_num_seqs", f"exceeds the engine's {slots} slots", "raise slots")
    rows = []
    notes = {}
    for ci, cs in enumerate(dep.clients):
        where = f"{dep.name}: client '{cs.name}'"
        dev = get_hardware(cs.hardware)
        kind = _choice({"llm": Kind.LLM, "server": Kind.SERVER}, cs.kind, where, "kind")
        policy = _choice(POLICIES, cs.policy, where, "policy")
        role = _choice(ROLES, cs.role, where, "role")
        if cs.max_num_seqs < 1 or cs.block_size < 1:
            raise SpecError(where, "max_num_seqs/block_size", "must be >= 1", "use positive values")
        if cs.params is not None and cs.gemm_stack is not None:
            raise SpecError(where, "gemm_stack", "set together with explicit cost params",
                            "pass the stack's parameters (load_params(device, gemm_stack=...)) or leave gemm_stack out")
        if cs.params is not None and cs.cpu_stack is not None:
            raise SpecError(where, "cpu_stack", "set together with explicit cost params",
                            "pass parameters with the stack's CPU terms (with_cpu_stack(...)) or leave cpu_stack out")
        params, origin = ((cs.params, "given") if cs.params is not None
                          else load_params(dev.name, dev.kind, gemm_stack=cs.gemm_stack))
        if cs.cpu_stack is not None:
            params = with_cpu_stack(params, dev.name, cs.cpu_stack, tp=cs.tp)
            origin = f"{origin}; CPU terms of serving stack {cs.cpu_stack}"
        if cs.step_noise_sigma is not None:
            if cs.step_noise_sigma < 0:
                raise SpecError(where, "step_noise_sigma", "must be >= 0", "use 0 (off) or e.g. 0.05")
            params = replace(params, step_noise_sigma=jnp.asarray(cs.step_noise_sigma, jnp.float32))
        notes[cs.name] = {"cost_params": origin, "hardware": dev.name}
        if kind == Kind.LLM:
            if cs.model is None:
                raise SpecError(where, "model", "an llm client needs a model", "set model = '<catalog name>'")
            m = get_model(cs.model)
            dp = m.default_precision
            prec = Precision(weight=cs.dtype or dp.weight, kv=cs.kv_cache_dtype or dp.kv, act=dp.act,
                             expert_weight=cs.dtype or dp.expert_weight)
            # vLLM-like defaults: 8192 with chunked prefill, else room for a whole prompt (8k-32k)
            mbt = cs.max_num_batched_tokens or (8192 if policy == Policy.CHUNKED
                                                else min(max(m.max_context, 8192), 32768))
            mml = cs.max_model_len or m.max_context
            rep = lower_replica(m, dev, prec, tp=cs.tp, pp=cs.pp, ep=cs.ep)
            if cs.attention_block:  # consecutive blocks of bidirectional attention (see lowering/stages.py)
                rep = replace(rep, window=jnp.asarray(float(cs.attention_block), jnp.float32),
                              sliding_layers=rep.num_layers)
            plan = plan_memory(m, dev, prec, tp=cs.tp, pp=cs.pp, ep=cs.ep, max_num_batched_tokens=min(mbt, 16384),
                               max_num_seqs=cs.max_num_seqs, memory_utilization=cs.memory_utilization)
            kv_blocks = plan.kv_capacity_tokens // cs.block_size if m.kind == "decoder" else 1 << 30
            kv_per_tok = plan.kv_bytes_per_token * (cs.tp if not m.is_mla else 1)
            ndev = cs.tp * cs.pp
            notes[cs.name].update(kv_capacity_tokens=int(min(plan.kv_capacity_tokens, 2**31 - 1)), model=m.name)
        else:
            m = None
            rep = lower_replica(get_model("llama-3.2-1b"), dev)  # placeholder arrays, never costed
            mbt, mml, kv_blocks, kv_per_tok = 1 << 30, 1 << 30, 1 << 30, 0.0
            ndev = cs.devices or 1
            if min(cs.serve_base, cs.serve_per_item, cs.serve_per_token) < 0:
                raise SpecError(where, "serve_*", "server costs must be >= 0", "fix the server's cost figures")
        chunk = cs.chunk_size or mbt
        if cs.preemption_mode not in ("recompute", "swap"):
            raise SpecError(where, "preemption_mode", f"unknown mode '{cs.preemption_mode}'", "use 'recompute' or 'swap'")
        swap_bw = 0.0
        if cs.preemption_mode == "swap" and kind == Kind.LLM:
            host = dev.tier("host")
            if host is None:
                raise SpecError(where, "preemption_mode", f"{dev.name} has no host memory tier to swap to",
                                "use preemption_mode = 'recompute'")
            swap_bw = host.bandwidth * ndev  # every device moves its shard of the KV over its own host link
        rows.append(dict(kind=int(kind), role=int(role), policy=int(policy), max_num_seqs=min(cs.max_num_seqs, S),
                         max_batched_tokens=int(min(mbt, 2**30)), chunk_size=int(min(chunk, 2**30)),
                         block_size=cs.block_size, kv_blocks=int(min(kv_blocks, 2**30)),
                         max_model_len=int(min(mml, 2**30)), replica=rep, params=params,
                         serve_base=cs.serve_base, serve_per_item=cs.serve_per_item, serve_per_token=cs.serve_per_token,
                         kv_bytes_per_token=kv_per_tok, devices=float(ndev), power_busy=dev.tdp, power_idle=dev.idle_power,
                         price_per_hour=dev.price_per_hour, enabled=True, swap_bandwidth=swap_bw, device=dev))
    # padding clients: copies of the first, disabled
    while len(rows) < C:
        rows.append({**rows[0], "enabled": False})
    stackf = lambda k, dt: jnp.asarray(np.array([r[k] for r in rows], dtype=dt))  # noqa: E731
    tree_stack = lambda k: jax.tree.map(lambda *xs: jnp.stack(xs), *[r[k] for r in rows])  # noqa: E731
    clients = ClientTable(
        kind=stackf("kind", np.int32), role=stackf("role", np.int32), policy=stackf("policy", np.int32),
        max_num_seqs=stackf("max_num_seqs", np.int32), max_batched_tokens=stackf("max_batched_tokens", np.int32),
        chunk_size=stackf("chunk_size", np.int32), block_size=stackf("block_size", np.int32),
        kv_blocks=stackf("kv_blocks", np.int32), max_model_len=stackf("max_model_len", np.int32),
        replica=tree_stack("replica"), params=tree_stack("params"),
        serve_base=stackf("serve_base", np.float64), serve_per_item=stackf("serve_per_item", np.float64),
        serve_per_token=stackf("serve_per_token", np.float64),
        kv_bytes_per_token=stackf("kv_bytes_per_token", np.float64), devices=stackf("devices", np.float64),
        power_busy=stackf("power_busy", np.float64), power_idle=stackf("power_idle", np.float64),
        price_per_hour=stackf("price_per_hour", np.float64), enabled=stackf("enabled", bool),
        # None unless some client swaps: the engine then compiles no swap logic at all
        swap_bandwidth=stackf("swap_bandwidth", np.float64) if any(r["swap_bandwidth"] > 0 for r in rows) else None)

    # topology
    P = max(pools or len(pool_names), len(pool_names))
    K = max(stages or max(len(p.stages) for p in dep.pipelines), 1)
    NP = max(pipelines or n_pipe, n_pipe)
    members = np.zeros((P, C), bool)
    for ci, cs in enumerate(dep.clients):
        members[pool_names.index(cs.pool), ci] = True
    router = np.zeros(P, np.int32)
    for pool, r in dep.routers.items():
        router[pool_names.index(pool)] = int(_choice(ROUTERS, r, f"{dep.name}: routers", pool))
    pp = np.full((NP, K), -1, np.int32)
    extra = np.zeros((NP, K), np.int32)
    emits = np.zeros((NP, K), bool)
    xfer = np.zeros((NP, K), bool)
    kv_layers = np.ones((NP, K))
    for pi, p in enumerate(dep.pipelines):
        if not p.stages:
            raise SpecError(dep.name, f"pipelines.{p.name}", "no stages", "add at least one stage")
        cum = 0
        for k, s in enumerate(p.stages):
            if s.extra_prompt < 0:
                raise SpecError(dep.name, f"pipelines.{p.name}.stages[{k}].extra_prompt", "negative", "use >= 0")
            cum += s.extra_prompt
            pp[pi, k], extra[pi, k], emits[pi, k], xfer[pi, k] = pool_names.index(s.pool), cum, s.emits, s.kv_transfer
            if s.kv_layerwise and k > 0:  # only the last layer's share of the KV is exposed
                sender = next((c for c in dep.clients if c.pool == p.stages[k - 1].pool and c.kind == "llm"), None)
                kv_layers[pi, k] = get_model(sender.model).num_layers if sender is not None else 1.0
        if not any(s.emits for s in p.stages):
            # the first LLM stage's first token is the user's
            for k, s in enumerate(p.stages):
                if any(c.pool == s.pool and c.kind == "llm" and c.stage is None for c in dep.clients):
                    emits[pi, k] = True
                    break
    lat = np.zeros((C, C))
    bw = np.full((C, C), 1e18)
    pool_link = {}
    for ln in dep.links:
        for a, b in ((ln.a, ln.b), (ln.b, ln.a)):
            if a not in pool_names or b not in pool_names:
                raise SpecError(dep.name, "links", f"link {ln.a}<->{ln.b} names a pool with no client",
                                f"use pools among {', '.join(pool_names)}")
            if ln.bandwidth_gbs <= 0 or ln.latency_us < 0:
                raise SpecError(dep.name, f"links.{ln.a}-{ln.b}", "bandwidth must be > 0 and latency >= 0",
                                "fix the link figures")
            pool_link[(a, b)] = (ln.bandwidth_gbs * 1e9, ln.latency_us * 1e-6)
    for i, a in enumerate(dep.clients):
        for j, b in enumerate(dep.clients):
            if i == j:
                continue
            if (a.pool, b.pool) in pool_link:
                bw[i, j], lat[i, j] = pool_link[(a.pool, b.pool)]
            else:
                bw[i, j], lat[i, j] = _default_link(rows[i]["device"], rows[j]["device"], int(rows[i]["devices"]),
                                                    int(rows[j]["devices"]))
    feeds = np.zeros((C, C), bool)
    for p in pp:
        for k in range(K - 1):
            if p[k] >= 0 and p[k + 1] >= 0:
                feeds |= members[p[k]][:, None] & members[p[k + 1]][None, :]
    topo = Topology(link_latency=jnp.asarray(lat), link_bandwidth=jnp.asarray(bw), pool_members=jnp.asarray(members),
                    router=jnp.asarray(router), pipeline_pools=jnp.asarray(pp), stage_extra_prompt=jnp.asarray(extra),
                    stage_emits=jnp.asarray(emits), stage_kv_transfer=jnp.asarray(xfer),
                    stage_kv_layers=jnp.asarray(kv_layers), feeds=jnp.asarray(feeds))
    N = int(wl.arrival.shape[0])
    A = default_window(S, admits_in_parts(clients), window)
    Q = int(queue or default_queue(N))
    # admissions inside stretches serve a lone client only: compiled in only then (or when asked)
    if absorb is None and (len(dep.clients) > 1 or stretch <= 1):
        absorb = 0
    extra = {k: int(v) for k, v in (("absorb", absorb), ("absorb_tokens", absorb_tokens)) if v is not None}
    dims = EngineDims(num_requests=N, num_clients=C, slots=S, window=A, queue=Q, stages=K, stretch=max(stretch, 1),
                      pools=P, pipelines=NP, **extra)
    return Lowered(dims=dims, clients=clients, topology=topo, workload=wl,
                   client_names=[c.name for c in dep.clients] + [f"pad{i}" for i in range(C - C_real)],
                   pool_names=pool_names, pipeline_names=[p.name for p in dep.pipelines], notes=notes)


def stack_lowered(items: list[Lowered]) -> Lowered:
    """Stack lowered configs (same dims) along a leading axis, for vmapped runs."""
    # admissions inside stretches (EngineDims.absorb) change the program, not the arrays: one
    # config that uses them turns them on for all (they are inert where they cannot apply)
    absorb = max(it.dims.absorb for it in items)
    dims = items[0].dims._replace(absorb=absorb)
    for it in items:
        if it.dims._replace(absorb=absorb) != dims:
            raise ValueError("configs must be lowered to the same capacities to be stacked")
    st = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    return Lowered(dims=dims, clients=st(uniform_swap([i.clients for i in items])),
                   topology=st([i.topology for i in items]),
                   workload=st([i.workload for i in items]), client_names=items[0].client_names,
                   pool_names=items[0].pool_names, pipeline_names=items[0].pipeline_names,
                   notes={"configs": [i.notes for i in items]})


def bucket(n: int, minimum: int = 64) -> int:
    """The capacity a workload of n requests is padded to: the next power of two, or a multiple
    of 1/8 of it above 4096 (padding costs memory, not per-step work)."""
    n = max(int(n), minimum)
    p = 1 << (n - 1).bit_length()
    if p <= 4096:
        return p
    step = p // 8
    return -(-n // step) * step


__all__ = ["ClientSpec", "StageSpec", "PipelineSpec", "LinkSpec", "Deployment", "Lowered", "lower",
           "lower_workload", "stack_lowered", "bucket"]
