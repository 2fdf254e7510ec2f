"""The command line end to end (in-process, sharing one compiled engine: every run here pads to
the same capacities)."""

from __future__ import annotations

import json

import pytest

import mist  # noqa: F401  (x64)
from mist.cli.main import main

SMALL = ["--model", "llama-3.1-8b", "--hardware", "h100", "--max-num-seqs", "8"]


def run_json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_estimate_json_keys(capsys):
    r = run_json(capsys, ["estimate", "--model", "llama-3.1-8b", "--hardware", "H100-SXM", "--batch", "4",
                          "--input", "512", "--output", "16", "--json"])
    for k in ("prefill_ms", "decode_ms_per_token", "kv_capacity_tokens", "memory_gb"):
        assert k in r
    assert r["prefill_ms"] > r["decode_ms_per_token"] > 0
    assert r["memory_gb"]["weights"] == pytest.approx(16.06, rel=0.01)


def test_catalog_listings(capsys):
    models = run_json(capsys, ["models", "--json"])
    hw = run_json(capsys, ["hardware", "--json"])
    assert len(models) >= 16 and len(hw) >= 26
    assert all({"name", "vendor"} <= set(m) for m in models + hw)


def test_unknown_name_is_one_clear_line(capsys):
    rc = main(["estimate", "--model", "llama-3.1-8bb", "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown model" in err and "Llama-3.1-8B" in err and "Traceback" not in err


def test_model_that_does_not_fit(capsys):
    rc = main(["estimate", "--model", "llama-3.1-70b", "--hardware", "h100", "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "memory" in err and "tp" in err


def test_bench_latency(capsys):
    r = run_json(capsys, ["bench", "latency", *SMALL, "--batch", "4", "--input", "64", "--output", "16", "--json"])
    assert r["avg_latency"] > 0 and set(r["percentiles"]) >= {"50", "90", "99"}
    assert r["rejected"] == 0 and r["preemptions"] == 0 and r["sim_run_s"] > 0 and "sim_compile_s" in r


def test_bench_throughput(capsys):
    r = run_json(capsys, ["bench", "throughput", *SMALL, "--num-prompts", "12", "--input", "64", "--output", "16",
                          "--json"])
    assert r["num_requests"] == 12
    assert r["tokens_per_second"] == pytest.approx(r["requests_per_second"] * 80, rel=1e-9)
    assert r["output_tokens_per_second"] == pytest.approx(r["requests_per_second"] * 16, rel=1e-9)


def test_bench_serve_and_seeds(capsys):
    r = run_json(capsys, ["bench", "serve", *SMALL, "--rate", "4", "--num-prompts", "12", "--input", "64",
                          "--output", "16", "--json"])
    for k in ("completed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
              "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "rejected",
              "sim_compile_s", "sim_run_s"):
        assert k in r, k
    assert r["completed"] == 12
    r2 = run_json(capsys, ["bench", "serve", *SMALL, "--rate", "4", "--num-prompts", "12", "--input", "64",
                           "--output", "16", "--seeds", "2", "--json"])
    lo, hi = r2["seeds"]["mean_ttft_ms"]["ci95"]
    assert lo <= r2["seeds"]["mean_ttft_ms"]["mean"] <= hi


def test_bad_rate_names_the_field(capsys):
    rc = main(["bench", "serve", *SMALL, "--rate", "-1", "--num-prompts", "4", "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "rate" in err


def test_simulate_config_writes_outputs(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("""
name: tiny
workload:
  num_requests: 12
  arrival: {kind: poisson, rate: 4.0}
  input: {kind: uniform, low: 32, high: 96}
  output: 16
clients:
  - {name: llm, pool: llm, model: llama-3.1-8b, hardware: h100, max_num_seqs: 8}
""")
    rc = main(["simulate", str(cfg), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ttft" in out
    for f in ("requests.csv", "requests.parquet", "summary.json", "trace.json"):
        assert (tmp_path / "out" / f).exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["completed"] == 12


def test_malformed_config_names_field(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("""
workload: {num_requests: 4}
clients:
  - {name: llm, pool: llm, model: llama-3.1-8b, hardware: h100, max_num_seq: 8}
""")
    rc = main(["simulate", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "max_num_seq" in err and "bad.yaml" in err
