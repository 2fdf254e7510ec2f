"""Loaders of measured operator timings -> the normalised table (mist.calibration.sources)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mist.calibration import schema
from mist.calibration.sources import (SOURCES, _common, aiconfigurator, aiter, llmcompass, load_curated,
                                      load_source, load_table, vidur)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def _one(df, **eq):
    mask = np.ones(len(df), bool)
    for k, v in eq.items():
        mask &= (df[k] == v).to_numpy()
    sel = df[mask]
    assert len(sel) == 1, f"expected one row with {eq}, got {len(sel)}"
    return sel.iloc[0]


def _check_table(df):
    assert tuple(df.columns) == schema.COLUMNS
    schema.validate(df, where="loaded")  # raises on any malformed row


# ---------------------------------------------------------------- vidur

def _vidur_tree(root):
    ops = ["emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
           "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]
    head = [f"time_stats.{o}.{s}" for o in ops for s in ("min", "max", "mean", "median", "std")]
    head += ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp",
             "num_tokens", "num_tensor_parallel_workers"]
    vals = []
    for i, o in enumerate(ops):
        med = {"attn_pre_proj": 2.0, "mlp_up_proj": 4.0}.get(o, 0.1 * (i + 1))
        vals += [med, med, med, med, 0.0]
    row = vals + [32, 8, 4096, 14336, 128256, True, 512, 2]
    _write(root / "data/profiling/compute/h100/meta-llama/Meta-Llama-3-8B/mlp.csv",
           ",".join(head) + "\n" + ",".join(map(str, row)) + "\n")
    _write(root / "data/profiling/network/a100_dgx/all_reduce.csv",
           ",time_stats.all_reduce.min,time_stats.all_reduce.max,time_stats.all_reduce.mean,"
           "time_stats.all_reduce.median,time_stats.all_reduce.std,rank,num_workers,size,collective,"
           "devices_per_node,max_devices_per_node\n"
           "0,0.01,0.03,0.02,0.025,0.001,0,8,1048576,all_reduce,4,8\n")
    _write(root / "data/profiling/network/h100_pairwise_nvlink/send_recv.csv",
           ",time_stats.send_recv.min,time_stats.send_recv.max,time_stats.send_recv.mean,"
           "time_stats.send_recv.median,time_stats.send_recv.std,rank,num_workers,size,collective,"
           "devices_per_node,max_devices_per_node\n"
           "0,0.01,0.02,0.015,0.017,0.004,0,2,2048,send_recv,2,4\n")
    att = ("time_stats.attn_decode.median,time_stats.attn_prefill.median,n_embd,n_q_head,n_kv_head,"
           "block_size,num_tensor_parallel_workers,max_model_len,batch_size,prefill_chunk_size,"
           "kv_cache_size,is_prefill,attention_backend\n"
           "0.5,,8192,64,8,16,2,4096,16,0,1023,False,AttentionBackend.FLASH_ATTENTION\n"
           ",3.0,8192,64,8,16,2,4096,1,512,1024,True,AttentionBackend.FLASH_ATTENTION\n")
    _write(root / "history/e2d00e9afb/data/profiling/a100/attention.csv", att)
    _write(root / "history/e2d00e9afb/data/profiling/a40/cpu_overheads.csv",
           ",schedule_mean,sampler_e2e_mean,schedule_median,sampler_e2e_median,model_name,batch_size,"
           "tensor_parallel_degree,ray_comm_time_mean\n"
           "0,0.05,0.7,0.04,0.6,meta-llama/Llama-2-7b-hf,32,1,2.5\n")
    _write(root / "history/aa06400b5e/data/profiling/v100/all_reduce.csv",  # skipped: no catalog device
           ",time_stats.all_reduce.median,rank,num_workers,n_embd,num_tokens\n0,0.05,0,2,4096,1\n")


def test_vidur_fixture(tmp_path):
    _vidur_tree(tmp_path)
    df = vidur.load(tmp_path)
    _check_table(df)
    assert set(df["source"]) == {"vidur"}
    # QKV projection of Llama-3-8B at TP2: n = (32/2 + 2*8/2) * 128 = 3072, k = 4096, m = tokens
    qkv = _one(df, op="gemm", name="attn_pre_proj")
    assert (qkv.device, qkv.m, qkv.n, qkv.k, qkv.tp) == ("H100-SXM", 512, 3072, 4096, 2)
    assert math.isclose(qkv.time_s, 2.0e-3)  # ms -> s
    assert qkv["dtype"] == "fp16" and qkv.model == "meta-llama/Meta-Llama-3-8B"
    up = _one(df, op="gemm", name="mlp_up_proj")  # gated: 2 * 14336 / 2
    assert (up.m, up.n, up.k) == (512, 14336, 4096) and math.isclose(up.time_s, 4.0e-3)
    down = _one(df, op="gemm", name="mlp_down_proj")
    assert (down.n, down.k) == (4096, 7168)
    o = _one(df, op="gemm", name="attn_post_proj")
    assert (o.n, o.k) == (4096, 2048)
    assert len(df[(df.op == "layernorm") & (df.device == "H100-SXM")]) == 2
    assert set(df.loc[df.op == "elementwise", "name"]) == {"rope", "act", "add", "embedding"}
    ar = _one(df, op="allreduce")
    assert (ar.device, ar.message_bytes, ar.num_devices, ar.num_nodes, ar.variant) == \
        ("A100-SXM-80GB", 1048576, 8, 2, "dgx")
    assert math.isclose(ar.time_s, 0.025e-3)
    sr = _one(df, op="send_recv")
    assert (sr.device, sr.message_bytes, sr.num_nodes) == ("H100-SXM", 2048, 1)
    dec = _one(df, op="attn_decode")
    assert (dec.device, dec.batch, dec.q_len, dec.kv_len) == ("A100-SXM-80GB", 16, 1, 1024)
    assert (dec.num_heads, dec.num_kv_heads, dec.head_dim, dec.tp) == (32, 4, 128, 2)
    assert math.isclose(dec.time_s, 0.5e-3)
    pre = _one(df, op="attn_prefill")
    assert (pre.batch, pre.q_len, pre.kv_len) == (1, 512, 1536)
    assert pre.framework == "vidur-profiler@e2d00e9"
    sched = _one(df, op="cpu_overhead", name="schedule")
    assert (sched.device, sched.batch, sched.tp) == ("A40", 32, 1)
    assert math.isclose(sched.time_s, 0.04e-3)  # the median, in seconds
    assert set(df.loc[df.op == "cpu_overhead", "name"]) == {"schedule", "sampler", "ray_comm"}
    assert "V100" not in set(df["device"])


# ---------------------------------------------------------------- aiconfigurator

def _aic_tree(root):
    base = dict(framework="VLLM", version="0.14.0", device="NVIDIA H100 80GB HBM3")
    _parquet(root / "h100_sxm/gemm/vllm/0.14.0/gemm_perf.parquet", [
        dict(base, op_name="gemm", kernel_source="vllm_default", gemm_dtype="bfloat16", m=16, n=4096, k=8192,
             latency=0.05),
        dict(base, op_name="gemm", kernel_source="vllm_default", gemm_dtype="fp8_block", m=16, n=4096, k=8192,
             latency=0.03),
    ])
    att = dict(base, kernel_source="vllm_flash_attn", num_heads=32, num_key_value_heads=8, head_dim=128,
               beam_width=1, attn_dtype="bfloat16", kv_cache_dtype="fp8")
    _parquet(root / "h100_sxm/attention/vllm/0.14.0/context_attention_perf.parquet", [
        dict(att, op_name="context_attention", batch_size=4, isl=2048, step=0, latency=1.5)])
    _parquet(root / "h100_sxm/attention/vllm/0.14.0/generation_attention_perf.parquet", [
        dict(att, op_name="generation_attention", batch_size=64, isl=1, step=127, latency=0.02)])
    _parquet(root / "h100_sxm/comm/nccl/2.27.3/nccl_perf.parquet", [
        dict(framework="TRTLLM", version="2.29.2", device="NVIDIA H100 80GB HBM3", op_name="all_reduce",
             kernel_source="NCCL", nccl_dtype="half", num_gpus=8, message_size=1024, latency=0.01),
        dict(framework="TRTLLM", version="2.29.2", device="NVIDIA H100 80GB HBM3", op_name="all_gather",
             kernel_source="NCCL", nccl_dtype="int8", num_gpus=4, message_size=4096, latency=0.02),
    ])
    _parquet(root / "a100_sxm/comm/vllm/0.14.0/custom_allreduce_perf.parquet", [
        dict(framework="vLLM", version="0.14.0", device="NVIDIA A100-SXM4-80GB", op_name="all_reduce",
             kernel_source="vLLM_custom_graph", allreduce_dtype="bfloat16", num_gpus=2, message_size=512,
             latency=0.004, backend="vllm_graph")])
    _parquet(root / "h100_sxm/moe/vllm/0.14.0/moe_perf.parquet", [
        dict(base, op_name="moe", kernel_source="vllm_fused_moe", moe_dtype="int4_wo", num_tokens=128,
             hidden_size=7168, inter_size=2048, topk=8, num_experts=256, moe_tp_size=1, moe_ep_size=8,
             distribution="balanced", latency=0.5)])
    _parquet(root / "h100_sxm/mla/vllm/0.14.0/generation_mla_perf.parquet", [
        dict(base, op_name="generation_mla", kernel_source="vllm_flashmla", mla_dtype="bfloat16",
             kv_cache_dtype="fp8", num_heads=16, batch_size=8, isl=1, tp_size=8, step=1023, latency=0.1)])
    _parquet(root / "b200_sxm/gemm/vllm/0.14.0/gemm_perf.parquet", [  # no catalog device: skipped
        dict(base, op_name="gemm", kernel_source="x", gemm_dtype="bfloat16", m=1, n=1, k=1, latency=0.01)])
    _write(root / "h100_sxm/gemm/vllm/0.15.0/reuse.yaml", "schema_version: 1\n")


def test_aiconfigurator_fixture(tmp_path):
    _aic_tree(tmp_path)
    with pytest.warns(UserWarning, match="b200_sxm"):
        df = aiconfigurator.load(tmp_path)
    _check_table(df)
    g = _one(df, op="gemm", variant="bfloat16")
    assert (g.device, g.m, g.n, g.k, g["dtype"], g.w_dtype) == ("H100-SXM", 16, 4096, 8192, "bf16", "bf16")
    assert math.isclose(g.time_s, 0.05e-3) and g.framework == "vllm 0.14.0"
    assert _one(df, op="gemm", variant="fp8_block")["dtype"] == "fp8"
    pre = _one(df, op="attn_prefill")
    assert (pre.batch, pre.q_len, pre.kv_len, pre.num_heads, pre.num_kv_heads, pre.head_dim) == \
        (4, 2048, 2048, 32, 8, 128)
    assert (pre["dtype"], pre.kv_dtype) == ("bf16", "fp8") and math.isclose(pre.time_s, 1.5e-3)
    dec = _one(df, op="attn_decode")
    assert (dec.batch, dec.q_len, dec.kv_len) == (64, 1, 128)
    ar = _one(df, op="allreduce", framework="nccl 2.27.3")  # folder version, not the stale column
    assert ar.message_bytes == 1024 * 2 and ar.num_devices == 8 and ar["dtype"] == "fp16"  # elements -> bytes
    ag = _one(df, op="allgather")
    assert ag.message_bytes == 4096 and ag["dtype"] == "int8"
    car = _one(df, op="allreduce", device="A100-SXM-80GB")
    assert car.message_bytes == 1024 and car.variant == "vllm_graph" and math.isclose(car.time_s, 4e-6)
    moe = _one(df, op="moe")
    assert (moe.num_tokens, moe.hidden, moe.inter, moe.num_experts, moe.top_k, moe.ep, moe.tp) == \
        (128, 7168, 2048, 256, 8, 8, 1)
    assert (moe["dtype"], moe.w_dtype, moe["name"]) == ("bf16", "int4", "balanced")
    mla = _one(df, op="mla_decode")
    assert (mla.batch, mla.q_len, mla.kv_len, mla.num_heads, mla.tp) == (8, 1, 1024, 16, 8)
    only = aiconfigurator.load(tmp_path, devices=["A100-SXM-80GB"], ops=["allreduce"])
    assert len(only) == 1 and only.iloc[0].device == "A100-SXM-80GB"


# ---------------------------------------------------------------- aiter

def test_aiter_fixture(tmp_path):
    cfg = tmp_path / "aiter" / "configs"
    _write(cfg / "bf16_tuned_gemm.csv",
           "gfx,cu_num,M,N,K,bias,dtype,outdtype,scaleAB,bpreshuffle,libtype,solidx,splitK,us,kernelName,"
           "err_ratio,tflops,bw\n"
           "gfx950,256,64,256,5120,False,torch.bfloat16,torch.float32,False,False,asm,5,13,7.5,k1,0.0,21,417\n"
           "gfx1250,256,64,256,5120,False,torch.bfloat16,torch.float32,False,False,asm,5,13,3.0,k1,0.0,21,417\n")
    _write(cfg / "model_configs" / "a8w8_blockscale_tuned_gemm_ds_v3.csv",
           "gfx,cu_num,M,N,K,libtype,kernelId,splitK,us,kernelName,tflops,bw,errRatio\n"
           "gfx942,304,32,7168,2048,ck,8,0,20.0,kb,1,1,0\n"
           "gfx942,304,64,7168,2048,ck,8,0,0,kb,1,1,0\n")  # failed tune (us = 0): dropped
    _write(cfg / "tuned_fmoe.csv",
           "cu_num,token,model_dim,inter_dim,expert,topk,act_type,dtype,q_dtype_a,q_dtype_w,q_type,use_g1u1,"
           "doweight_stage1,block_m,ksplit,us1,kernelName1,err1,us2,kernelName2,err2,us,run_1stage,tflops,bw,_tag\n"
           "80,4,2304,1536,8,2,ActivationType.Gelu,torch.bfloat16,torch.float8_e4m3fnuz,torch.float8_e4m3fnuz,"
           "QuantType.per_Token,1,1,32,0,17.8,s1,0.0%,14.5,s2,0.0%,32.3,0,5.26,2629.41,\n")
    _write(cfg / "bf16_untuned_gemm.csv", "M,N,K\n1,2,3\n")  # shapes only: ignored
    df = aiter.load(tmp_path)
    _check_table(df)
    assert len(df) == 3
    b = _one(df, device="MI355X")
    assert (b.op, b.m, b.n, b.k, b["dtype"]) == ("gemm", 64, 256, 5120, "bf16")
    assert math.isclose(b.time_s, 7.5e-6)  # us -> s
    f8 = _one(df, device="MI300X")
    assert (f8["dtype"], f8.variant, f8.model) == ("fp8", "a8w8_blockscale", "ds_v3")
    moe = _one(df, op="moe")
    assert moe.device == "MI308X"  # cu_num 80 without a gfx column
    assert (moe.num_tokens, moe.hidden, moe.inter, moe.num_experts, moe.top_k, moe.ep) == (4, 2304, 1536, 8, 2, 1)
    assert moe["dtype"] == "fp8" and math.isclose(moe.time_s, 32.3e-6)
    assert set(df["framework"]) == {"aiter"} and set(df["source"]) == {"aiter"}


# ---------------------------------------------------------------- llmcompass

def test_llmcompass_fixture(tmp_path):
    rh = tmp_path / "ae" / "figure5"
    _write(rh / "ab/real_hardware/matmul_A100.csv", "64, 12288, 12288, 0.1900ms, 101.7124Tflops\n")
    _write(rh / "cf/real_hardware/softmax_MI210.csv", "4096, 32, 5.0\n")
    _write(rh / "de/real_hardware/layernorm_A100.csv", "4096, 64, 4.0\n")
    _write(rh / "g/real_hardware/gelu_MI210.csv", "1024, 0.05\n")
    _write(rh / "ijkl/real_hardware/transformer_A100.csv", "0.01\n")  # not an op: skipped
    df = llmcompass.load(tmp_path)
    _check_table(df)
    assert len(df) == 4
    mm = _one(df, op="gemm")
    assert (mm.device, mm.m, mm.n, mm.k, mm["dtype"]) == ("A100-SXM-80GB", 64, 12288, 12288, "fp16")
    assert math.isclose(mm.time_s, 0.19e-3)
    sm = _one(df, op="softmax")
    assert sm.device == "MI210" and math.isclose(sm.time_s, 4096 * 32 / 5.0e9)  # G elements/s -> s
    ln = _one(df, op="layernorm")
    assert math.isclose(ln.time_s, 4096 * 64 / 4.0e9)
    ge = _one(df, op="elementwise")
    assert ge["name"] == "gelu" and (ge.m, ge.n) == (1024, 1) and math.isclose(ge.time_s, 1024 / 0.05e9)


# ---------------------------------------------------------------- registry, errors, curated subset

def test_load_source_registry(tmp_path):
    assert set(SOURCES) == set(schema.SOURCES)
    _vidur_tree(tmp_path)
    assert len(load_source("vidur", path=tmp_path)) > 0
    with pytest.raises(ValueError, match="unknown source"):
        load_source("nope")


def test_missing_shared_data_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(_common, "shared_data_candidates", lambda: [tmp_path / "absent"])
    for name in SOURCES:
        with pytest.raises(FileNotFoundError, match="traces/ops"):
            load_source(name)


def _good_rows():
    return [
        dict(device="H100-SXM", op="gemm", m=16, n=4096, k=4096, dtype="bf16", source="custom", time_s=1e-5),
        dict(device="H100-SXM", op="allreduce", message_bytes=2048, num_devices=8, source="custom",
             time_s=2e-5),
        dict(device="MI300X", op="cpu_overhead", name="schedule", batch=8, source="custom", time_s=3e-5),
    ]


def test_load_table_roundtrip(tmp_path):
    p = tmp_path / "ops.csv"
    pd.DataFrame(_good_rows()).to_csv(p, index=False)
    df = load_table(p)
    assert tuple(df.columns) == schema.COLUMNS and len(df) == 3
    q = tmp_path / "ops.parquet"
    df.to_parquet(q, index=False)
    assert len(load_table(q)) == 3


@pytest.mark.parametrize("bad, field", [
    (dict(time_s=-1.0), "time_s"),
    (dict(k=None), "k"),
    (dict(device="H900"), "device"),
    (dict(op="matmul"), "op"),
    (dict(m="sixteen"), "m"),
    (dict(dtype="bf17"), "dtype"),
])
def test_load_table_malformed_row(tmp_path, bad, field):
    rows = _good_rows()
    rows.insert(1, dict(rows[0], **bad))  # the bad row is data row 1
    p = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    with pytest.raises(ValueError) as ei:
        load_table(p)
    msg = str(ei.value)
    assert "bad.csv" in msg and "row 1" in msg and f"field '{field}'" in msg


def test_load_table_missing_column(tmp_path):
    p = tmp_path / "nocol.csv"
    pd.DataFrame(_good_rows()).drop(columns="time_s").to_csv(p, index=False)
    with pytest.raises(ValueError, match="nocol.csv.*time_s"):
        load_table(p)


def test_load_curated():
    all_rows = load_curated()
    assert tuple(all_rows.columns) == schema.COLUMNS
    for dev in ("H100-SXM", "A100-SXM-80GB", "MI300X"):
        d = load_curated(dev)
        assert len(d) > 0 and set(d["device"]) == {dev}
        assert d[list(schema.REQUIRED_ALWAYS)].notna().all().all()
        assert (d["time_s"] > 0).all()
    ops = set(load_curated("H100-SXM")["op"])
    assert {"gemm", "attn_prefill", "attn_decode", "moe", "allreduce"} <= ops
    assert {"gemm", "moe"} <= set(load_curated("mi300x")["op"])  # alias accepted
    with pytest.raises(ValueError, match="unknown device"):
        load_curated("H900")


# ---------------------------------------------------------------- the real measured data

def _check_sample(df):
    """Columns of the whole table; full row validation of a per-(device, op) sample (fast)."""
    assert tuple(df.columns) == schema.COLUMNS and len(df) > 0
    schema.validate(df.groupby(["device", "op"], sort=False).head(300), where="sample")


@pytest.mark.skipif(_common.shared_data_dir() is None, reason="measured data (shared/data) not present")
def test_real_shared_data():
    v = vidur.load()
    _check_sample(v)
    assert {"gemm", "attn_prefill", "attn_decode", "allreduce", "send_recv", "cpu_overhead"} <= set(v["op"])
    assert {"A100-SXM-80GB", "H100-SXM", "A40"} <= set(v["device"])
    a = aiconfigurator.load(devices=["A100-SXM-80GB"])  # the full H100/H200 DB is ~3M rows: slow here
    _check_sample(a)
    assert {"gemm", "attn_prefill", "attn_decode", "moe", "allreduce", "mla_decode"} <= set(a["op"])
    m = aiter.load()
    _check_sample(m)
    assert {"MI300X", "MI308X", "MI355X"} <= set(m["device"]) and {"gemm", "moe"} <= set(m["op"])
    c = llmcompass.load()
    _check_table(c)
    assert {"A100-SXM-80GB", "MI210"} == set(c["device"])
