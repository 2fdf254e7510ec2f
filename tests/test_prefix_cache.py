"""Prefix caching from trace hash ids: one LRU per replica the router will pick, hand-computed."""

from __future__ import annotations

import numpy as np

from mist.lowering import Deployment
from mist.lowering.prefix_cache import cached_from_hashes, predicted_clients

# four requests of 2000 tokens; first prefix blocks 1, 1, 1, 2 (block ids, -1 pads)
HASH = np.array([[1, 7], [1, 7], [1, 8], [2, -1]])
INP = np.full(4, 2000)
PIPE = np.zeros(4, np.int64)
BT = 512  # tokens per prefix block


def cached(router: str, capacity: int = 8):
    dep = Deployment.single("llama-3.1-8b", "h100", replicas=2, router=router)
    clients, replicas = predicted_clients(dep, PIPE, HASH)
    return clients, cached_from_hashes(HASH, INP, capacity, BT, clients=clients, replicas=replicas)


def test_round_robin_replicas_keep_their_own_cache():
    clients, c = cached("round-robin")
    assert clients.tolist() == [0, 1, 0, 1]  # the k-th arrival goes to replica k mod 2
    # r0 misses on replica 0; r1 misses on replica 1 (its own cache), r2 finds [1, 7] on replica 0: block
    # 1 hits, block 8 does not; r3's block 2 was never seen
    assert c.tolist() == [0, 0, BT, 0]


def test_prefix_affinity_sends_a_prefix_to_one_cache():
    clients, c = cached("prefix-affinity")
    assert clients.tolist() == [1, 1, 1, 0]  # first block id mod 2
    assert c.tolist() == [0, 2 * BT, BT, 0]  # r1 repeats r0's two blocks; r2 shares the first


def test_state_dependent_router_shares_one_cache_of_summed_capacity():
    clients, c = cached("least-outstanding", capacity=1)
    assert len(set(clients.tolist())) == 1  # one pooled cache
    # capacity 1 block per replica, 2 pooled: r0 inserts 1, 7; r1 hits both; r2 hits 1 (then 8 evicts 7)
    assert c.tolist() == [0, 2 * BT, BT, 0]
    one = cached_from_hashes(HASH, INP, 1, BT)  # a single replica's capacity keeps only the last block
    assert one.tolist() == [0, 0, 0, 0]
