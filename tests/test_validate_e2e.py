"""experiments/validate_e2e.py: the measured-data loaders parse the real files (skipped when
../shared/data is absent), and the end-to-end gradient w.r.t. log_cpu_iter through the engine's
scan is finite and matches a finite difference of the simulated batch latency."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("validate_e2e", ROOT / "experiments" / "validate_e2e.py")
ve = importlib.util.module_from_spec(_spec)
sys.modules["validate_e2e"] = ve
_spec.loader.exec_module(ve)

needs_data = pytest.mark.skipif(not ve.have_data(), reason=f"measured data absent under {ve.DATA}")


@needs_data
def test_lib_loader_parses_real_file():
    d = ve.load_lib()
    assert len(d) > 500
    assert set(d["framework"]) == {"vllm", "trtllm"}
    assert set(d["device"]) <= {"A100-SXM-40GB", "H100-SXM", "GH200"}
    assert set(d["batch"]) <= {1, 16, 32, 64} and set(d["tp"]) <= {1, 2, 4, 8}
    assert (d["input"] == d["output"]).all()
    assert (d["meas_latency_s"] > 0).all()
    # the documented identity: throughput = batch * (in + out) / latency
    thr = d["batch"] * (d["input"] + d["output"]) / d["meas_latency_s"]
    assert np.allclose(thr, d["meas_throughput"], rtol=1e-6)


@needs_data
def test_splitwise_loader_parses_real_file():
    s = ve.load_splitwise()
    assert len(s) == 114  # Llama2-70B x (A100, H100) x TP (2, 4, 8) x 19 shapes
    assert set(s["device"]) == {"A100-SXM-80GB", "H100-SXM"}
    assert (s["repeats"] >= 1).all() and (s["meas_tbt_ms"] > 10).all()
    assert (s["out_eff"] <= s["output"]).all() and (s["out_eff"] >= 2).all()
    # short outputs ran to completion: e2e ~ TTFT + TBT * (out - 1)
    short = s[s["output"] == 128]
    assert short["e2e_ok"].all()


@needs_data
def test_split_is_by_configuration():
    rows = ve.load_all()
    per_config = rows.groupby("config")["split"].nunique()
    assert (per_config == 1).all()
    assert {"train", "test"} <= set(rows["split"])


def _tiny_problem():
    import jax.numpy as jnp

    from mist.lowering.deployment import Deployment, lower

    dep = Deployment.single("llama-3.2-1b", "H100-SXM", tp=1, policy="continuous", max_num_seqs=2,
                            max_num_batched_tokens=256)
    wl = {"arrival": np.zeros(2), "input_tokens": np.array([32, 32]), "output_tokens": np.array([5, 5])}
    lo = lower(dep, wl, slots=2, window=2, queue=2, stretch=4, num_requests=2)
    return lo, jnp


def test_e2e_gradient_through_scan_matches_finite_difference():
    import jax

    import mist  # noqa: F401  (float64)
    from mist.engine.run import run_chunk
    from mist.engine.state import init_state

    lo, jnp = _tiny_problem()
    n_valid = jnp.sum(lo.workload.valid).astype(jnp.int32)
    base = np.array([np.log(1e-3), np.log(1e-5), np.log(1e-8)])

    def latency(log_iter):
        theta = jnp.stack([log_iter, jnp.asarray(base[1]), jnp.asarray(base[2])])
        cl = ve.with_cpu(lo.clients, theta)
        st = init_state(lo.dims, jax.random.PRNGKey(0))
        st = run_chunk.__wrapped__(lo.dims, 12, cl, lo.topology, lo.workload, n_valid, st)
        fin = jnp.where(lo.workload.valid, st.o_finish, -jnp.inf).max()
        return fin, (st.completed, st.iters[0])

    vg = jax.jit(jax.value_and_grad(latency, has_aux=True))
    x0 = jnp.asarray(base[0])
    (f0, (done, iters)), g = vg(x0)
    assert int(done) == 2, "the tiny workload must finish within the scan length"
    assert np.isfinite(float(g)) and float(g) > 0
    h = 1e-3
    (fp, _), _ = vg(x0 + h)
    (fm, _), _ = vg(x0 - h)
    fd = (float(fp) - float(fm)) / (2 * h)
    assert abs(float(g) - fd) <= 1e-2 * abs(fd)
    # latency is linear in cpu_iter with one term per iteration: d latency / d log_cpu_iter = iters * cpu_iter
    assert float(g) == pytest.approx(int(iters) * 1e-3, rel=1e-3)


def test_per_worker_cpu_term_folds_into_cpu_iter():
    """Stacks that dispatch each iteration to every TP worker (Splitwise's 2023 vLLM) pay
    cpu_iter + per_worker x TP; the others keep the TP-independent cpu_iter; 3-entry thetas pass."""
    import jax
    import jax.numpy as jnp

    import mist  # noqa: F401  (float64)

    from mist.cost.params import CPU_ABOVE_OFF, CPU_PROMPT_OFF

    th = jnp.log(jnp.asarray([1e-3, 2e-5, 3e-8, 2e-3, 4e-2]))
    on = np.asarray(ve.fold_workers(th, 4.0, 1.0))
    off = np.asarray(ve.fold_workers(th, 4.0, 0.0))
    assert np.exp(on[0]) == pytest.approx(1e-3 + 4 * 2e-3)
    assert np.exp(off[0]) == pytest.approx(1e-3)
    assert np.allclose(on[1:3], np.asarray(th[1:3])) and np.allclose(off[1:3], np.asarray(th[1:3]))
    # the per-prompt time only where the stack pays it (PER_PROMPT_PROFILES), else off
    assert np.exp(on[3]) == pytest.approx(CPU_PROMPT_OFF)
    assert np.exp(np.asarray(ve.fold_workers(th, 4.0, 0.0, 1.0))[3]) == pytest.approx(4e-2)
    three = np.asarray(ve.fold_workers(th[:3], 8.0, 1.0))
    assert np.allclose(three[:3], np.asarray(th[:3])) and np.exp(three[3]) == pytest.approx(CPU_PROMPT_OFF)
    # d log(cpu_iter_eff) / d log(per_worker) = per_worker * tp / cpu_iter_eff
    g = jax.grad(lambda t: ve.fold_workers(t, 4.0, 1.0)[0])(th)
    assert float(g[3]) == pytest.approx(8e-3 / 9e-3)
    assert float(jax.grad(lambda t: ve.fold_workers(t, 4.0, 1.0, 0.0)[3])(th)[4]) == 0.0
    assert float(jax.grad(lambda t: ve.fold_workers(t, 4.0, 1.0, 1.0)[3])(th)[4]) == 1.0
    # the time per token beyond the knee likewise (LARGE_ITER_PROFILES): theta[5], else off
    th6 = jnp.concatenate([th, jnp.log(jnp.asarray([5e-5]))])
    assert np.exp(np.asarray(ve.fold_workers(th6, 4.0, 1.0, 0.0, 1.0))[4]) == pytest.approx(5e-5)
    for folded in (ve.fold_workers(th6, 4.0, 1.0), ve.fold_workers(th, 4.0, 1.0, 0.0, 1.0), three):
        assert np.exp(np.asarray(folded)[4]) == pytest.approx(CPU_ABOVE_OFF)
    assert float(jax.grad(lambda t: ve.fold_workers(t, 4.0, 1.0, 0.0, 1.0)[4])(th6)[5]) == 1.0
    assert "vllm-2023" in ve.PER_WORKER_PROFILES


def test_per_prompt_cpu_term_through_the_scan():
    """Both prompts of the tiny workload prefill in one iteration, so the batch's first-token time
    grows by exactly 2 x per_prompt, and its gradient in log per_prompt is 2 x per_prompt."""
    import jax

    import mist  # noqa: F401  (float64)
    from mist.engine.run import run_chunk
    from mist.engine.state import init_state

    lo, jnp = _tiny_problem()
    n_valid = jnp.sum(lo.workload.valid).astype(jnp.int32)

    def first_token(log_pp):
        theta = jnp.stack([jnp.log(1e-3), jnp.log(1e-5), jnp.log(1e-8), log_pp])
        cl = ve.with_cpu(lo.clients, theta)
        st = init_state(lo.dims, jax.random.PRNGKey(0))
        st = run_chunk.__wrapped__(lo.dims, 12, cl, lo.topology, lo.workload, n_valid, st)
        return jnp.where(lo.workload.valid, st.o_first_token, -jnp.inf).max(), st.completed

    vg = jax.jit(jax.value_and_grad(first_token, has_aux=True))
    (off, done), _ = vg(jnp.log(1e-12))
    (on, _), g = vg(jnp.log(5e-3))
    assert int(done) == 2
    assert float(on) - float(off) == pytest.approx(2 * 5e-3, rel=1e-6)
    assert float(g) == pytest.approx(2 * 5e-3, rel=1e-6)


def test_knee_refit_recovers_a_planted_step(tmp_path):
    """Prefill iterations pack whole prompts under max(max_model_len, 2048) tokens; the offline knee
    check recovers a time per token beyond the knee planted in the measurements, exactly at the
    planted knee (zero error on the held-out TP), and a worse fit at another knee."""
    import pandas as pd

    r = {"framework": "vllm", "max_model_len": 4608, "input": 512, "batch": 16}
    assert ve.prefill_iterations(r) == [4608, 3584]  # 9 prompts of 512, then 7
    assert ve.prefill_iterations({"framework": "vllm", "max_model_len": 4096, "input": 8192, "batch": 1}) == [8192]
    rows = []
    for dev, b in (("A", 0.15), ("B", 0.05)):
        for tp in (2, 4, 8):
            for inp, bat in ((512, 1), (1024, 1), (2048, 1), (4096, 1), (8192, 1), (512, 8), (512, 16)):
                row = {"source": "splitwise", "framework": "vllm", "device": dev, "tp": tp, "input": inp, "batch": bat,
                       "max_model_len": inp + 512, "preemptions_after": 0}
                pred = 0.2 * inp * bat / tp + 30.0
                beyond = sum(max(0, t - 2048) for t in ve.prefill_iterations(row))
                rows.append({**row, "pred_ttft_ms_after": pred, "meas_ttft_ms": pred + b * beyond})
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    out = ve.knee_refit(tmp_path / "rows.csv", knees=(1024, 2048))
    at = out[out["knee"] == 2048].set_index("device")
    assert at.loc["A", "b_us_per_token"] == pytest.approx(150.0, rel=1e-4)
    assert at.loc["B", "b_us_per_token"] == pytest.approx(50.0, rel=1e-4)
    assert abs(at.loc["A", "a_us_per_token"]) < 1e-2 and (at["test_mape"] < 1e-3).all()
    assert (at["test_mape_without"] > 1.0).all()
    assert (out[out["knee"] == 1024]["train_mape"] > at["train_mape"].max() + 0.1).all()
