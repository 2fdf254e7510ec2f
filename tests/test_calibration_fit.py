"""Calibration: split by shape, parameter recovery, finite gradients, evaluate, save/load."""

from __future__ import annotations

import json

import jax
import numpy as np
import pandas as pd
import pytest

from mist.calibration.evaluate import evaluate
from mist.calibration.fit import fit, fit_prepared, loss, shape_hash, split, split_mask
from mist.calibration.predict import predict, prepare
from mist.cost.params import CostParams, default_params, load_params, make_params, save_params
from mist.specs.catalog import get_hardware

DEV = "H100-SXM"


def _table(n_rep: int = 1) -> pd.DataFrame:
    """A small normalised table of GEMMs, attention and all-reduces (times filled in later)."""
    rng = np.random.default_rng(0)
    rows = []
    for m in (1, 4, 16, 64, 256, 1024, 4096):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 8192), (256, 2048)):
            for _ in range(n_rep):
                rows.append(dict(op="gemm", m=m, n=n, k=k, dtype="bf16", w_dtype="bf16"))
    for b in (1, 4, 16):
        for q in (128, 512, 2048):
            rows.append(dict(op="attn_prefill", batch=b, q_len=q, kv_len=q, num_heads=32, num_kv_heads=8,
                             head_dim=128, dtype="bf16", kv_dtype="bf16"))
    for b in (1, 8, 64, 256):
        for kv in (128, 1024, 8192, 32768):
            rows.append(dict(op="attn_decode", batch=b, q_len=1, kv_len=kv, num_heads=32, num_kv_heads=8,
                             head_dim=128, dtype="bf16", kv_dtype="bf16"))
    for g in (2, 4, 8):
        for s in 2.0 ** np.arange(12, 30, 2):
            rows.append(dict(op="allreduce", message_bytes=s, num_devices=g, dtype="bf16"))
    rows.append(dict(op="cpu_overhead", name="schedule", batch=8))
    df = pd.DataFrame(rows)
    df["device"] = DEV
    df["source"] = "synthetic"
    df["time_s"] = 1e-5 * (1.0 + rng.random(len(df)))
    return df


def _perturbed() -> CostParams:
    return make_params(compute_eff=[0.6, 0.45, 0.5, 0.6, 0.5], memory_eff=[0.9, 0.6, 0.85, 0.75, 0.7],
                       m_half=[8.0, 96.0, 32.0, 8.0, 1.0], overhead_s=[5e-6, 8e-6, 6e-6, 4e-6, 1.5e-6],
                       sharpness=[2.0, 3.0, 4.0, 3.0, 3.0], comm_bw_eff=[0.55, 0.75, 0.6, 0.8],
                       comm_latency_scale=[2.5, 1.0, 1.0, 1.0], cpu_iter_s=1e-3, cpu_per_seq_s=1e-5,
                       cpu_per_token_s=1e-8)


def _synthetic() -> pd.DataFrame:
    df = _table()
    df["time_s"] = predict(_perturbed(), get_hardware(DEV), df, report=False)
    return df[np.isfinite(df["time_s"])].reset_index(drop=True)


def test_split_never_shares_a_shape():
    df = pd.concat([_table(n_rep=2), _table(n_rep=1)], ignore_index=True)  # repeated shapes
    df = df.sample(frac=1.0, random_state=1).reset_index(drop=True)  # order must not matter
    train, test = split(df)
    h_tr, h_te = set(shape_hash(train)), set(shape_hash(test))
    assert h_tr and h_te and not (h_tr & h_te)
    assert 0.05 < len(test) / len(df) < 0.45
    # deterministic and independent of row order
    m1 = split_mask(df)
    m2 = split_mask(df.iloc[::-1].reset_index(drop=True))[::-1]
    assert np.array_equal(m1, m2)


def test_predict_drops_unmodelled_rows():
    df = _table()
    with pytest.warns(UserWarning, match="cpu_overhead"):
        p = predict(default_params(), get_hardware(DEV), df)
    assert np.isnan(p[df["op"] == "cpu_overhead"]).all()
    assert np.isfinite(p[df["op"] != "cpu_overhead"]).all() and (p[df["op"] != "cpu_overhead"] > 0).all()


def test_gradient_of_loss_is_finite():
    import equinox as eqx

    df = _synthetic()
    prep = prepare(get_hardware(DEV), df)
    g = eqx.filter_jit(eqx.filter_grad(lambda p: loss(p, prep)))(default_params())
    leaves = jax.tree_util.tree_leaves(g)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert float(np.abs(np.asarray(g.compute_logit)).sum()) > 0


def test_fit_recovers_perturbed_parameters():
    df = _synthetic()
    dev = get_hardware(DEV)
    prep = prepare(dev, df)
    l0 = float(loss(default_params(), prep))
    fitted, hist = fit_prepared(default_params(), prep, steps=500, lr=0.05)
    l1 = float(loss(fitted, prep))
    assert l1 < 0.05 * l0
    err = np.abs(predict(fitted, dev, df, report=False) / df["time_s"] - 1.0)
    assert float(err.mean()) < 0.05
    # classes without rows keep their defaults (masked gradients)
    d = default_params()
    assert np.allclose(np.asarray(fitted.compute_logit)[3:], np.asarray(d.compute_logit)[3:])
    assert np.allclose(np.asarray(fitted.comm_bw_logit)[1:], np.asarray(d.comm_bw_logit)[1:])
    assert float(fitted.log_cpu_iter) == float(d.log_cpu_iter)


def test_fit_result_metrics_improve():
    res = fit(DEV, _synthetic(), steps=300)
    s = res.summary()
    assert {"gemm", "attn_decode", "allreduce"} <= set(s.index)
    assert (s["mape_after"] < s["mape_before"]).all()
    assert set(shape_hash(res.train)).isdisjoint(shape_hash(res.test))


def test_evaluate_on_a_tiny_table(tmp_path):
    df = _synthetic()
    p = tmp_path / "ops.csv"
    df.to_csv(p, index=False)
    m = evaluate(DEV, p, "csv")
    assert set(m.index) == {"gemm", "attn_prefill", "attn_decode", "allreduce"}
    assert list(m.columns) == ["count", "mape", "p90_ape"]
    assert (m["count"] > 0).all() and np.isfinite(m["mape"]).all()


def test_saved_params_reload_identically(tmp_path):
    p = _perturbed()
    path = save_params(p, "TEST-DEV", {"origin": "fitted on test"}, tmp_path)
    d = json.loads(path.read_text())
    q = CostParams.from_dict(d["params"])
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    assert d["origin"] == "fitted on test"


def test_shipped_params_load():
    params, origin = load_params(DEV)
    assert isinstance(params, CostParams) and origin


def test_curated_traces_predictable():
    from mist.calibration.sources import load_curated

    try:
        tab = load_curated(DEV)
    except FileNotFoundError:
        pytest.skip("no curated traces")
    sub = tab.groupby("op", group_keys=False).head(50)
    p = predict(default_params(), get_hardware(DEV), sub, report=False)
    ok = np.isfinite(p)
    assert ok.mean() > 0.9 and (p[ok] > 0).all()


def test_transfer_never_copies_cpu_terms_and_keeps_an_own_end_to_end_fit(tmp_path):
    import json

    from mist.calibration.fit import transfer_params

    # a measured source whose CPU terms were fitted end to end (to its own serving stack)
    src = make_params(**{**_phys_of(default_params()), "cpu_iter_s": 2e-3, "cpu_per_seq_s": 1e-4})
    save_params(src, "H100-SXM", {"origin": "fitted on H100-SXM operator measurements"}, tmp_path)
    # a device without measurements and without an end-to-end fit: this kind's defaults, not the source's
    p, meta = transfer_params("B200", "H100-SXM", directory=tmp_path)
    assert meta["transferred_from"] == "H100-SXM"
    assert np.isclose(float(p.cpu_iter), float(default_params().cpu_iter))
    assert np.allclose(np.asarray(p.compute_logit), np.asarray(src.compute_logit))
    # a device whose file holds its own end-to-end CPU fit keeps it, origin and variants included
    own = {"iter_us": 1500.0, "per_seq_us": 50.0, "per_token_us": 0.05, "origin": "e2e-fitted on X",
           "variants": {"trtllm": {"iter_us": 100.0, "per_seq_us": 1.0, "per_token_us": 0.001}}}
    d = json.loads((tmp_path / "B200.json").read_text())
    d["params"]["cpu"] = own
    (tmp_path / "B200.json").write_text(json.dumps(d))
    p, _ = transfer_params("B200", "H100-SXM", directory=tmp_path)
    assert np.isclose(float(p.cpu_iter), 1.5e-3, rtol=1e-5)
    assert json.loads((tmp_path / "B200.json").read_text())["params"]["cpu"] == own
    assert np.isclose(float(load_params_from(tmp_path / "B200.json").cpu_per_seq), 50e-6, rtol=1e-5)


def _phys_of(p):
    d = p.to_dict()
    ops, comms = d["ops"], d["comms"]
    from mist.cost.params import Comm, Op

    return dict(compute_eff=[ops[o.name.lower()]["compute_eff"] for o in Op],
                memory_eff=[ops[o.name.lower()]["memory_eff"] for o in Op],
                m_half=[ops[o.name.lower()]["m_half_tokens"] for o in Op],
                overhead_s=[ops[o.name.lower()]["overhead_us"] * 1e-6 for o in Op],
                sharpness=[ops[o.name.lower()]["sharpness"] for o in Op],
                comm_bw_eff=[comms[c.name.lower()]["bw_eff"] for c in Comm],
                comm_latency_scale=[comms[c.name.lower()]["latency_scale"] for c in Comm],
                cpu_iter_s=d["cpu"]["iter_us"] * 1e-6, cpu_per_seq_s=d["cpu"]["per_seq_us"] * 1e-6,
                cpu_per_token_s=d["cpu"]["per_token_us"] * 1e-6)


def load_params_from(path):
    import json

    return CostParams.from_dict(json.loads(path.read_text())["params"])
