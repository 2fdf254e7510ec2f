"""The engine's inputs: static sizes, per-client tables and the topology, as array PyTrees.

Three kinds of input (see STYLE.md): static sizes (`EngineDims`, Python ints that are part of
the compiled program's identity), dynamic parameters (`ClientTable`, `Topology`: arrays that can
be stacked and vmapped, fitted or swept without recompiling), and the evolving `EngineState`.
"""

from __future__ import annotations

import dataclasses
from enum import IntEnum
from typing import NamedTuple

import equinox as eqx
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..cost.params import CostParams
from ..cost.replica import Replica


class Policy(IntEnum):
    """Batching policies (integer codes, so they can differ across a vmapped batch)."""

    STATIC = 0  # wait for a full batch (or the last arrivals), run it to completion
    CONTINUOUS = 1  # vLLM v0: admit new prompts whenever possible; prefill iterations pause decodes
    CHUNKED = 2  # Sarathi / vLLM v1: decodes first, then prefill chunks under a token budget
    DECODE_PRIORITY = 3  # request-level batching: admit only when the running batch has drained


class Role(IntEnum):
    """What an LLM client does with a request."""

    PREFILL_DECODE = 0  # colocated prefill and decode
    PREFILL_ONLY = 1  # disaggregated prefill: hand off after the first token
    DECODE_ONLY = 2  # disaggregated decode: KV arrives over a link


class Kind(IntEnum):
    LLM = 0  # iteration-level batching over a model replica
    SERVER = 1  # fixed-cost batches (CPU pre/post-processing, vector search, KV-tier reads)


class Router(IntEnum):
    ROUND_ROBIN = 0
    LEAST_OUTSTANDING = 1  # fewest outstanding tokens (queued + running)
    PREFIX_AFFINITY = 2  # the same first prefix block goes to the same client


class Reject(IntEnum):
    """Why a request was rejected (0 = not rejected); messages name the knob to change."""

    NONE = 0
    KV_CAPACITY = 1
    BATCH_TOKENS = 2
    CONTEXT_LENGTH = 3
    QUEUE_FULL = 4
    NO_CLIENT = 5


REJECT_MESSAGES = {
    Reject.KV_CAPACITY: "prompt + output exceed the client's KV-cache capacity (raise tp, use --kv-cache-dtype fp8, "
                        "or a device with more memory)",
    Reject.BATCH_TOKENS: "prompt longer than --max-num-batched-tokens without chunked prefill (enable "
                         "--enable-chunked-prefill or raise --max-num-batched-tokens)",
    Reject.CONTEXT_LENGTH: "prompt + output exceed the model's maximum context (--max-model-len)",
    Reject.QUEUE_FULL: "the client's queue was full (raise engine.queue in the config, default min(requests, 32768), "
                       "or add replicas)",
    Reject.NO_CLIENT: "no client serves this request's stage (check the deployment's pools)",
}


# Default queue capacity per client: every request when the workload is small, at most this many
# waiting entries per client otherwise (beyond it arrivals are rejected as QUEUE_FULL, with the knob
# named). A client with tens of thousands of waiting requests is far past saturation; the cap keeps
# per-step work and memory independent of the workload's length.
DEFAULT_QUEUE_CAP = 32768


def default_queue(num_requests: int) -> int:
    return int(min(max(num_requests, 16), DEFAULT_QUEUE_CAP))


# Queue entries considered per admission (EngineDims.window), unless a config sets engine.window. A
# step's work grows with it; an iteration admits at most this many, except on clients that admit in
# parts (chunked prefill without swapping, see engine.step.splits_admissions), where a full window is
# admitted and the entries behind it follow in further steps at the same time: no cap, only more
# steps in bursts, so they get a smaller window (bench_sweep.py, 64 configs x 10k requests,
# 2026-12-03: 15.1-15.3 s with 16 against 16.3 s with 64, the same results).
DEFAULT_WINDOW = 64
DEFAULT_WINDOW_IN_PARTS = 16


def policy_admits_in_parts(pol, role, is_llm):
    """Clients whose admissions can be split over several steps at one time without changing what
    is admitted (elementwise, NumPy or JAX): chunked-prefill LLM clients that prefill what they
    admit. Admission of the window's entries is then exactly the first part of the admission of a
    longer window: the token budget, KV blocks and slots the admitted rows take are what the next
    part sees them take (a decode-only client's arrivals would count a block of growth more there;
    exclusive policies prefill only what one step admitted)."""
    return is_llm & (pol == Policy.CHUNKED) & (role != Role.DECODE_ONLY)


def admits_in_parts(cl) -> bool:
    """Whether every enabled client of a (host) client table admits in parts
    (`policy_admits_in_parts`), with no swapping anywhere."""
    if cl.swap_bandwidth is not None:
        return False
    on = np.asarray(cl.enabled)
    return bool(np.all(policy_admits_in_parts(np.asarray(cl.policy), np.asarray(cl.role),
                                              np.asarray(cl.kind) == Kind.LLM)[on]))


def default_window(slots: int, in_parts: bool, window: int | None = None) -> int:
    """The admission window: `window` when given, else DEFAULT_WINDOW_IN_PARTS for clients that
    admit in parts (`in_parts`) and DEFAULT_WINDOW otherwise; never more than the slots."""
    return int(min(window or (DEFAULT_WINDOW_IN_PARTS if in_parts else DEFAULT_WINDOW), slots))


class EngineDims(NamedTuple):
    """Static sizes: part of the compiled program's identity."""

    num_requests: int  # N, request capacity (padded)
    num_clients: int  # C
    slots: int  # S, batch slots per client (>= every client's max_num_seqs)
    window: int  # A, queue entries considered per admission
    queue: int  # Q, queue capacity per client
    stages: int  # K, max stages per pipeline
    stretch: int  # W, max decode iterations advanced per scan step (1 = per-iteration mode)
    pools: int  # number of client pools
    pipelines: int  # number of pipelines
    itl_bins: int = 160  # bins of the inter-token-latency histogram (log-spaced)
    # arrivals admitted inside one decode stretch (0: none; only a lone chunked-prefill client uses it)
    absorb: int = 8
    # largest token count (decodes + the admitted prompt) of such an admitted iteration (table size)
    absorb_tokens: int = 8192


class ClientTable(eqx.Module):
    """Per-client parameters, leading axis C."""

    kind: Int[Array, "c"]
    role: Int[Array, "c"]
    policy: Int[Array, "c"]
    max_num_seqs: Int[Array, "c"]
    max_batched_tokens: Int[Array, "c"]
    chunk_size: Int[Array, "c"]  # longest prefill chunk of one request per iteration (chunked)
    block_size: Int[Array, "c"]  # KV block (page) size, tokens
    kv_blocks: Int[Array, "c"]  # KV-cache capacity, blocks
    max_model_len: Int[Array, "c"]  # tokens
    replica: Replica  # leaves [c]
    params: CostParams  # leaves [c]
    serve_base: Float[Array, "c"]  # SERVER clients: seconds per batch
    serve_per_item: Float[Array, "c"]  # seconds per request in the batch
    serve_per_token: Float[Array, "c"]  # seconds per prompt token in the batch
    kv_bytes_per_token: Float[Array, "c"]  # KV bytes per token of the whole replica (transfers)
    devices: Float[Array, "c"]  # devices in the replica
    power_busy: Float[Array, "c"]  # watts per device while busy
    power_idle: Float[Array, "c"]
    price_per_hour: Float[Array, "c"]  # USD per device-hour
    enabled: Bool[Array, "c"]  # padding clients are disabled
    # preemption by swapping (vLLM's --preemption-mode swap): bytes/s at which the replica moves KV to
    # and from host memory (0 = preempt by recompute); None = recompute everywhere
    swap_bandwidth: Float[Array, "c"] | None = None


def uniform_swap(tables: list) -> list:
    """Client tables to be stacked: give every one a swap_bandwidth array (zeros: recompute) when any
    has one, so that their tree structures agree."""
    if all(t.swap_bandwidth is None for t in tables):
        return list(tables)
    return [t if t.swap_bandwidth is not None else
            dataclasses.replace(t, swap_bandwidth=np.zeros(np.shape(t.enabled), np.float64)) for t in tables]


class Topology(eqx.Module):
    """Links between clients, pools of clients, and pipelines of stages."""

    link_latency: Float[Array, "c c"]  # seconds, from client i to client j
    link_bandwidth: Float[Array, "c c"]  # bytes/s
    pool_members: Bool[Array, "p c"]
    router: Int[Array, "p"]
    pipeline_pools: Int[Array, "np k"]  # pool serving stage k of pipeline np (-1: no stage)
    stage_extra_prompt: Int[Array, "np k"]  # tokens added to the prompt from stage k on (RAG documents)
    stage_emits: Bool[Array, "np k"]  # the stage's first token is the user's first token
    stage_kv_transfer: Bool[Array, "np k"]  # entering stage k moves the previous stage's KV over the link
    # layer-by-layer transfer overlapped with the previous stage: only bytes / stage_kv_layers[np, k]
    # (the last layer's share) is exposed; 1 = the whole KV after the stage ends; None = all 1
    stage_kv_layers: Float[Array, "np k"] | None = None
    # feeds[a, b]: client a can hand a request to client b (consecutive stages of some pipeline).
    # A client's decode stretch must stop at the next event of any client that feeds it; clients
    # that cannot reach each other advance independently. None = every client feeds every other.
    feeds: Bool[Array, "c c"] | None = None


class Workload(eqx.Module):
    """Requests as the engine reads them (valid rows first, sorted by arrival)."""

    arrival: Float[Array, "n"]  # seconds
    input_tokens: Int[Array, "n"]
    output_tokens: Int[Array, "n"]
    cached_tokens: Int[Array, "n"]  # prompt tokens whose KV is already cached (prefix hit)
    prefix_key: Int[Array, "n"]  # first prefix-block hash (-1 none), for prefix-affinity routing
    pipeline: Int[Array, "n"]
    valid: Bool[Array, "n"]
