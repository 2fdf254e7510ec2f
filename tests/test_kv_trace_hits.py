"""Trace-driven KV-tier hits: prefix-block hash ids replayed through per-tier LRU caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mist  # noqa: F401
from mist.lowering.config import load_config
from mist.lowering.stages import trace_tier_hits
from mist.specs.errors import SpecError

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_hand_replay_two_tiers():
    # tier 0 holds 2 blocks, tier 1 holds 100 (inclusive: every touched block enters both)
    hashes = np.array([[1, 2, 3], [1, 2, 4], [2, 3, -1], [9, -1, -1]])
    inp = np.array([2000, 2000, 2000, 300])
    which, cached = trace_tier_hits(hashes, inp, [("dram", 2), ("ssd", 100)], block_tokens=512)
    # r0: nothing cached. tier 0 then holds {2, 3}; tier 1 {1, 2, 3}
    # r1: block 1 only in tier 1, whose leading run is 1, 2 -> 1024 tokens; tier 0 becomes {2, 4}
    # r2: block 2 in tier 0, then 3 is not -> 512 tokens; r3: a new block -> miss
    assert which.tolist() == [-1, 1, 0, -1]
    assert cached.tolist() == [0, 1024, 512, 0]


def test_cached_never_reaches_the_whole_prompt():
    which, cached = trace_tier_hits(np.array([[5, 6], [5, 6]]), np.array([1024, 700]), [("t", 10)], 512)
    assert which.tolist() == [-1, 0] and cached.tolist() == [0, 699]


def test_config_with_trace_hits():
    cfg = load_config(CONFIGS / "kv_retrieval_trace.yaml")
    d = cfg.requests
    pipes = np.asarray(d["pipeline"])
    cached = np.asarray(d["cached_tokens"])
    assert set(np.unique(pipes)) <= {0, 1, 2}
    assert (pipes != 2).any(), "the Mooncake sample reuses prefixes: some requests must hit a tier"
    assert (cached[pipes == 2] == 0).all() and (cached[pipes != 2] > 0).all()
    assert (cached % 512 == 0).all() or (cached < np.asarray(d["input_tokens"])).all()


def test_trace_hits_need_hash_ids(tmp_path):
    text = (CONFIGS / "kv_retrieval_trace.yaml").read_text().replace("trace: mooncake_conversation",
                                                                      "trace: azure_conv_2023")
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SpecError, match="hits"):
        load_config(p)
