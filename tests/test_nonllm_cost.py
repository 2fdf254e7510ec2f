"""Hand checks of the non-LLM cost models (mist.cost.nonllm): vector search, transfers with
contention, CPU matrix work and encoder forwards."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mist.cost import default_params, make_params
from mist.cost.iteration import iteration_time, make_batch
from mist.cost.nonllm import (
    ID_BYTES, SearchHardware, cpu_matmul_time, encoder_time, flat_search_time, flat_search_work, hnsw_time,
    hnsw_visits, ivfpq_time, lower_tier, path_read_time, search_hardware, shared_bandwidth, tier_read_time,
    transfer_time,
)
from mist.cost.replica import lower_replica
from mist.specs.catalog import get_hardware, get_model

H100 = get_hardware("h100")
SPR = get_hardware("xeon-platinum-8480plus")  # Sapphire Rapids: AMX bf16


def ideal(eff=0.5, sharpness=200.0):
    """eff = 0.5 is exact (sigmoid(0)); no overheads, no small-kernel penalty, a nearly hard max."""
    return make_params(compute_eff=[eff] * 5, memory_eff=[eff] * 5, m_half=[1e-6] * 5, overhead_s=[0.0] * 5,
                       sharpness=[sharpness] * 5, comm_bw_eff=[eff] * 4, comm_latency_scale=[1.0] * 4,
                       cpu_iter_s=0.0, cpu_per_seq_s=0.0, cpu_per_token_s=0.0)


def f(x):
    return float(np.asarray(x))


def test_search_hardware_lowering():
    hw = search_hardware(H100)
    assert f(hw.peak_flops) == pytest.approx(67e12)  # fp32 distances
    assert f(hw.mem_bw) == pytest.approx(3.35e12) and f(hw.mem_latency) == pytest.approx(0.6e-6)
    assert f(hw.lanes) == 1024.0
    cpu = search_hardware(SPR)
    assert f(cpu.mem_bw) == pytest.approx(SPR.mem_bandwidth) and f(cpu.lanes) == 64.0
    host = search_hardware(H100, tier="host")
    assert f(host.mem_bw) == pytest.approx(55e9)
    with pytest.raises(Exception, match="cxl"):
        search_hardware(H100, tier="cxl")


def test_flat_search_by_hand():
    p, hw = ideal(), search_hardware(H100)
    Q, N, d = 1.0, 1e6, 128.0
    flops, bytes_ = flat_search_work(Q, N, d)
    assert f(bytes_) == pytest.approx(N * d * 4 + Q * d * 4)  # the database streams once
    assert f(flops) == pytest.approx(2 * Q * N * d + Q * N * math.log2(11), rel=1e-6)
    # one query is memory bound: 512 MB at 0.5 x 3.35 TB/s
    t = f(flat_search_time(p, hw, Q, N, d))
    assert t == pytest.approx((N * d * 4 + Q * d * 4) / (0.5 * 3.35e12), rel=1e-5)
    # a large batch is compute bound: 2 Q N d / (0.5 x 67 TFLOP/s)
    Q = 1e4
    t = f(flat_search_time(p, hw, Q, N, d))
    assert t == pytest.approx((2 * Q * N * d + Q * N * math.log2(11)) / (0.5 * 67e12), rel=1e-5)
    # fp16 database: half the bytes
    t16 = f(flat_search_time(p, hw, 1.0, N, d, elem_bytes=2.0))
    assert t16 == pytest.approx((N * d * 2 + d * 2) / (0.5 * 3.35e12), rel=1e-5)
    assert f(flat_search_time(default_params(), hw, 0.0, N, d)) == 0.0


def test_ivfpq_by_hand_and_nprobe_scaling():
    p, hw = ideal(), search_hardware(H100)
    Q, N, d, C, m, bits = 1.0, 1e7, 128.0, 4096.0, 16.0, 8.0
    parts = ivfpq_time(p, hw, Q, N, d, C, 32.0, m, bits, breakdown=True)
    ppp = N / C
    codes = Q * 32 * ppp
    # the list scan streams m x bits / 8 bytes of codes + a 4-byte id per point (memory bound)
    assert f(parts["scan"]) == pytest.approx(codes * (m * bits / 8 + ID_BYTES) / (0.5 * 3.35e12), rel=1e-5)
    # coarse quantizer: Q x C x d GEMM (memory bound here: the centroids are read once)
    t_c = max(2 * Q * C * d / (0.5 * 67e12), (C + Q) * d * 4 / (0.5 * 3.35e12))
    assert f(parts["coarse"]) == pytest.approx(t_c, rel=1e-4)
    total = ivfpq_time(p, hw, Q, N, d, C, 32.0, m, bits)
    assert f(total) == pytest.approx(sum(f(v) for v in parts.values()), rel=1e-6)

    # scan and LUT work scale linearly in nprobe, the coarse quantizer not at all
    sweep = jnp.array([8.0, 16.0, 32.0, 64.0, 128.0])
    run = jax.jit(jax.vmap(lambda npr: ivfpq_time(p, hw, Q, N, d, C, npr, m, bits, breakdown=True)))
    out = {k: np.asarray(v) for k, v in run(sweep).items()}
    np.testing.assert_allclose(out["scan"] / out["scan"][0], np.asarray(sweep) / 8.0, rtol=1e-4)
    np.testing.assert_allclose(out["coarse"], out["coarse"][0], rtol=1e-6)
    tot = out["coarse"] + out["lut"] + out["scan"]
    assert np.all(np.diff(tot) > 0)
    # explicit list length overrides N / C; 4-bit codes halve the code bytes
    s4 = f(ivfpq_time(p, hw, Q, N, d, C, 32.0, m, 4.0, points_per_probe=1000.0, breakdown=True)["scan"])
    assert s4 == pytest.approx(Q * 32 * 1000 * (m * 4 / 8 + ID_BYTES) / (0.5 * 3.35e12), rel=1e-5)
    assert f(ivfpq_time(default_params(), hw, 0.0, N, d, C, 32.0, m)) == 0.0


def test_hnsw_latency_and_bandwidth_bound():
    p, hw = ideal(), search_hardware(H100)
    N, d, M, ef = 1e6, 128.0, 16.0, 64.0
    levels = math.log(N) / math.log(M)
    hops, dists = (f(x) for x in hnsw_visits(N, M, ef))
    assert hops == pytest.approx(levels + ef, rel=1e-6)
    assert dists == pytest.approx(levels * M + ef * 2 * M, rel=1e-6)
    # one query: a chain of dependent reads, two memory latencies per hop
    assert f(hnsw_time(p, hw, 1.0, N, d, M, ef)) == pytest.approx(hops * 2 * 0.6e-6, rel=1e-4)
    # a big batch: bandwidth bound (vectors + adjacency lists)
    Q = 1e5
    bytes_ = Q * (dists * d * 4 + hops * 2 * M * ID_BYTES)
    assert f(hnsw_time(p, hw, Q, N, d, M, ef)) == pytest.approx(bytes_ / (0.5 * 3.35e12), rel=1e-4)
    # more queries than lanes: waves of the latency chain
    slow = SearchHardware(hw.peak_flops, jnp.float32(1e18), hw.mem_latency, jnp.float32(10.0))
    assert f(hnsw_time(p, slow, 40.0, N, d, M, ef)) == pytest.approx(4 * hops * 2 * 0.6e-6, rel=1e-4)
    # a CPU's DRAM latency and lanes; larger ef costs more
    cpu = search_hardware(SPR)
    assert f(hnsw_time(p, cpu, 1.0, N, d, M, 128.0)) > f(hnsw_time(p, cpu, 1.0, N, d, M, 64.0))
    assert f(hnsw_time(default_params(), hw, 0.0, N, d)) == 0.0


def test_transfer_and_contention():
    assert f(transfer_time(1e9, 1e10, 1e-5)) == pytest.approx(0.1 + 1e-5)
    assert f(transfer_time(1e9, 1e10, 1e-5, efficiency=0.5)) == pytest.approx(0.2 + 1e-5)
    assert f(transfer_time(0.0, 1e10, 1e-5)) == 0.0
    # two readers of a 100 GB/s tier each get 50 GB/s: twice the time of a lone reader
    one = f(tier_read_time(1e9, 100e9, 1e12, 0.0, readers=1))
    two = f(tier_read_time(1e9, 100e9, 1e12, 0.0, readers=2))
    assert one == pytest.approx(0.01) and two == pytest.approx(2 * one)
    assert f(shared_bandwidth(100e9, 4)) == pytest.approx(25e9)
    # the link caps a reader: min(tier share, link)
    assert f(tier_read_time(1e9, 100e9, 25e9, 1e-6, readers=2)) == pytest.approx(1e9 / 25e9 + 1e-6)
    # host DRAM of a DGX H100 (55 GB/s per GPU over PCIe); remote storage behind the NIC
    host = lower_tier(H100.tier("host"))
    assert f(path_read_time(host, 55e9)) == pytest.approx(1.0 + 2e-6, rel=1e-6)
    assert f(path_read_time(host, 55e9, readers=2)) == pytest.approx(2.0 + 2e-6, rel=1e-6)
    remote = lower_tier(H100.tier("remote"), H100.scale_out)
    assert f(remote.latency) == pytest.approx(20e-6 + 5e-6)
    assert f(path_read_time(remote, 50e9)) == pytest.approx(1.0 + 25e-6, rel=1e-6)


def test_cpu_matmul_uses_amx_and_gemm_efficiency():
    p = ideal()
    m = n = k = 4096.0
    t_cpu = f(cpu_matmul_time(p, m, n, k, SPR, "bf16"))
    assert t_cpu == pytest.approx(2 * m * n * k / (0.5 * 114.7e12), rel=1e-5)  # AMX bf16, compute bound
    t_gpu = f(cpu_matmul_time(p, m, n, k, H100, "bf16"))  # the same formula on any device
    assert t_cpu / t_gpu == pytest.approx(989.4 / 114.7, rel=1e-4)
    # fp32 runs at the AVX-512 rate
    assert f(cpu_matmul_time(p, m, n, k, SPR, "fp32")) == pytest.approx(2 * m * n * k / (0.5 * 7.17e12), rel=1e-5)
    # a skinny matmul (one row) is memory bound: the k x n weights stream from DRAM
    t1 = f(cpu_matmul_time(p, 1.0, n, k, SPR, "bf16"))
    assert t1 == pytest.approx(((k + k * n) * 2 + n * 2) / (0.5 * 307.2e9), rel=1e-5)


@pytest.fixture(scope="module")
def enc_time():
    return jax.jit(encoder_time, static_argnames="capacity")


def test_encoder_time_matches_iteration_and_waves(enc_time):
    p = default_params()
    rep = lower_replica(get_model("bge-large-en-v1.5"), H100)
    cap = 8
    t5 = f(enc_time(p, rep, 128.0, 5.0, capacity=cap))
    ref = f(jax.jit(iteration_time)(p, rep, make_batch([128] * 5, prefill_capacity=cap)))
    assert t5 == pytest.approx(ref, rel=1e-5)
    # 19 items in batches of at most 8: two full batches and one of 3
    t19 = f(enc_time(p, rep, 128.0, 19.0, capacity=cap))
    full = f(enc_time(p, rep, 128.0, 8.0, capacity=cap))
    three = f(enc_time(p, rep, 128.0, 3.0, capacity=cap))
    assert t19 == pytest.approx(2 * full + three, rel=1e-5)
    assert f(enc_time(p, rep, 128.0, 0.0, capacity=cap)) == 0.0
    # a cross-encoder reranking 20 (query, document) pairs
    rr = lower_replica(get_model("bge-reranker-base"), H100)
    assert f(enc_time(p, rr, 300.0, 20.0, capacity=cap)) > 0


def test_cpu_slower_than_gpu_by_rate_ratio(enc_time):
    p = ideal()
    model = get_model("bge-large-en-v1.5")
    g = f(enc_time(p, lower_replica(model, H100), 256.0, 8.0, capacity=8))
    c = f(enc_time(p, lower_replica(model, SPR), 256.0, 8.0, capacity=8))
    # every term runs at one of the device's rates (bf16 matmul, fp32 vector, memory bandwidth), so
    # with no overheads the CPU/GPU ratio lies between the smallest and largest ratio of rates
    ratios = [H100.flops("bf16") / SPR.flops("bf16"), H100.flops("fp32") / SPR.flops("fp32"),
              H100.mem_bandwidth / SPR.mem_bandwidth]
    assert c > g
    assert min(ratios) * (1 - 1e-4) <= c / g <= max(ratios) * (1 + 1e-4)
    # a device whose every rate is r times lower is exactly r times slower
    r = 7.0
    slow_mem = tuple(dataclasses.replace(t, bandwidth=t.bandwidth / r) for t in H100.memory)
    slow = dataclasses.replace(H100, name="slow", kind="cpu", memory=slow_mem,
                               peak_flops={k: v / r for k, v in H100.peak_flops.items()})
    s = f(enc_time(p, lower_replica(model, slow), 256.0, 8.0, capacity=8))
    assert s / g == pytest.approx(r, rel=1e-4)


def test_gradients_finite_and_jit():
    p = default_params()
    hw, cpu = search_hardware(H100), search_hardware(SPR)

    def total(p, x):
        q, nprobe, ef, nbytes_, readers = x
        return (flat_search_time(p, hw, q, 1e6, 128.0) + ivfpq_time(p, hw, q, 1e7, 128.0, 4096.0, nprobe, 16.0)
                + hnsw_time(p, cpu, q, 1e6, 128.0, 16.0, ef) + tier_read_time(nbytes_, 55e9, 50e9, 2e-6, readers)
                + cpu_matmul_time(p, q, 1024.0, 1024.0, SPR))

    grad = jax.jit(jax.grad(total, argnums=(0, 1)))
    jtotal = jax.jit(total)
    for x in ([1.0, 32.0, 64.0, 1e6, 1.0], [300.0, 8.0, 200.0, 1e9, 3.0], [0.0, 32.0, 64.0, 0.0, 1.0]):
        x = jnp.asarray(x)
        gp, gx = grad(p, x)
        for leaf in jax.tree.leaves((gp, gx)):
            assert np.all(np.isfinite(np.asarray(leaf)))
        assert np.isfinite(f(jtotal(p, x)))
        if x[0] > 0:  # the time responds to the efficiencies it should
            assert np.any(np.asarray(gp.memory_logit) != 0) and np.any(np.asarray(gp.compute_logit) != 0)
            assert np.all(np.asarray(gx)[[0, 1, 2, 3]] > 0)  # more queries/probes/ef/bytes cost more
