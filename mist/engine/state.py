"""The evolving simulation state: one equinox module of fixed-capacity arrays (the scan carry)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .tables import EngineDims

INF = float("inf")


def itl_bin_edges(bins: int) -> np.ndarray:
    """Log-spaced edges of the inter-token-latency histogram, 1 us to 100 s."""
    return np.logspace(-6, 2, bins + 1)


# Integer columns of a batch slot. One packed array instead of one array per field: the step reads,
# compacts and writes a client's slots as one block (fewer, larger kernels per scan step).
SLOT_FIELDS = (
    "rid",  # request id, -1 empty
    "stage",
    "prompt",  # stage prompt tokens
    "done",  # tokens whose KV is in the cache
    "pf_target",  # tokens to have in KV when the prefill phase ends
    "prefill",  # 1 while in the prefill phase
    "gen",  # tokens generated in this stage
    "target",  # tokens to generate in this stage
    "order",  # admission number (slots are kept in this order)
)
EMPTY_SLOT = (-1, 0, 0, 0, 0, 0, 0, 0, 0)


class EngineState(eqx.Module):
    """Whole-simulation state. Times are float64 seconds; token counts int32."""

    # --- clocks and client statistics [C]
    t_free: Float[Array, "c"]  # when the client can start its next iteration
    iters: Int[Array, "c"]  # iterations run (also indexes the step-noise stream)
    busy: Float[Array, "c"]  # seconds spent in iterations
    outstanding: Float[Array, "c"]  # tokens queued or running (least-outstanding router)
    # --- batch slots [C, S, F] (columns: SLOT_FIELDS), running requests first, in admission order
    slots: Int[Array, "c s f"]
    s_last_tok: Float[Array, "c s"]  # time of the slot's last token (inter-token latency)
    # --- queues [C, Q], ring buffers
    q_item: Int[Array, "c q"]  # request id * stages + stage (-1 empty): one array, one write per push
    q_ready: Float[Array, "c q"]  # when the entry may be admitted (arrival, or end of transfer)
    q_head: Int[Array, "c"]
    q_tail: Int[Array, "c"]
    # --- routing and arrivals
    rr: Int[Array, "p"]  # round-robin counters per pool
    cursor: Int[Array, ""]  # next request to arrive
    order: Int[Array, ""]  # admission counter
    # --- per-request bookkeeping [N]
    r_gen: Int[Array, "n"]  # tokens generated in the current stage before a preemption
    r_preempted: Bool[Array, "n"]
    r_swapped: Int[Array, "n"]  # KV tokens of a preempted request held in host memory (swap mode), else 0
    # --- outputs [N] and [N, K]
    o_first_token: Float[Array, "n"]
    o_finish: Float[Array, "n"]
    o_preemptions: Int[Array, "n"]
    o_reject: Int[Array, "n"]
    o_stage_start: Float[Array, "n k"]
    o_stage_end: Float[Array, "n k"]
    o_stage_client: Int[Array, "n k"]
    # --- statistics
    itl_hist: Float[Array, "bins"]  # count of inter-token gaps per log-spaced bin
    itl_sum: Float[Array, ""]
    completed: Int[Array, ""]  # requests finished or rejected
    steps: Int[Array, ""]
    key: Array


def init_state(dims: EngineDims, key) -> EngineState:
    C, S, Q, N, K = dims.num_clients, dims.slots, dims.queue, dims.num_requests, dims.stages
    f = lambda shape, v: jnp.full(shape, v, dtype=jnp.float64)  # noqa: E731
    i = lambda shape, v: jnp.full(shape, v, dtype=jnp.int32)  # noqa: E731
    b = lambda shape: jnp.zeros(shape, dtype=bool)  # noqa: E731
    return EngineState(
        t_free=f((C,), 0.0), iters=i((C,), 0), busy=f((C,), 0.0), outstanding=f((C,), 0.0),
        slots=jnp.broadcast_to(jnp.asarray(EMPTY_SLOT, jnp.int32), (C, S, len(SLOT_FIELDS))),
        s_last_tok=f((C, S), 0.0),
        q_item=i((C, Q), -1), q_ready=f((C, Q), INF), q_head=i((C,), 0), q_tail=i((C,), 0),
        rr=i((dims.pools,), 0), cursor=jnp.int32(0), order=jnp.int32(0),
        r_gen=i((N,), 0), r_preempted=b((N,)), r_swapped=i((N,), 0),
        o_first_token=f((N,), INF), o_finish=f((N,), INF), o_preemptions=i((N,), 0), o_reject=i((N,), 0),
        o_stage_start=f((N, K), INF), o_stage_end=f((N, K), INF), o_stage_client=i((N, K), -1),
        itl_hist=f((dims.itl_bins,), 0.0), itl_sum=jnp.float64(0.0),
        completed=jnp.int32(0), steps=jnp.int32(0), key=key,
    )

