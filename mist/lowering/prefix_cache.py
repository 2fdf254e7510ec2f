"""Prefix caching as cached-token counts per request, decided before the scan.

Two modes: a given hit rate (a fraction of each prompt, rounded down to whole blocks), or trace
hash ids (Mooncake-style prefix-block ids) replayed through a bounded LRU cache of blocks in
arrival order, one cache per client. The replica a request reaches is the one the engine's router
will pick when that choice does not depend on the simulation's state: the LLM pool serves the
first stage of the request's pipeline and routes round-robin (the k-th request routed there goes
to member k mod n) or by prefix affinity (first block id mod n, round-robin without one). Otherwise
(least-outstanding routing, or an LLM stage behind other stages) the pool's replicas share one
cache of their summed capacity. A block enters the cache when its request arrives.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def cached_from_hit_rate(input_tokens: np.ndarray, hit_rate: float, block_tokens: int = 16) -> np.ndarray:
    """Cached tokens when a fraction `hit_rate` of every prompt (whole blocks, never all of it) hits."""
    if not 0.0 <= hit_rate <= 1.0:
        from ..specs.errors import SpecError

        raise SpecError("<workload>", "prefix_cache_hit_rate", f"{hit_rate} is not in [0, 1]", "use e.g. 0.5")
    inp = np.asarray(input_tokens, dtype=np.int64)
    c = (np.floor(inp * hit_rate / block_tokens) * block_tokens).astype(np.int64)
    return np.minimum(c, np.maximum(inp - 1, 0))


def replay_lru_tiers(prefix_hash: np.ndarray, input_tokens: np.ndarray, capacities: list[int],
                     block_tokens: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Replay prefix-block ids, in arrival order, through an inclusive hierarchy of LRU caches (one
    per capacity, in blocks, closest first). A request hits the first cache holding its leading
    block; its cached tokens are the leading run of its blocks found there (times `block_tokens`,
    at most prompt - 1). Every block a request touches enters (or refreshes) every cache, evicting
    the least recently used beyond capacity. Returns (cache index or -1, cached tokens) per request."""
    lrus = [OrderedDict() for _ in capacities]
    ph = np.asarray(prefix_hash)
    n = len(input_tokens)
    which = np.full(n, -1, np.int64)
    cached = np.zeros(n, np.int64)
    for i in range(n):
        ids = [int(h) for h in ph[i] if h >= 0]
        for j, lru in enumerate(lrus):
            run = 0
            for h in ids:
                if h not in lru:
                    break
                run += 1
            if run:
                which[i] = j
                cached[i] = min(run * block_tokens, max(int(input_tokens[i]) - 1, 0))
                break
        for cap, lru in zip(capacities, lrus):
            for h in ids:
                if h in lru:
                    lru.move_to_end(h)
                else:
                    lru[h] = None
                    if len(lru) > cap:
                        lru.popitem(last=False)
    return which, cached


def cached_from_hashes(prefix_hash: np.ndarray, input_tokens: np.ndarray, capacity_blocks: int,
                       block_tokens: int = 512, clients: np.ndarray | None = None,
                       replicas: dict | None = None) -> np.ndarray:
    """Replay prefix-block ids through an LRU of `capacity_blocks` per client. `clients[i]` is the
    cache request i reaches (-1: none, nothing cached; None: one cache for all), `replicas[c]` how
    many clients' capacity cache c pools (default 1). A request's cached tokens are its leading run
    of blocks found in its cache (times `block_tokens`, at most prompt - 1)."""
    ph, inp = np.asarray(prefix_hash), np.asarray(input_tokens)
    if clients is None:
        return replay_lru_tiers(ph, inp, [capacity_blocks], block_tokens)[1]
    clients = np.asarray(clients)
    out = np.zeros(len(inp), np.int64)
    for c in np.unique(clients[clients >= 0]):
        rows = np.flatnonzero(clients == c)
        cap = capacity_blocks * (replicas or {}).get(int(c), 1)
        out[rows] = replay_lru_tiers(ph[rows], inp[rows], [cap], block_tokens)[1]
    return out


def predicted_clients(dep, pipeline: np.ndarray, prefix_hash: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """(cache id per request, {cache id: replicas whose capacity it pools}): the client each request's
    LLM stage will reach when the router decides it from arrival order alone (see the module doc),
    else one shared cache per pool (its replicas acting as one cache of their summed capacity);
    -1 for requests that reach no LLM."""
    from ..engine.tables import Router
    from .deployment import ROUTERS

    pipeline = np.asarray(pipeline, np.int64)
    n = len(pipeline)
    pk = (np.asarray(prefix_hash)[:, 0] if prefix_hash is not None and np.asarray(prefix_hash).ndim == 2
          else np.full(n, -1))
    llm_pools = {c.pool for c in dep.clients if c.kind == "llm"}
    all_pools = sorted({s.pool for p in dep.pipelines for s in p.stages})
    # per pipeline: (pool of its first LLM stage, its members, router, whether arrival order decides)
    plan = []
    for p in dep.pipelines:
        k = next((k for k, s in enumerate(p.stages) if s.pool in llm_pools), None)
        if k is None:
            plan.append(None)
            continue
        pool = p.stages[k].pool
        router = ROUTERS.get(str(dep.routers.get(pool, "round-robin")).lower(), Router.ROUND_ROBIN)
        plan.append((pool, [j for j, c in enumerate(dep.clients) if c.pool == pool], router,
                     k == 0 and router != Router.LEAST_OUTSTANDING))
    cache = np.full(n, -1, np.int64)
    sizes = {}
    rr: dict[str, int] = {}
    for i in range(n):
        if plan[int(pipeline[i])] is None:
            continue
        pool, members, router, by_order = plan[int(pipeline[i])]
        if not by_order:  # the pool's replicas pool their caches
            cache[i] = len(dep.clients) + all_pools.index(pool)
            sizes[int(cache[i])] = len(members)
            continue
        if router == Router.PREFIX_AFFINITY and pk[i] >= 0:
            k = int(pk[i]) % len(members)
        else:
            k = rr.get(pool, 0) % len(members)
            rr[pool] = rr.get(pool, 0) + 1
        cache[i] = members[k]
        sizes[int(cache[i])] = 1
    return cache, sizes
