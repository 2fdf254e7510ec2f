"""Engine speed: compile time and run time of the scan engine as the workload grows.

Azure LLM inference 2023 conversation trace (bundled) on Llama-3.1-8B / one H100 / chunked
prefill: the first 1k requests, the whole trace (~19k), and 100k requests (the trace's lengths
resampled with replacement, arrivals at the trace's mean rate). Prints a table and writes
experiments/results/bench_engine.json.

    python experiments/bench_engine.py [--sizes 1000 19366 100000] [--stretch 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import mist
from mist.engine.run import simulate_arrays
from mist.lowering import Deployment, lower
from mist.workload import bundled_trace


def workload(n: int, trace: dict) -> dict:
    total = len(trace["arrival"])
    if n <= total:
        return {k: np.asarray(v)[:n] for k, v in trace.items()}
    rng = np.random.default_rng(0)
    idx = rng.integers(0, total, n)
    rate = total / float(trace["arrival"][-1])
    arr = np.cumsum(rng.exponential(1.0 / rate, n))
    arr -= arr[0]
    return {"arrival": arr, "input_tokens": np.asarray(trace["input_tokens"])[idx],
            "output_tokens": np.asarray(trace["output_tokens"])[idx]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 19366, 100000])
    ap.add_argument("--stretch", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_engine.json"))
    args = ap.parse_args(argv)
    trace = bundled_trace("azure_conv_2023").to_numpy()
    trace = {k: trace[k] for k in ("arrival", "input_tokens", "output_tokens")}
    dep = Deployment.single("llama-3.1-8b", "h100", policy="chunked", max_num_seqs=args.max_num_seqs)
    rows = []
    for n in args.sizes:
        wl = workload(n, trace)
        lo = lower(dep, wl, stretch=args.stretch)
        st, stats = simulate_arrays(lo.dims, lo.clients, lo.topology, lo.workload)
        fin = np.asarray(st.o_finish)[:n]
        rej = int((np.asarray(st.o_reject)[:n] > 0).sum())
        rows.append({"requests": n, "compile_s": stats.compile_s, "run_s": stats.run_s, "scan_steps": stats.steps,
                     "us_per_step": 1e6 * stats.run_s / max(stats.steps, 1),
                     "requests_per_s_simulated": n / stats.run_s, "simulated_duration_s": float(np.nanmax(fin)),
                     "rejected": rej})
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
           "jax_backend": mist._jax.default_backend(), "deployment": "Llama-3.1-8B / 1x H100 / chunked prefill, "
           f"max_num_seqs={args.max_num_seqs}, stretch={args.stretch}", "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(out["deployment"], "|", out["machine"], "|", out["jax_backend"])
        print(f"{'requests':>9} {'compile_s':>9} {'run_s':>8} {'steps':>8} {'us/step':>8} {'req/s sim':>10} {'sim_dur_s':>9}")
        for r in rows:
            print(f"{r['requests']:>9} {r['compile_s']:>9.2f} {r['run_s']:>8.3f} {r['scan_steps']:>8} "
                  f"{r['us_per_step']:>8.1f} {r['requests_per_s_simulated']:>10.0f} {r['simulated_duration_s']:>9.1f}")
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            print(f"run time grows {b['run_s'] / a['run_s']:.1f}x for {b['requests'] / a['requests']:.0f}x requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
