"""Lowering of the non-LLM and multi-stage parts of a pipeline to engine clients and workloads.

The engine knows two kinds of client: LLM replicas (iteration-level batching over the cost model)
and SERVER clients (a batch of n requests with T prompt tokens costs base + per_item n +
per_token T). Everything else a serving pipeline does is lowered onto those two here:

- `encoder` (query embedder, cross-encoder reranker; any catalog encoder on any device, CPU
  included): an LLM client with role prefill-only whose first token is never the user's. Encoders
  see at most `block` tokens at once (the model's maximum context by default), so a long input, or
  a reranker's k documents, is costed as consecutive blocks of bidirectional attention (lowered as
  a sliding window of `block` tokens on every layer), while the GEMMs see all tokens.
- `rag_search` (IVF-PQ by default, HNSW or flat): a SERVER client whose batch cost is the
  straight line through the cost model's search time (`mist.cost.nonllm`) for 1 and for
  `max_num_seqs` queries: base + per_item n.
- `kv_tier` (a level of a KV-cache hierarchy: per-client DRAM, shared DRAM, SSD, remote storage):
  a SERVER client reading the prompt's KV (`kv_bytes_per_token` of the consuming model) at
  min(tier bandwidth, bandwidth of the link to the reading pool) after the tier's latency. A tier
  pool with one client shared by many LLM clients is a shared tier: concurrent reads are batched
  on it, so the bytes of every reader add up and each waits for the sum (bandwidth contention
  emerges from the queue). Whether a request hits a tier is decided here (seeded, per tier hit
  rate, conditional on missing the tiers before it); a hit takes the pipeline that starts at that
  tier's pool with the cached tokens set, a miss at every tier takes the recompute pipeline
  (cached = 0).
- `cpu` (pre/post-processing at a fixed cost per batch, request and token): a SERVER client.
- `link` (a shared link, e.g. one NIC or switch port carrying the KV of several prefill clients):
  a SERVER pool placed as a stage between the two pools it connects; the KV moves at the link's
  bandwidth and transfers queue behind each other. Links to and from that stage are free.

Reasoning (`reasoning` in the workload): thinking tokens as an output multiplier or extra decode
tokens drawn from a length distribution, and `branches` parallel branches that share the prefill
KV: every request becomes `branches` rows with the same arrival; branches 2..b arrive with the
prompt cached (no prefill compute) and share the parent's prefix key (prefix-affinity routing keeps
them on one client). `parent_frame` folds the per-branch rows back: TTFT = first branch's first
token, end-to-end = the last branch's finish.

Known simplifications (stated in the results' notes): a KV tier reads the whole prompt's KV (cached
context + new tokens); branches each hold their own KV blocks (no block sharing in the engine);
encoders on a long input are costed as independent blocks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import numpy as np

from ..specs.catalog import get_hardware, get_model
from ..specs.errors import SpecError
from .deployment import ClientSpec, Deployment, LinkSpec

STAGE_KINDS = ("encoder", "rag_search", "kv_tier", "cpu", "link")
ENCODER_KINDS = ("embedder", "reranker", "encoder")
INDEXES = ("ivf_pq", "ivf-pq", "ivfpq", "hnsw", "flat")
#: a free link (stages next to a shared-link server pool, which carries the bytes itself)
FREE_LINK_GBS = 1e9

_COMMON = {"name", "count", "pool", "kind", "hardware", "max_num_seqs", "devices"}


# ------------------------------------------------------------------------------ figures
def kv_bytes_per_token(model: str, tp: int = 1, pp: int = 1, kv_cache_dtype: str | None = None) -> float:
    """KV-cache bytes one token adds to a whole replica of `model` (all layers, all TP ranks)."""
    from ..cost.memory import kv_bytes_per_token_per_device
    from ..specs.model import Precision

    m = get_model(model)
    dp = m.default_precision
    prec = Precision(weight=dp.weight, kv=kv_cache_dtype or dp.kv, act=dp.act, expert_weight=dp.expert_weight)
    per_dev = kv_bytes_per_token_per_device(m, prec, tp, pp)
    return per_dev * pp * (1 if m.is_mla else tp)


def search_time(hardware: str, queries: float, index: str = "ivf_pq", num_vectors: float = 1e8, dim: float = 768,
                centroids: float = 65536, nprobe: float = 32, points_per_probe: float | None = None,
                top_k: float = 20, pq_m: float | None = None, pq_bits: float = 8, hnsw_m: float = 16,
                ef_search: float = 64, dtype: str = "fp32") -> float:
    """Seconds to search a batch of `queries` on `hardware` (the cost model in mist.cost.nonllm)."""
    from ..cost import nonllm
    from ..cost.params import load_params

    dev = get_hardware(hardware)
    params, _ = load_params(dev.name, dev.kind)
    hw = nonllm.search_hardware(dev, dtype)
    eb = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0}.get(dtype, 4.0)
    idx = index.replace("-", "_").lower()
    if idx in ("ivf_pq", "ivfpq"):
        t = nonllm.ivfpq_time(params, hw, float(queries), float(num_vectors), float(dim), float(centroids),
                              float(nprobe), float(pq_m or max(dim // 8, 1)), float(pq_bits),
                              None if points_per_probe is None else float(points_per_probe), float(top_k), eb)
    elif idx == "hnsw":
        t = nonllm.hnsw_time(params, hw, float(queries), float(num_vectors), float(dim), float(hnsw_m),
                             float(ef_search), eb)
    elif idx == "flat":
        t = nonllm.flat_search_time(params, hw, float(queries), float(num_vectors), float(dim), eb, float(top_k))
    else:
        raise SpecError("<rag_search>", "index", f"'{index}' is not one of ivf_pq, hnsw, flat", "use ivf_pq")
    return float(t)


def search_costs(hardware: str, batch: int = 64, **index: Any) -> tuple[float, float]:
    """(base, per_item) seconds: the line through the search time of 1 and of `batch` queries."""
    t1 = search_time(hardware, 1, **index)
    tb = search_time(hardware, max(batch, 2), **index)
    per_item = max((tb - t1) / (max(batch, 2) - 1), 0.0)
    return max(t1 - per_item, 0.0), per_item


# ------------------------------------------------------------------------------ clients
def encoder_client(name: str, pool: str, model: str, hardware: str = "h100", tp: int = 1, dtype: str | None = None,
                   max_num_seqs: int = 64, policy: str = "continuous", block: int | None = None,
                   max_num_batched_tokens: int = 32768, **kw) -> ClientSpec:
    """An embedder or cross-encoder reranker as a prefill-only LLM client (see the module doc)."""
    m = get_model(model)
    if m.kind not in ENCODER_KINDS:
        raise SpecError(f"client '{name}'", "model", f"{m.name} is a {m.kind}, not an encoder",
                        "use an embedder or reranker from the catalog (bge-large-en-v1.5, bge-reranker-base, ...)")
    blk = int(block or m.max_context)
    return ClientSpec(name=name, pool=pool, hardware=hardware, model=model, kind="llm", tp=tp, dtype=dtype,
                      policy=policy, role="prefill", max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, max_model_len=1 << 24, attention_block=blk,
                      stage={"kind": "encoder", "block": blk}, **kw)


def rag_search_client(name: str, pool: str, hardware: str = "epyc-9654", max_num_seqs: int = 64,
                      devices: int | None = None, **index: Any) -> ClientSpec:
    base, per_item = search_costs(hardware, max_num_seqs, **index)
    return ClientSpec(name=name, pool=pool, hardware=hardware, kind="server", policy="continuous",
                      max_num_seqs=max_num_seqs, serve_base=base, serve_per_item=per_item, devices=devices,
                      stage={"kind": "rag_search", **index, "base_s": base, "per_item_s": per_item})


def kv_tier_client(name: str, pool: str, bandwidth_gbs: float, latency_us: float, hit_rate: float,
                   kv_bytes_per_token: float | None = None, link_gbs: float | None = None, tier: str = "",
                   hardware: str = "epyc-9654", max_num_seqs: int = 256, devices: int | None = None,
                   capacity_gb: float | None = None) -> ClientSpec:
    """A KV-cache tier. Costs are final when `kv_bytes_per_token` is given; otherwise `finalize`
    fills them from the reading pool's model and the link to it."""
    if not 0.0 <= hit_rate <= 1.0:
        raise SpecError(f"client '{name}'", "hit_rate", f"{hit_rate} is not in [0, 1]", "use e.g. 0.8")
    if bandwidth_gbs <= 0 or latency_us < 0:
        raise SpecError(f"client '{name}'", "bandwidth_gbs/latency_us", "bandwidth must be > 0, latency >= 0",
                        "fix the tier's figures")
    st = {"kind": "kv_tier", "tier": tier or name, "bandwidth_gbs": bandwidth_gbs, "latency_us": latency_us,
          "hit_rate": hit_rate, "kv_bytes_per_token": kv_bytes_per_token, "link_gbs": link_gbs,
          "capacity_gb": capacity_gb}
    cs = ClientSpec(name=name, pool=pool, hardware=hardware, kind="server", policy="continuous",
                    max_num_seqs=max_num_seqs, devices=devices, stage=st)
    if kv_bytes_per_token is not None:
        _set_tier_costs(cs, kv_bytes_per_token, link_gbs)
    return cs


def _set_tier_costs(cs: ClientSpec, kvb: float, link_gbs: float | None) -> None:
    st = cs.stage
    bw = st["bandwidth_gbs"] * 1e9
    if link_gbs is not None:
        bw = min(bw, link_gbs * 1e9)
    cs.serve_base = st["latency_us"] * 1e-6
    cs.serve_per_item = 0.0
    cs.serve_per_token = kvb / bw
    st.update(kv_bytes_per_token=kvb, effective_gbs=bw / 1e9)


def cpu_client(name: str, pool: str, base_ms: float = 0.0, per_item_ms: float = 0.0, per_token_us: float = 0.0,
               hardware: str = "epyc-9654", max_num_seqs: int = 64, devices: int | None = None) -> ClientSpec:
    return ClientSpec(name=name, pool=pool, hardware=hardware, kind="server", policy="continuous",
                      max_num_seqs=max_num_seqs, serve_base=base_ms * 1e-3, serve_per_item=per_item_ms * 1e-3,
                      serve_per_token=per_token_us * 1e-6, devices=devices, stage={"kind": "cpu"})


def link_client(name: str, pool: str, bandwidth_gbs: float, latency_us: float,
                kv_bytes_per_token: float | None = None, layers: int = 1, max_num_seqs: int = 256,
                hardware: str = "epyc-9654") -> ClientSpec:
    """A shared link as a server: a batch of transfers takes latency + their bytes / bandwidth
    (with `layers` > 1, layer-by-layer transfer overlapped with prefill: 1/layers exposed)."""
    st = {"kind": "link", "bandwidth_gbs": bandwidth_gbs, "latency_us": latency_us, "layers": layers,
          "kv_bytes_per_token": kv_bytes_per_token}
    cs = ClientSpec(name=name, pool=pool, hardware=hardware, kind="server", policy="continuous",
                    max_num_seqs=max_num_seqs, devices=0, stage=st)
    if kv_bytes_per_token is not None:
        _set_link_costs(cs, kv_bytes_per_token)
    return cs


def _set_link_costs(cs: ClientSpec, kvb: float) -> None:
    st = cs.stage
    cs.serve_base = st["latency_us"] * 1e-6
    cs.serve_per_token = kvb / (st["bandwidth_gbs"] * 1e9) / max(st["layers"], 1)
    st["kv_bytes_per_token"] = kvb


# ------------------------------------------------------------------------------ config files
def parse_stage_client(f, where: str) -> list[ClientSpec]:
    """Clients of a stage kind from a config `clients` entry (`Fields`); see the module doc."""
    kind = f.string("kind")
    count = f.number("count", 1, integer=True, positive=True)
    name = f.string("name")
    pool = f.string("pool", name)
    hw_default = "h100" if kind == "encoder" else "epyc-9654"
    hardware = f.string("hardware", hw_default)
    mns = f.number("max_num_seqs", 64 if kind in ("encoder", "rag_search", "cpu") else 256, integer=True,
                   positive=True)
    devices = f.number("devices", None, integer=True, positive=True)
    mk = []
    if kind == "encoder":
        kw = dict(model=f.string("model"), hardware=hardware, tp=f.number("tp", 1, integer=True, positive=True),
                  dtype=f.string("dtype", None), max_num_seqs=mns,
                  policy=f.string("policy", "continuous", choices=("continuous", "static", "decode-priority")),
                  block=f.number("block", None, integer=True, positive=True),
                  max_num_batched_tokens=f.number("max_num_batched_tokens", 32768, integer=True, positive=True))
        f.check_unknown(_COMMON | {"model", "tp", "dtype", "policy", "block", "max_num_batched_tokens"})
        mk = [lambda n, kw=kw: encoder_client(n, pool, **kw)]
    elif kind == "rag_search":
        keys = ("num_vectors", "dim", "centroids", "nprobe", "points_per_probe", "top_k", "pq_m", "pq_bits",
                "hnsw_m", "ef_search")
        idx = {"index": f.string("index", "ivf_pq", choices=INDEXES), "dtype": f.string("dtype", "fp32")}
        for k in keys:
            if f.has(k):
                idx[k] = f.number(k, positive=True)
        f.check_unknown(_COMMON | set(keys) | {"index", "dtype"})
        mk = [lambda n: rag_search_client(n, pool, hardware, mns, devices, **idx)]
    elif kind == "kv_tier":
        kw = dict(bandwidth_gbs=f.number("bandwidth_gbs", positive=True), latency_us=f.number("latency_us"),
                  hit_rate=f.number("hit_rate", 0.0), kv_bytes_per_token=f.number("kv_bytes_per_token", None, positive=True),
                  tier=f.string("tier", ""), hardware=hardware, max_num_seqs=mns, devices=devices,
                  capacity_gb=f.number("capacity_gb", None, positive=True))
        f.check_unknown(_COMMON | {"bandwidth_gbs", "latency_us", "hit_rate", "kv_bytes_per_token", "tier",
                                   "capacity_gb"})
        mk = [lambda n: kv_tier_client(n, pool, **kw)]
    elif kind == "cpu":
        kw = dict(base_ms=f.number("serve_base_ms", 0.0), per_item_ms=f.number("serve_per_item_ms", 0.0),
                  per_token_us=f.number("serve_per_token_us", 0.0), hardware=hardware, max_num_seqs=mns,
                  devices=devices)
        f.check_unknown(_COMMON | {"serve_base_ms", "serve_per_item_ms", "serve_per_token_us"})
        mk = [lambda n: cpu_client(n, pool, **kw)]
    elif kind == "link":
        kw = dict(bandwidth_gbs=f.number("bandwidth_gbs", positive=True), latency_us=f.number("latency_us", 0.0),
                  kv_bytes_per_token=f.number("kv_bytes_per_token", None, positive=True),
                  layers=f.number("layers", 1, integer=True, positive=True), max_num_seqs=mns, hardware=hardware)
        f.check_unknown(_COMMON | {"bandwidth_gbs", "latency_us", "kv_bytes_per_token", "layers"})
        mk = [lambda n: link_client(n, pool, **kw)]
    else:  # pragma: no cover - guarded by the caller
        raise SpecError(where, f"{f.prefix}kind", f"'{kind}' is not a stage kind", f"use one of {STAGE_KINDS}")
    out = []
    for i in range(count):
        try:
            out.append(mk[0](name if count == 1 else f"{name}{i}"))
        except SpecError as e:
            raise SpecError(where, f"{f.prefix}{e.field}", e.problem, e.fix) from None
    return out


WORKLOAD_EXTRAS = ("reasoning", "kv_retrieval")


def pop_workload_extras(data: dict) -> tuple[dict, dict]:
    """Split the stage-level workload options (reasoning, kv_retrieval) off a config mapping."""
    data = dict(data)
    w = data.get("workload")
    extras = {}
    if isinstance(w, dict):
        w = dict(w)
        for k in WORKLOAD_EXTRAS:
            if k in w:
                extras[k] = w.pop(k)
        data["workload"] = w
    return data, extras


# ------------------------------------------------------------------------------ validation
def _llm_model_of_pool(dep: Deployment, pool: str) -> ClientSpec | None:
    return next((c for c in dep.clients if c.pool == pool and c.kind == "llm" and c.stage is None), None)


def _link_between(dep: Deployment, a: str, b: str) -> LinkSpec | None:
    return next((ln for ln in dep.links if {ln.a, ln.b} == {a, b}), None)


def validate(dep: Deployment, where: str | None = None) -> None:
    """Reject an inconsistent deployment with a message naming the part: a stage with no client, an
    LLM client whose model does not fit its device, a KV tier with no link to the pools reading it."""
    from ..cost.memory import DoesNotFit, plan_memory
    from ..specs.model import Precision

    where = where or dep.name
    pools = {c.pool for c in dep.clients}
    for p in dep.pipelines:
        for k, s in enumerate(p.stages):
            if s.pool not in pools:
                raise SpecError(where, f"pipelines.{p.name}.stages[{k}].pool", f"stage pool '{s.pool}' has no client",
                                f"add a client with pool: {s.pool}, or use one of {', '.join(sorted(pools))}")
    for cs in dep.clients:
        if cs.kind != "llm":
            continue
        m = get_model(cs.model)
        dev = get_hardware(cs.hardware)
        dp = m.default_precision
        prec = Precision(weight=cs.dtype or dp.weight, kv=cs.kv_cache_dtype or dp.kv, act=dp.act,
                         expert_weight=cs.dtype or dp.expert_weight)
        chunked = str(cs.policy).lower() == "chunked"
        mbt = cs.max_num_batched_tokens or (8192 if chunked else max(m.max_context, 8192) if m.max_context <= 32768
                                            else 32768)
        mbt = min(mbt, 16384)
        try:
            plan_memory(m, dev, prec, tp=cs.tp, pp=cs.pp, ep=cs.ep, max_num_batched_tokens=mbt,
                        max_num_seqs=cs.max_num_seqs, memory_utilization=cs.memory_utilization)
        except DoesNotFit as e:
            raise DoesNotFit(where, f"clients.{cs.name}", f"{m.name} does not fit {dev.name} (tp={cs.tp}, pp={cs.pp}): "
                             f"{e.problem}", e.fix) from None
    for cs in dep.clients:
        if not cs.stage or cs.stage["kind"] != "kv_tier":
            continue
        for reader in _readers(dep, cs.pool):
            if _link_between(dep, cs.pool, reader) is None:
                raise SpecError(where, f"clients.{cs.name}",
                                f"KV tier '{cs.stage['tier']}' (pool '{cs.pool}') has no link to pool '{reader}' "
                                "that reads it", f"add links: [{{a: {cs.pool}, b: {reader}, bandwidth_gbs: ..., "
                                "latency_us: ...}]")


def _readers(dep: Deployment, pool: str) -> list[str]:
    """Pools of the stages that directly follow a stage served by `pool`."""
    out = []
    for p in dep.pipelines:
        for k, s in enumerate(p.stages[:-1]):
            if s.pool == pool and p.stages[k + 1].pool not in out:
                out.append(p.stages[k + 1].pool)
    return out


def _upstream(dep: Deployment, pool: str) -> list[str]:
    out = []
    for p in dep.pipelines:
        for k, s in enumerate(p.stages[1:], 1):
            if s.pool == pool and p.stages[k - 1].pool not in out:
                out.append(p.stages[k - 1].pool)
    return out


# ------------------------------------------------------------------------------ finalize
def finalize(dep: Deployment, where: str | None = None) -> Deployment:
    """Validate, then fill the costs of stage clients that depend on their neighbours: KV tiers
    (reading model's KV bytes per token, link bandwidth) and shared links (the sending model's
    KV; free links on both sides)."""
    validate(dep, where)
    where = where or dep.name
    dep = replace(dep, clients=[copy.copy(c) for c in dep.clients], links=list(dep.links))
    for cs in dep.clients:
        cs.stage = dict(cs.stage) if cs.stage else None
        if not cs.stage:
            continue
        if cs.stage["kind"] == "kv_tier" and cs.stage.get("effective_gbs") is None:
            readers = _readers(dep, cs.pool)
            kvb = cs.stage.get("kv_bytes_per_token")
            link_gbs = cs.stage.get("link_gbs")
            for r in readers:
                llm = _llm_model_of_pool(dep, r)
                if kvb is None and llm is not None:
                    kvb = kv_bytes_per_token(llm.model, llm.tp, llm.pp, llm.kv_cache_dtype)
                ln = _link_between(dep, cs.pool, r)
                if ln is not None:
                    link_gbs = ln.bandwidth_gbs if link_gbs is None else min(link_gbs, ln.bandwidth_gbs)
            if kvb is None:
                raise SpecError(where, f"clients.{cs.name}.kv_bytes_per_token",
                                "cannot tell whose KV this tier holds (no LLM stage reads it)",
                                "set kv_bytes_per_token, or put an LLM stage right after the tier in a pipeline")
            _set_tier_costs(cs, kvb, link_gbs)
        elif cs.stage["kind"] == "link":
            ups = _upstream(dep, cs.pool)
            if cs.stage.get("kv_bytes_per_token") is None:
                llm = next((x for u in ups if (x := _llm_model_of_pool(dep, u)) is not None), None)
                if llm is None:
                    raise SpecError(where, f"clients.{cs.name}.kv_bytes_per_token",
                                    "no LLM stage before this link stage", "set kv_bytes_per_token")
                _set_link_costs(cs, kv_bytes_per_token(llm.model, llm.tp, llm.pp, llm.kv_cache_dtype))
            for other in ups + _readers(dep, cs.pool):
                if _link_between(dep, cs.pool, other) is None:
                    dep.links.append(LinkSpec(cs.pool, other, FREE_LINK_GBS, 0.0))
    return dep


# ------------------------------------------------------------------------------ workloads
def _as_dict(requests) -> dict:
    if hasattr(requests, "to_numpy"):
        return requests.to_numpy(valid_only=True)
    return {k: np.asarray(v) for k, v in dict(requests).items()}


def _draw_lengths(spec: Any, n: int, seed: int) -> np.ndarray:
    from ..workload.synthetic import length_from_spec

    return np.asarray(length_from_spec(spec, "reasoning.extra_tokens").sample(seed, n), dtype=np.int64)


def apply_reasoning(requests, multiplier: float | None = None, extra_tokens: Any = None, branches: int = 1,
                    seed: int = 0) -> dict:
    """Reasoning: output x multiplier (thinking = (multiplier - 1) x answer tokens), or + extra
    thinking tokens drawn per branch from a length spec; `branches` parallel branches per request
    sharing its prefill KV. Returns numpy columns with `parent` (the original request's index)."""
    d = _as_dict(requests)
    n = len(d["arrival"])
    if multiplier is not None and multiplier < 1:
        raise SpecError("<workload>", "reasoning.multiplier", f"{multiplier} < 1", "use >= 1 (1 = no thinking)")
    if branches < 1 or int(branches) != branches:
        raise SpecError("<workload>", "reasoning.branches", f"{branches} is not a positive integer", "use 1, 2, 4 ...")
    b = int(branches)
    rep = lambda a: np.repeat(np.asarray(a), b, axis=0)  # noqa: E731
    out = {k: rep(v) for k, v in d.items() if np.ndim(v) >= 1 and len(v) == n}
    parent = np.repeat(np.arange(n), b)
    branch = np.tile(np.arange(b), n)
    o = out["output_tokens"].astype(np.int64)
    if multiplier is not None:
        o = np.maximum(np.round(o * float(multiplier)).astype(np.int64), 1)
    if extra_tokens is not None:
        o = o + np.maximum(_draw_lengths(extra_tokens, n * b, seed), 0)
    out["output_tokens"] = o
    inp = out["input_tokens"].astype(np.int64)
    cached = np.asarray(out.get("cached_tokens", np.zeros(n * b)), np.int64)
    out["cached_tokens"] = np.where(branch > 0, np.maximum(inp - 1, 0), cached)
    old_ph = out.get("prefix_hash")
    if b > 1 or old_ph is None or np.all(np.asarray(old_ph)[:, 0] < 0):
        # branches of one request share a prefix key, so prefix-affinity routing co-locates them (and
        # requests without a trace prefix get their own key, which spreads them over the pool)
        ph = np.full((n * b, 1), -1, np.int64)
        ph[:, 0] = parent
        out["prefix_hash"] = ph
    out["parent"] = parent
    out["branch"] = branch
    return out


def trace_tier_hits(prefix_hash, input_tokens, tiers: list[tuple[str, int]], block_tokens: int = 512):
    """Trace-driven tier hits: (tier index or -1, cached tokens) per request, replaying prefix-block
    hash ids through the tiers' LRU caches (`tiers`: (pool, capacity in blocks), closest first;
    see `prefix_cache.replay_lru_tiers`)."""
    from .prefix_cache import replay_lru_tiers

    return replay_lru_tiers(prefix_hash, input_tokens, [cap for _, cap in tiers], block_tokens)


def assign_kv_hits(requests, dep: Deployment, context_tokens: int = 0, cached_fraction: float = 0.0,
                   seed: int = 0, hit_rates: dict | None = None, trace_hits: bool = False,
                   block_tokens: int = 512) -> dict:
    """Decide per request which KV tier it hits (seeded; tiers in client order, each tier's hit rate
    conditional on missing the ones before) and route it to the pipeline that starts at that tier's
    pool with its cached tokens set; a miss everywhere takes the pipeline that starts with no tier
    (recompute, cached = 0). `context_tokens` are prepended to every prompt (the cached context);
    `cached_fraction` of the original prompt counts as cached too on a hit."""
    d = _as_dict(requests)
    n = len(d["arrival"])
    tiers = []
    for cs in dep.clients:
        if cs.stage and cs.stage["kind"] == "kv_tier" and cs.pool not in [t[0] for t in tiers]:
            hr = (hit_rates or {}).get(cs.pool, cs.stage["hit_rate"])
            tiers.append((cs.pool, float(hr)))
    if not tiers:
        raise SpecError(dep.name, "workload.kv_retrieval", "no client of kind kv_tier", "add a kv_tier client")
    first = {}
    for pi, p in enumerate(dep.pipelines):
        first.setdefault(p.stages[0].pool, pi)
    tier_pools = {t[0] for t in tiers}
    miss_pipe = next((pi for pi, p in enumerate(dep.pipelines) if p.stages[0].pool not in tier_pools), None)
    for pool, _ in tiers:
        if pool not in first:
            raise SpecError(dep.name, "pipelines", f"no pipeline starts at KV tier pool '{pool}'",
                            f"add a pipeline with stages [{{pool: {pool}}}, {{pool: <llm pool>}}]")
    if miss_pipe is None:
        raise SpecError(dep.name, "pipelines", "no recompute pipeline (one that starts without a KV tier)",
                        "add a pipeline whose first stage is the LLM pool")
    pipe = np.full(n, miss_pipe, np.int64)
    inp = np.asarray(d["input_tokens"], np.int64)
    if trace_hits:
        ph = d.get("prefix_hash")
        if ph is None or np.asarray(ph).max() < 0:
            raise SpecError(dep.name, "workload.kv_retrieval.hits", "trace-driven hits need prefix hash ids",
                            "use a trace with hash_ids (Mooncake format) or give hit_rate per tier")
        caps = []
        for pool, _ in tiers:
            cs = next(c for c in dep.clients if c.pool == pool)
            cap_gb, kvb = cs.stage.get("capacity_gb"), cs.stage.get("kv_bytes_per_token")
            if not cap_gb or not kvb:
                raise SpecError(dep.name, f"clients.{cs.name}.capacity_gb",
                                "trace-driven hits need the tier's capacity and KV bytes per token",
                                "set capacity_gb on the kv_tier client")
            caps.append((pool, max(int(cap_gb * 1e9 // (kvb * block_tokens)), 1)))
        which, tcached = trace_tier_hits(ph, inp, caps, block_tokens)
        hit = which >= 0
        for j, (pool, _) in enumerate(tiers):
            pipe[which == j] = first[pool]
        d["input_tokens"] = inp + int(context_tokens)
        d["cached_tokens"] = np.where(hit, np.minimum(tcached + int(context_tokens), d["input_tokens"] - 1), 0)
        d["pipeline"] = pipe
        return d
    rng = np.random.default_rng(seed)
    u = rng.random((n, len(tiers)))
    hit = np.zeros(n, bool)
    for j, (pool, hr) in enumerate(tiers):
        now = ~hit & (u[:, j] < hr)
        pipe[now] = first[pool]
        hit |= now
    cached = np.floor(inp * float(cached_fraction)).astype(np.int64) + int(context_tokens)
    d["input_tokens"] = inp + int(context_tokens)
    d["cached_tokens"] = np.where(hit, np.minimum(cached, d["input_tokens"] - 1), 0)
    d["pipeline"] = pipe
    return d


def apply_extras(dep: Deployment, requests, extras: dict, where: str, seed: int = 0):
    """Apply the config's `workload.reasoning` / `workload.kv_retrieval` tables."""
    from ..specs._toml import Fields

    d = _as_dict(requests)
    if "reasoning" in extras:
        f = Fields(extras["reasoning"] or {}, where, "workload.reasoning.")
        d = apply_reasoning(d, multiplier=f.number("multiplier", None, positive=True),
                            extra_tokens=f.raw("extra_tokens", None),
                            branches=f.number("branches", 1, integer=True, positive=True),
                            seed=f.number("seed", seed, integer=True))
        f.check_unknown({"multiplier", "extra_tokens", "branches", "seed"})
    if "kv_retrieval" in extras:
        f = Fields(extras["kv_retrieval"] or {}, where, "workload.kv_retrieval.")
        hits = f.string("hits", "rate", choices=("rate", "trace"))
        d = assign_kv_hits(d, dep, context_tokens=f.number("context_tokens", 0, integer=True),
                           cached_fraction=f.number("cached_fraction", 0.0), seed=f.number("seed", seed, integer=True),
                           trace_hits=hits == "trace",
                           block_tokens=f.number("block_tokens", 512, integer=True, positive=True))
        f.check_unknown({"context_tokens", "cached_fraction", "seed", "hits", "block_tokens"})
    return d


# ------------------------------------------------------------------------------ results
def parent_frame(df, parent) -> "Any":
    """Fold per-branch result rows into one row per original request: arrival, first_token (the
    earliest branch's), finish (the last branch's), ttft, e2e, output_tokens (summed), tpot of the
    slowest branch, branches, completed (all branches). `parent` is indexed by request_id."""
    import pandas as pd

    par = np.asarray(parent)[df["request_id"].to_numpy()]
    g = df.assign(parent=par).groupby("parent", sort=True)
    out = pd.DataFrame({
        "arrival": g["arrival"].first(), "first_token": g["first_token"].min(),
        "finish": g["finish"].max(), "output_tokens": g["output_tokens"].sum(), "tpot": g["tpot"].max(),
        "branches": g.size(), "completed": g["completed"].all(),
    })
    out["finish"] = np.where(out["completed"], out["finish"], np.nan)
    out["ttft"] = out["first_token"] - out["arrival"]
    out["e2e"] = out["finish"] - out["arrival"]
    return out.reset_index()


def goodput(df, ttft_ms: float = 250.0, tpot_ms: float = 25.0) -> dict:
    """Good requests (TTFT and TPOT within the SLO) per second of the run, and their fraction."""
    done = df[df["completed"]]
    dur = float(done["finish"].max() - df["arrival"].min()) if len(done) else float("nan")
    tp = done["tpot"].to_numpy()
    ok = (done["ttft"].to_numpy() * 1e3 <= ttft_ms) & (~np.isfinite(tp) | (tp * 1e3 <= tpot_ms))
    g = int(ok.sum())
    return {"good": g, "goodput_fraction": g / len(df) if len(df) else float("nan"),
            "goodput_rps": g / dur if dur and dur > 0 else float("nan")}


# ------------------------------------------------------------------------------ running at fixed capacities
#: engine capacities shared by the tests and the case studies' --quick modes (one compiled program)
QUICK_CAPS = dict(num_requests=32, num_clients=8, slots=16, window=16, queue=64, stages=5, pools=5, pipelines=3,
                  stretch=16)


def simulate_at(dep: Deployment, requests, caps: dict, seed: int = 0, slo: dict | None = None):
    """Lower `dep` on `requests` padded to the capacities `caps` (keyword arguments of
    `mist.lowering.deployment.lower`; clients' max_num_seqs clipped to `slots`) and run it: configs with equal capacities share one compiled
    engine. Returns (requests DataFrame, summary dict, Lowered)."""
    import jax

    from ..engine.run import simulate_arrays
    from ..results import SLO, requests_frame, summarize
    from .deployment import lower

    if caps.get("slots"):  # batch limits above the engine's slots are clipped to them
        dep = replace(dep, clients=[replace(c, max_num_seqs=min(c.max_num_seqs, caps["slots"])) for c in dep.clients])
    lo = lower(dep, requests, **caps)
    st, stats = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload, key=jax.random.PRNGKey(seed))
    st = jax.device_get(st)
    df = requests_frame(lo, st)
    return df, summarize(lo, st, stats, SLO(**(slo or {})), df=df), lo


__all__ = ["QUICK_CAPS", "simulate_at", "STAGE_KINDS", "kv_bytes_per_token", "search_time", "search_costs", "encoder_client", "rag_search_client",
           "kv_tier_client", "cpu_client", "link_client", "parse_stage_client", "pop_workload_extras", "validate",
           "finalize", "apply_reasoning", "assign_kv_hits", "apply_extras", "parent_frame", "goodput", "math"]
