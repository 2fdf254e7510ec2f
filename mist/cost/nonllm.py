"""Cost models of the non-LLM stages of a serving pipeline: vector search (flat, IVF-PQ, HNSW),
memory-tier and link transfers with contention, CPU matrix work, and encoder forwards
(embedding, cross-encoder reranking).

Pure JAX like the rest of `mist.cost`: every function is jittable, vmappable and differentiable in
its array arguments and in the `CostParams` efficiencies, which it shares with the LLM cost model
(GEMM-like work uses `Op.GEMM`, streaming scans use `Op.ELEMENTWISE`), so calibrating a device
calibrates its search and CPU costs too. Units: seconds, bytes, FLOPs, bytes/s, FLOP/s. Element
counts (vectors, dimensions, tokens) are float arrays so that sweeps can vary them.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..specs.dtypes import nbytes
from ..specs.hardware import Device, Link, MemoryTier
from .iteration import MixedBatch, iteration_time
from .params import CostParams, Op
from .replica import Replica
from .roofline import kernel_time, smooth_max

#: default number of queries a device searches concurrently (graph search is a chain of dependent
#: reads per query; throughput comes from running many queries at once): CPU threads of a socket,
#: and a GPU running one query per thread block (CAGRA-style)
DEFAULT_LANES = {"cpu": 64.0, "gpu": 1024.0, "tpu": 256.0, "accelerator": 256.0, "asic": 256.0}
#: bytes of one vector id in an inverted list or an adjacency list
ID_BYTES = 4.0


class SearchHardware(eqx.Module):
    """The figures of one device that vector search needs, as arrays (stackable for vmap).

    peak_flops: FLOP/s of the distance computations (dtype chosen at lowering, default fp32)
    mem_bw: bytes/s of the memory holding the index
    mem_latency: seconds of one dependent random read (first byte) from that memory
    lanes: queries in flight at once (see DEFAULT_LANES)
    """

    peak_flops: Float[Array, ""]
    mem_bw: Float[Array, ""]
    mem_latency: Float[Array, ""]
    lanes: Float[Array, ""]


def search_hardware(device: Device, dtype: str = "fp32", tier: str = "device",
                    lanes: float | None = None) -> SearchHardware:
    """Lower a Device for vector search: distances in `dtype` at the device's peak for it, the index
    held in the memory tier at level `tier` (default: the device memory, HBM or DRAM)."""
    t = device.tier(tier) if tier != "device" else device.device_memory
    if t is None:
        from ..specs.errors import SpecError

        raise SpecError(device.path or device.name, "memory", f"no tier at level '{tier}'",
                        "pick a level the device has (device, host, local_ssd, ...)")
    # a tier without a latency figure still has a dependent-read cost: use DRAM-like 100 ns
    lat = t.latency if t.latency > 0 else 1e-7
    f = lambda x: jnp.asarray(x, dtype=jnp.float32)  # noqa: E731
    return SearchHardware(peak_flops=f(device.flops(dtype)), mem_bw=f(t.bandwidth), mem_latency=f(lat),
                          lanes=f(lanes if lanes is not None else DEFAULT_LANES.get(device.kind, 256.0)))


# ------------------------------------------------------------------ vector search
def flat_search_work(num_queries, num_vectors, dim, elem_bytes=4.0, top_k=10.0):
    """(FLOPs, bytes) of exact search: the Q x N distance GEMM (2 Q N d FLOPs), reading the N x d
    database once per batch (the queries stay in cache) plus the queries, and a top-k selection
    over each query's N distances (N log2(k+1) comparisons, counted as FLOPs)."""
    flops = 2.0 * num_queries * num_vectors * dim + num_queries * num_vectors * jnp.log2(top_k + 1.0)
    bytes_ = num_vectors * dim * elem_bytes + num_queries * dim * elem_bytes
    return flops, bytes_


def flat_search_time(params: CostParams, hw: SearchHardware, num_queries, num_vectors, dim,
                     elem_bytes=4.0, top_k=10.0):
    """Seconds to search a batch of `num_queries` queries exhaustively over `num_vectors` vectors of
    `dim` elements (`elem_bytes` each). Memory bound for small batches (the database streams once),
    compute bound for large ones; a GEMM for the roofline (rows = queries)."""
    flops, bytes_ = flat_search_work(num_queries, num_vectors, dim, elem_bytes, top_k)
    flops = jnp.where(num_queries > 0, flops, 0.0)
    bytes_ = jnp.where(num_queries > 0, bytes_, 0.0)
    return kernel_time(params, Op.GEMM, flops, bytes_, hw.peak_flops, hw.mem_bw, num_queries, 2.0)


def ivfpq_points_per_probe(num_vectors, num_centroids):
    """Mean inverted-list length (vectors per centroid)."""
    return num_vectors / jnp.maximum(num_centroids, 1.0)


def ivfpq_time(params: CostParams, hw: SearchHardware, num_queries, num_vectors, dim, num_centroids, nprobe,
               pq_m, pq_bits=8.0, points_per_probe=None, top_k=10.0, elem_bytes=4.0, breakdown=False):
    """Seconds to search a batch of queries in an IVF-PQ index.

    Stages (each through the roofline, summed):
      coarse quantizer: distances from each query to all C centroids, a Q x C x d GEMM
        (2 Q C d FLOPs; reads the C x d centroids once and the queries);
      lookup tables: per query and probed list, distances from the query residual to the
        2^bits codewords of each of the m sub-quantizers (2 Q nprobe 2^bits d FLOPs; the codebooks,
        2^bits x d elements, are read once);
      list scan: Q nprobe P codes of m sub-quantizers x bits (memory bound: Q nprobe P (m bits/8 + 4)
        bytes, codes plus 4-byte ids, with no reuse of a list between queries), one table lookup and
        add per sub-quantizer (Q nprobe P m ops) and a top-k selection (Q nprobe P log2(k+1)).
    P = points_per_probe, num_vectors / num_centroids by default. With `breakdown` returns a dict
    (coarse, lut, scan) instead of the total."""
    ppp = ivfpq_points_per_probe(num_vectors, num_centroids) if points_per_probe is None else points_per_probe
    on = num_queries > 0
    ksub = jnp.power(2.0, pq_bits)
    # coarse quantizer (GEMM-like)
    c_flops = 2.0 * num_queries * num_centroids * dim
    c_bytes = (num_centroids + num_queries) * dim * elem_bytes
    t_coarse = kernel_time(params, Op.GEMM, jnp.where(on, c_flops, 0.0), jnp.where(on, c_bytes, 0.0),
                           hw.peak_flops, hw.mem_bw, num_queries, 1.0)
    # lookup tables
    l_flops = 2.0 * num_queries * nprobe * ksub * dim
    l_bytes = ksub * dim * elem_bytes + num_queries * nprobe * ksub * pq_m * 4.0
    t_lut = kernel_time(params, Op.GEMM, jnp.where(on, l_flops, 0.0), jnp.where(on, l_bytes, 0.0),
                        hw.peak_flops, hw.mem_bw, num_queries * nprobe, 1.0)
    # scanning the probed lists' PQ codes (memory bound)
    codes = num_queries * nprobe * ppp
    s_bytes = codes * (pq_m * pq_bits / 8.0 + ID_BYTES)
    s_flops = codes * (pq_m + jnp.log2(top_k + 1.0))
    t_scan = kernel_time(params, Op.ELEMENTWISE, jnp.where(on, s_flops, 0.0), jnp.where(on, s_bytes, 0.0),
                         hw.peak_flops, hw.mem_bw, codes, 1.0)
    if breakdown:
        return {"coarse": t_coarse, "lut": t_lut, "scan": t_scan}
    return t_coarse + t_lut + t_scan


def hnsw_visits(num_vectors, M, ef_search):
    """(hops, distances) of one HNSW query.

    Upper layers: about log_M(N) levels of greedy search, one expansion of M neighbours each.
    Layer 0: `ef_search` expansions of up to 2M neighbours each (the bottom layer keeps 2M links).
    A hop is one expansion: a dependent read of an adjacency list, then the neighbours' vectors."""
    levels = jnp.log(jnp.maximum(num_vectors, 2.0)) / jnp.log(jnp.maximum(M, 2.0))
    hops = levels + ef_search
    dists = levels * M + ef_search * 2.0 * M
    return hops, dists


def hnsw_time(params: CostParams, hw: SearchHardware, num_queries, num_vectors, dim, M=16.0, ef_search=64.0,
              elem_bytes=4.0):
    """Seconds to search a batch of queries in an HNSW graph.

    Per query: `hops` dependent steps, each paying two memory latencies (the adjacency list, then
    the neighbours' vectors fetched in parallel); the distances read dim x elem_bytes per visited
    vector plus the adjacency lists (2M ids per hop). The batch runs `lanes` queries at a time, so
    its time is the smooth max (sharpness of Op.ELEMENTWISE) of
      latency chain:  ceil-free waves max(Q / lanes, 1) x hops x 2 x latency
      bandwidth:      Q x (distances x dim x elem_bytes + hops x 2M x 4) / (bw x memory_eff)
      compute:        Q x distances x 2 dim FLOPs at the compute efficiency."""
    hops, dists = hnsw_visits(num_vectors, M, ef_search)
    on = num_queries > 0
    bytes_ = num_queries * (dists * dim * elem_bytes + hops * 2.0 * M * ID_BYTES)
    flops = num_queries * dists * 2.0 * dim
    t_bw = kernel_time(params, Op.ELEMENTWISE, jnp.where(on, flops, 0.0), jnp.where(on, bytes_, 0.0),
                       hw.peak_flops, hw.mem_bw, 1e30, 0.0)
    waves = jnp.maximum(num_queries / hw.lanes, 1.0)
    t_chain = waves * hops * 2.0 * hw.mem_latency
    t = smooth_max(t_bw, t_chain, params.sharpness[Op.ELEMENTWISE]) + params.overhead[Op.ELEMENTWISE]
    return jnp.where(on, t, 0.0)


# ------------------------------------------------------------------ transfers
def transfer_time(bytes_, bandwidth, latency=0.0, efficiency=1.0):
    """Seconds to move `bytes_` over a path of `bandwidth` bytes/s achieved at `efficiency`, after a
    first-byte `latency`; nothing to move costs nothing."""
    return jnp.where(bytes_ > 0, latency + bytes_ / (bandwidth * efficiency), 0.0)


def shared_bandwidth(bandwidth, readers):
    """Fair share of a tier's `bandwidth` among `readers` concurrent readers (at least one)."""
    return bandwidth / jnp.maximum(readers, 1.0)


def tier_read_time(bytes_, tier_bandwidth, link_bandwidth, latency=0.0, readers=1.0, efficiency=1.0):
    """Seconds for one reader to read `bytes_` from a memory tier through its link: the path runs
    at min(fair share of the tier's bandwidth among `readers` concurrent readers, the link's
    bandwidth); `latency` is the tier's first-byte latency plus the link's."""
    bw = jnp.minimum(shared_bandwidth(tier_bandwidth, readers), link_bandwidth)
    return transfer_time(bytes_, bw, latency, efficiency)


class TierPath(eqx.Module):
    """A memory tier reached over a link, as arrays: bandwidths in bytes/s, latency in seconds."""

    tier_bw: Float[Array, ""]
    link_bw: Float[Array, ""]
    latency: Float[Array, ""]


def lower_tier(tier: MemoryTier, link: Link | None = None) -> TierPath:
    """A tier from a hardware spec, optionally behind a link (e.g. a remote tier over the NIC).
    Without a link the path runs at the tier's own bandwidth (its figure already includes the
    link it is reached through, e.g. host DRAM over PCIe)."""
    f = lambda x: jnp.asarray(x, dtype=jnp.float32)  # noqa: E731
    link_bw = link.bandwidth if link is not None else tier.bandwidth
    lat = tier.latency + (link.latency if link is not None else 0.0)
    return TierPath(tier_bw=f(tier.bandwidth), link_bw=f(link_bw), latency=f(lat))


def path_read_time(path: TierPath, bytes_, readers=1.0, efficiency=1.0):
    """`tier_read_time` over a lowered TierPath."""
    return tier_read_time(bytes_, path.tier_bw, path.link_bw, path.latency, readers, efficiency)


# ------------------------------------------------------------------ CPU compute
def cpu_matmul_time(params: CostParams, m, n, k, device: Device, dtype: str = "bf16", out_bytes=None):
    """Seconds for C[m, n] = A[m, k] @ B[k, n] on a CPU socket (or any device): 2 m n k FLOPs at the
    device's peak for `dtype` (AMX bf16/int8 on Sapphire Rapids and later, AVX-512/AVX2 fp32
    otherwise, as listed in the hardware spec) times the GEMM efficiency of `params`, against
    (m k + k n) x dtype bytes + m n x `out_bytes` (default: dtype) of memory traffic."""
    b = nbytes(dtype)
    ob = b if out_bytes is None else out_bytes
    flops = 2.0 * m * n * k
    bytes_ = (m * k + k * n) * b + m * n * ob
    return kernel_time(params, Op.GEMM, flops, bytes_, device.flops(dtype), device.mem_bandwidth, m, 1.0)


# ------------------------------------------------------------------ encoder forwards
def encoder_time(params: CostParams, replica: Replica, tokens_per_item, items, capacity: int = 256):
    """Seconds to run an encoder (embedding model or cross-encoder reranker; any model lowered with
    `lower_replica`, an encoder has no LM head) over `items` sequences of `tokens_per_item` tokens:
    one prefill iteration of the shared iteration cost per batch of at most `capacity` items (the
    serving batch size), i.e. floor(items / capacity) full batches plus one with the remainder.
    A cross-encoder reranking k documents for a query is items = k, tokens = query + document."""
    items = jnp.asarray(items, jnp.float32)
    rows = jnp.arange(capacity, dtype=jnp.float32)

    def one(n):
        on = rows < n
        b = MixedBatch(prefill_tokens=jnp.where(on, tokens_per_item * 1.0, 0.0),
                       prefill_context=jnp.zeros((capacity,)), prefill_last=on, prefill_mask=on,
                       decode_context=jnp.zeros((1,)), decode_mask=jnp.zeros((1,), bool))
        return iteration_time(params, replica, b)

    full = jnp.floor(items / capacity)
    rem = items - full * capacity
    return jnp.where(full > 0, full * one(jnp.float32(capacity)), 0.0) + one(rem)
