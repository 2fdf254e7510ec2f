"""Prefix caching as cached-token counts per request, decided before the scan.

Two modes: a given hit rate (a fraction of each prompt, rounded down to whole blocks), or trace
hash ids (Mooncake-style prefix-block ids) replayed through a bounded LRU cache of blocks in
arrival order. The LRU replay assumes prefix-affinity routing (a prefix always reaches the same
replica, so the replicas' caches act as one cache of their summed capacity) and that a block
enters the cache when its request arrives; both are stated in the results' notes.
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
                       block_tokens: int = 512) -> np.ndarray:
    """Replay prefix-block ids through one LRU of `capacity_blocks`; a request's cached tokens are
    its leading run of blocks found in the cache (times `block_tokens`, at most prompt - 1)."""
    return replay_lru_tiers(prefix_hash, input_tokens, [capacity_blocks], block_tokens)[1]
