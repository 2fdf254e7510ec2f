"""Simulation config files (YAML or TOML): deployment (clients, pools, pipelines, links, routers),
workload (bundled or user trace, or synthetic) and engine options, validated with errors that name
the file, the field and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..specs._toml import Fields, read_spec_file
from ..specs.errors import SpecError
from .deployment import POLICIES, ROLES, ROUTERS, ClientSpec, Deployment, LinkSpec, PipelineSpec, StageSpec
from .prefix_cache import cached_from_hashes, cached_from_hit_rate, predicted_clients

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

_CLIENT_KEYS = {"name", "count", "pool", "hardware", "model", "kind", "tp", "pp", "ep", "dtype", "kv_cache_dtype",
                "policy", "role", "max_num_seqs", "max_num_batched_tokens", "chunk_size", "block_size",
                "memory_utilization", "max_model_len", "serve_base_ms", "serve_per_item_ms", "serve_per_token_us",
                "devices", "step_noise_sigma", "preemption_mode", "gemm_stack", "cpu_stack"}


@dataclass
class EngineOptions:
    stretch: int = 64
    seed: int = 0
    seeds: int = 1
    slots: int | None = None
    window: int | None = None
    queue: int | None = None
    # arrivals admitted inside one decode stretch (EngineDims.absorb); None: the default (8 for a
    # lone chunked-prefill client in `simulate`, mist.sweep.lowering.SWEEP_ABSORB in sweeps)
    absorb: int | None = None


@dataclass
class SimConfig:
    deployment: Deployment
    requests: Any  # mist.workload.Requests
    engine: EngineOptions = field(default_factory=EngineOptions)
    slo: dict = field(default_factory=dict)
    path: str = "<config>"
    notes: dict = field(default_factory=dict)


def parse_client(f: Fields, where: str) -> list[ClientSpec]:
    from .stages import STAGE_KINDS, parse_stage_client

    if str(f.data.get("kind", "llm")).lower() in STAGE_KINDS:
        return parse_stage_client(f, where)
    count = f.number("count", 1, integer=True, positive=True)
    name = f.string("name")
    kind = f.string("kind", "llm", choices=("llm", "server") + STAGE_KINDS)
    pol = f.string("policy", "chunked", choices=tuple(POLICIES))
    role = f.string("role", "both", choices=tuple(ROLES))
    base = dict(
        pool=f.string("pool", name), hardware=f.string("hardware", "h100"), model=f.string("model", None),
        kind=kind, tp=f.number("tp", 1, integer=True, positive=True), pp=f.number("pp", 1, integer=True, positive=True),
        ep=f.number("ep", 1, integer=True, positive=True), dtype=f.string("dtype", None),
        kv_cache_dtype=f.string("kv_cache_dtype", None), policy=pol, role=role,
        max_num_seqs=f.number("max_num_seqs", 256, integer=True, positive=True),
        max_num_batched_tokens=f.number("max_num_batched_tokens", None, integer=True, positive=True),
        chunk_size=f.number("chunk_size", None, integer=True, positive=True),
        block_size=f.number("block_size", 16, integer=True, positive=True),
        memory_utilization=f.number("memory_utilization", 0.9, positive=True),
        max_model_len=f.number("max_model_len", None, integer=True, positive=True),
        serve_base=f.number("serve_base_ms", 0.0) * 1e-3, serve_per_item=f.number("serve_per_item_ms", 0.0) * 1e-3,
        serve_per_token=f.number("serve_per_token_us", 0.0) * 1e-6,
        devices=f.number("devices", None, integer=True, positive=True),
        step_noise_sigma=f.number("step_noise_sigma", None),
        gemm_stack=f.string("gemm_stack", None),
        cpu_stack=f.string("cpu_stack", None),
        preemption_mode=f.string("preemption_mode", "recompute", choices=("recompute", "swap")),
    )
    f.check_unknown(_CLIENT_KEYS)
    if kind == "llm" and not base["model"]:
        raise SpecError(where, f"{f.prefix}model", "an llm client needs a model", "add model: <catalog name>")
    return [ClientSpec(name=name if count == 1 else f"{name}{i}", **base) for i in range(count)]


def load_workload(f: Fields | None, where: str, base_dir: Path, dep: Deployment | None = None):
    """Requests from a `workload` table: a trace (bundled name or path) or a synthetic spec. With
    `dep`, trace prefix hashes are replayed through one LRU per replica the router will pick (see
    `prefix_cache.predicted_clients`); without, through one cache."""
    from ..workload import bundled_trace, bundled_trace_names, generate, load_trace

    if f is None:
        raise SpecError(where, "workload", "missing", "add a workload table (trace: azure_conv_2023, or synthetic)")
    opts = {}
    for k in ("start_s", "end_s", "rate", "speed"):
        if f.has(k):
            opts[k] = f.number(k)
    for k in ("first", "sample", "max_blocks"):
        if f.has(k):
            opts[k] = f.number(k, integer=True, positive=True)
    seed = f.number("seed", 0, integer=True)
    if f.has("trace"):
        tr = f.string("trace")
        if f.has("format"):
            opts["format"] = f.string("format")
        if "sample" in opts:
            opts["seed"] = seed
        if tr in bundled_trace_names():
            reqs = bundled_trace(tr, **opts)
        else:
            p = Path(tr)
            if not p.is_absolute():
                p = base_dir / p
            reqs = load_trace(p, **opts)
    else:
        n = f.number("num_requests", integer=True, positive=True)
        reqs = generate(seed, n, arrival=f.raw("arrival", {"kind": "poisson", "rate": 1.0}),
                        input=f.raw("input", 512), output=f.raw("output", 128))
    hit = f.number("prefix_cache_hit_rate", None)
    lru_blocks = f.number("prefix_cache_blocks", None, integer=True, positive=True)
    block_tokens = f.number("prefix_block_tokens", 512, integer=True, positive=True)
    mix = f.raw("pipeline_mix", None)
    f.check_unknown({"trace", "format", "start_s", "end_s", "rate", "speed", "first", "sample", "max_blocks", "seed",
                     "num_requests", "arrival", "input", "output", "prefix_cache_hit_rate", "prefix_cache_blocks",
                     "prefix_block_tokens", "pipeline_mix"})
    d = reqs.to_numpy(valid_only=True)
    if mix is not None:
        if not isinstance(mix, list) or not all(isinstance(x, (int, float)) and x >= 0 for x in mix) or sum(mix) <= 0:
            raise SpecError(where, "workload.pipeline_mix", "expected a list of non-negative weights per pipeline",
                            "write e.g. pipeline_mix: [0.5, 0.5]")
        rng = np.random.default_rng(seed)
        w = np.asarray(mix, dtype=float)
        d["pipeline"] = rng.choice(len(w), size=len(d["arrival"]), p=w / w.sum())
    if hit is not None:
        d["cached_tokens"] = cached_from_hit_rate(d["input_tokens"], hit)
    elif lru_blocks is not None:  # a capacity per replica
        clients, replicas = (None, None) if dep is None else predicted_clients(dep, d.get("pipeline", np.zeros(
            len(d["input_tokens"]), np.int64)), d.get("prefix_hash"))
        d["cached_tokens"] = cached_from_hashes(d["prefix_hash"], d["input_tokens"], lru_blocks, block_tokens,
                                                clients=clients, replicas=replicas)
    return d


def parse_config(data: dict, where: str = "<config>", base_dir: Path | None = None) -> SimConfig:
    from .stages import apply_extras, finalize, pop_workload_extras

    base_dir = base_dir or Path.cwd()
    data, extras = pop_workload_extras(data)
    f = Fields(data, where)
    name = f.string("name", Path(where).stem)
    clients: list[ClientSpec] = []
    for cf in f.tables("clients"):
        clients.extend(parse_client(cf, where))
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise SpecError(where, "clients", "client names are not unique", "give every client its own name")
    pools = {c.pool for c in clients}
    pipes = []
    for pf in f.tables("pipelines", [{"name": "default", "stages": [{"pool": sorted(pools)[0]}]}]):
        stages = []
        for sf in pf.tables("stages"):
            pool = sf.string("pool")
            if pool not in pools:
                raise SpecError(where, f"{sf.prefix}pool", f"no client serves pool '{pool}'",
                                f"add a client with pool: {pool}, or use one of {', '.join(sorted(pools))}")
            stages.append(StageSpec(pool=pool, extra_prompt=sf.number("extra_prompt", 0, integer=True),
                                    emits=bool(sf.raw("emits", False)), kv_transfer=bool(sf.raw("kv_transfer", False)),
                                    kv_layerwise=bool(sf.raw("kv_layerwise", False))))
            sf.check_unknown({"pool", "extra_prompt", "emits", "kv_transfer", "kv_layerwise", "name", "kind"})
        pipes.append(PipelineSpec(pf.string("name", f"pipeline{len(pipes)}"), stages))
        pf.check_unknown({"name", "stages"})
    routers = {}
    rt = f.table("routers", {})
    for pool in list(rt.data):
        if pool not in pools:
            raise SpecError(where, f"routers.{pool}", "no client serves this pool", f"use one of {', '.join(sorted(pools))}")
        routers[pool] = rt.string(pool, choices=tuple(ROUTERS))
    links = []
    for lf in f.tables("links", []):
        a, b = lf.string("a"), lf.string("b")
        for p in (a, b):
            if p not in pools:
                raise SpecError(where, f"{lf.prefix}a/b", f"pool '{p}' has no client",
                                f"use pools among {', '.join(sorted(pools))}")
        links.append(LinkSpec(a, b, lf.number("bandwidth_gbs", positive=True), lf.number("latency_us")))
        lf.check_unknown({"a", "b", "bandwidth_gbs", "latency_us", "name"})
    ef = f.table("engine", {})
    eng = EngineOptions(stretch=ef.number("stretch", 64, integer=True, positive=True),
                        seed=ef.number("seed", 0, integer=True), seeds=ef.number("seeds", 1, integer=True, positive=True),
                        slots=ef.number("slots", None, integer=True, positive=True),
                        window=ef.number("window", None, integer=True, positive=True),
                        queue=ef.number("queue", None, integer=True, positive=True),
                        absorb=ef.number("absorb", None, integer=True))
    ef.check_unknown({"stretch", "seed", "seeds", "slots", "window", "queue", "absorb"})
    slo = dict(f.raw("slo", {}) or {})
    f.check_unknown({"name", "clients", "pipelines", "routers", "links", "engine", "slo", "workload", "description"})
    dep = Deployment(clients=clients, pipelines=pipes, routers=routers, links=links, name=name)
    dep = finalize(dep, where)  # validation (stage pools, memory fit, tier links) and stage costs
    reqs = load_workload(f.table("workload", None), where, base_dir, dep)
    if len(pipes) > 1 and int(np.max(reqs["pipeline"])) >= len(pipes):
        raise SpecError(where, "workload.pipeline_mix", "names more pipelines than are defined", "fix the mix")
    if extras:
        reqs = apply_extras(dep, reqs, extras, where, eng.seed)
    return SimConfig(deployment=dep, requests=reqs, engine=eng, slo=slo, path=where)


def load_config(path: str | Path | None = None) -> SimConfig:
    """Load a simulation config file; None loads the bundled default."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    return parse_config(read_spec_file(p), str(p), p.parent)
