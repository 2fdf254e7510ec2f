"""Measuring software stacks: per-stack GEMM parameters are fitted, stored, loaded and used."""

from __future__ import annotations

import json

import jax
import numpy as np
import pandas as pd
import pytest

from mist.calibration.fit import fit
from mist.calibration.predict import predict
from mist.calibration.stacks import (MIN_STACK_ROWS, default_stack, predict_stacked, stacks_from_dict,
                                     variant_stacks, with_class_of)
from mist.cost.params import NUM_OPS, Op, default_params, load_params, make_params
from mist.specs.catalog import get_hardware
from mist.specs.errors import SpecError

DEV = "H100-SXM"


def _phys(gemm_eff: float, gemm_m_half: float):
    return make_params(compute_eff=[gemm_eff, 0.5, 0.5, 0.6, 0.5], memory_eff=[0.85, 0.6, 0.8, 0.75, 0.7],
                       m_half=[gemm_m_half, 96.0, 32.0, 8.0, 1.0], overhead_s=[4e-6, 8e-6, 6e-6, 4e-6, 1.5e-6],
                       sharpness=[3.0] * NUM_OPS, comm_bw_eff=[0.7, 0.75, 0.6, 0.8],
                       comm_latency_scale=[1.0] * 4, cpu_iter_s=1e-3, cpu_per_seq_s=1e-5, cpu_per_token_s=1e-8)


#: the newer stack's kernels and an older stack's slower, later-saturating GEMMs
NEW, OLD = _phys(0.8, 16.0), _phys(0.45, 128.0)


def _two_stacks() -> pd.DataFrame:
    """The same GEMM shapes timed by two stacks (plus decode attention from the newer one)."""
    rows = []
    for m in 2 ** np.arange(13):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 8192), (256, 2048), (8192, 1024),
                     (6144, 4096)):
            rows.append(dict(op="gemm", m=float(m), n=n, k=k, dtype="bf16", w_dtype="bf16"))
    g = pd.DataFrame(rows)
    dec = pd.DataFrame([dict(op="attn_decode", batch=b, q_len=1, kv_len=kv, num_heads=32, num_kv_heads=8,
                             head_dim=128, dtype="bf16", kv_dtype="bf16")
                        for b in (1, 8, 64, 256) for kv in (128, 1024, 8192, 32768)])
    dev = get_hardware(DEV)
    parts = []
    for src, p, tab in (("aiconfigurator", NEW, pd.concat([g, dec])), ("vidur", OLD, g)):
        t = tab.reset_index(drop=True).copy()
        t["device"], t["source"], t["time_s"] = DEV, src, 1.0  # a placeholder time: predict needs one
        t["time_s"] = predict(p, dev, t, report=False)
        parts.append(t)
    return pd.concat(parts, ignore_index=True)


def _mape(pred, tab):
    return float(np.mean(np.abs(pred / tab["time_s"].to_numpy() - 1.0)) * 100.0)


def test_default_stack_is_the_newest_and_small_stacks_join_it():
    t = _two_stacks()
    assert default_stack(t) == "aiconfigurator"
    assert default_stack(t[t["source"] == "vidur"]) == "vidur"  # a device measured by one stack only
    assert variant_stacks(t) == ["vidur"]
    few = pd.concat([t[t["source"] == "aiconfigurator"],
                     t[(t["source"] == "vidur") & (t["op"] == "gemm")].head(MIN_STACK_ROWS - 1)])
    assert variant_stacks(few) == []
    assert default_stack(t[t["op"] != "gemm"]) is None


def test_with_class_of_takes_one_class_only():
    a, b = default_params(), NEW
    c = with_class_of(a, b, Op.GEMM)
    for name in ("compute_logit", "log_m_half", "log_overhead", "log_serial_bw", "log_split_time"):
        x, y, z = (np.asarray(getattr(p, name)) for p in (a, b, c))
        assert z[Op.GEMM] == y[Op.GEMM]
        assert np.array_equal(np.delete(z, Op.GEMM), np.delete(x, Op.GEMM))
    assert np.array_equal(np.asarray(c.comm_bw_logit), np.asarray(a.comm_bw_logit))


def test_fit_gives_each_stack_its_own_gemm_parameters(tmp_path):
    t = _two_stacks()
    dev = get_hardware(DEV)
    res = fit(DEV, t, steps=250, lr=0.05)
    assert res.default_stack == "aiconfigurator" and set(res.stacks) == {"vidur"}
    assert res.stack_rows["vidur"] >= MIN_STACK_ROWS
    te = res.test[res.test["op"] == "gemm"].reset_index(drop=True)
    old = te[te["source"] == "vidur"].reset_index(drop=True)
    new = te[te["source"] == "aiconfigurator"].reset_index(drop=True)
    # each stack's held-out GEMMs follow its own parameters; the default ones miss the older stack
    assert _mape(res.predict(old), old) < 6.0
    assert _mape(res.predict(new), new) < 6.0
    assert _mape(predict(res.params, dev, old, report=False), old) > 15.0
    # the other classes come from the main fit only
    assert np.array_equal(np.asarray(res.stacks["vidur"].compute_logit)[1:], np.asarray(res.params.compute_logit)[1:])
    # one parameter set for both stacks (stacks=False) fits neither as well
    joint = fit(DEV, t, steps=250, lr=0.05, stacks=False)
    assert not joint.stacks
    assert _mape(joint.predict(te), te) > 2.0 * _mape(res.predict(te), te)

    # stored under params.stacks, loaded back identically; an end-to-end CPU block survives the refit
    own = {"iter_us": 1500.0, "per_seq_us": 50.0, "per_token_us": 0.05, "origin": "e2e-fitted on X"}
    path = res.save(tmp_path)
    d = json.loads(path.read_text())
    d["params"]["cpu"] = own
    path.write_text(json.dumps(d))
    path = res.save(tmp_path)
    d = json.loads(path.read_text())
    assert d["params"]["cpu"] == own
    assert d["gemm_stacks"]["default"] == "aiconfigurator" and d["params"]["stacks"]["vidur"]["train_rows"] > 0
    back = stacks_from_dict(d["params"])["vidur"]
    np.testing.assert_allclose(predict_stacked(res.params, {"vidur": back}, dev, old), res.predict(old), rtol=1e-5)


def test_shipped_stack_loads_and_unknown_stack_is_named():
    base, origin = load_params(DEV)
    try:
        old, o2 = load_params(DEV, gemm_stack="vidur")
    except SpecError:
        pytest.skip("the shipped H100 file has no per-stack GEMM parameters")
    assert "GEMM stack vidur" in o2 and "GEMM stack" not in origin
    assert np.asarray(old.compute_logit)[Op.GEMM] != np.asarray(base.compute_logit)[Op.GEMM]
    assert np.array_equal(np.asarray(old.log_m_half)[1:], np.asarray(base.log_m_half)[1:])
    with pytest.raises(SpecError, match="gemm_stack.*'cublas-1999'.*use one of: vidur"):
        load_params(DEV, gemm_stack="cublas-1999")
    with pytest.raises(SpecError, match="gemm_stack"):
        load_params("NO-SUCH-DEVICE-FILE", gemm_stack="vidur")


def test_client_config_picks_a_gemm_stack():
    from mist.cost.iteration import iteration_time, make_batch
    from mist.lowering.config import parse_config
    from mist.lowering.deployment import lower

    base = {"workload": {"num_requests": 4, "arrival": {"kind": "poisson", "rate": 1.0}, "input": 64, "output": 4}}
    client = {"name": "llm", "model": "llama-3.1-8b", "hardware": "h100"}
    try:
        load_params(DEV, gemm_stack="vidur")
    except SpecError:
        pytest.skip("the shipped H100 file has no per-stack GEMM parameters")
    los = {}
    for stack in (None, "vidur"):
        c = parse_config({**base, "clients": [{**client, **({"gemm_stack": stack} if stack else {})}]}, "cfg.yaml")
        los[stack] = lower(c.deployment, c.requests)
    assert "GEMM stack vidur" in los["vidur"].notes["llm"]["cost_params"]
    assert "GEMM stack" not in los[None].notes["llm"]["cost_params"]
    # a 512-token prefill iteration: its GEMMs run on the older stack's kernels, the rest is identical
    batch = make_batch(prefill_tokens=[512], prefill_context=[0], decode_context=[])
    t = {s: float(iteration_time(jax.tree.map(lambda x: x[0], lo.clients.params),
                                 jax.tree.map(lambda x: x[0], lo.clients.replica), batch)) for s, lo in los.items()}
    assert t["vidur"] != pytest.approx(t[None], rel=1e-3)
    with pytest.raises(SpecError, match="gemm_stack.*no-such-stack"):
        c = parse_config({**base, "clients": [{**client, "gemm_stack": "no-such-stack"}]}, "cfg.yaml")
        lower(c.deployment, c.requests)


def test_client_config_picks_a_cpu_stack():
    """`cpu_stack` runs a client with the CPU terms validate_e2e fitted for that serving stack:
    per-iteration time plus the per-worker time x TP, per sequence, per token and per prompt."""
    from mist.cost.params import CPU_ABOVE_OFF, CPU_KNEE_DEFAULT, CPU_PROMPT_OFF, params_path
    from mist.lowering.config import parse_config
    from mist.lowering.deployment import lower

    dev = "A100-SXM-80GB"
    variants = json.loads(params_path(dev).read_text())["params"]["cpu"].get("variants", {})
    if "vllm-2023" not in variants:
        pytest.skip("the shipped A100-SXM-80GB file has no vllm-2023 CPU terms")
    v = variants["vllm-2023"]
    base = {"workload": {"num_requests": 4, "arrival": {"kind": "poisson", "rate": 1.0}, "input": 64, "output": 4}}
    client = {"name": "llm", "model": "llama-3.1-8b", "hardware": "a100-sxm-80gb", "tp": 4}
    c = parse_config({**base, "clients": [{**client, "cpu_stack": "vllm-2023"}]}, "cfg.yaml")
    lo = lower(c.deployment, c.requests)
    p = jax.tree.map(lambda x: x[0], lo.clients.params)
    assert float(p.cpu_iter) == pytest.approx((v["iter_us"] + 4 * v.get("per_worker_us", 0.0)) * 1e-6, rel=1e-5)
    assert float(p.cpu_per_seq) == pytest.approx(v["per_seq_us"] * 1e-6, rel=1e-5)
    assert float(p.cpu_per_token) == pytest.approx(v["per_token_us"] * 1e-6, rel=1e-5)
    assert float(p.cpu_per_prompt) == pytest.approx(v.get("per_prompt_us", CPU_PROMPT_OFF * 1e6) * 1e-6, rel=1e-5)
    assert float(p.cpu_per_token_above) == pytest.approx(v.get("per_token_above_us", CPU_ABOVE_OFF * 1e6) * 1e-6,
                                                         rel=1e-5)
    assert float(p.cpu_token_knee) == v.get("token_knee", CPU_KNEE_DEFAULT)
    assert "serving stack vllm-2023" in lo.notes["llm"]["cost_params"]
    # the kernels are the device's own either way
    plain = lower(parse_config({**base, "clients": [client]}, "cfg.yaml").deployment, c.requests)
    q = jax.tree.map(lambda x: x[0], plain.clients.params)
    np.testing.assert_array_equal(np.asarray(p.compute_logit), np.asarray(q.compute_logit))
    with pytest.raises(SpecError, match="cpu_stack.*'no-such-stack'.*use one of: .*vllm-2023"):
        c = parse_config({**base, "clients": [{**client, "cpu_stack": "no-such-stack"}]}, "cfg.yaml")
        lower(c.deployment, c.requests)
