"""Sweep speed: configs per second and simulated requests per second of `mist.sweep`, with
lowering, compile and summary time reported separately from simulation time. The summaries of
configs that ended are computed while the next compiled call simulates, so `sweep_s` (simulation and
summaries, wall time) is less than run_s + summ_s. On CPU, `import mist` makes one XLA device per
core (MIST_CPU_DEVICES=1 for one), and the configs are sharded over them.

Configs are Latin-hypercube samples over hardware (H100, H200, A100-80GB, B200), tensor
parallelism (1, 2), max_num_seqs (64, 128), max_num_batched_tokens (4096, 8192) and arrival rate
(2 to 20 requests/s, log-uniform), serving Llama-3.1-8B (one replica, chunked prefill) on the first
1k / 10k requests of the bundled Azure LLM inference 2023 conversation trace. Prints a table and
writes experiments/results/bench_sweep.json. Combinations whose estimated simulation time
(from the measured cost per lane-step and steps per config of smaller runs) exceeds --budget-s are
skipped and listed as such, with the estimate.

    python experiments/bench_sweep.py [--configs 1 16 256 4096] [--requests 1000 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import mist  # noqa: F401
import mist.sweep
from mist.sweep import prepare, run_prepared
from mist.sweep.lowering import SWEEP_ABSORB


def spec(n_configs: int, n_requests: int, stretch: int, slots: int, chunk: int | None,
         absorb: int | None = None) -> dict:
    axes = {"hardware": ["H100-SXM", "H200-SXM", "A100-SXM-80GB", "B200"], "tp": [1, 2], "max_num_seqs": [64, 128],
            "max_num_batched_tokens": [4096, 8192], "rate": {"min": 2.0, "max": 20.0, "log": True}}
    return {"name": f"bench-{n_configs}x{n_requests}",
            "base": {"workload": {"trace": "azure_conv_2023", "first": n_requests},
                     "clients": [{"name": "llm", "pool": "llm", "model": "llama-3.1-8b", "hardware": "H100-SXM",
                                  "policy": "chunked", "max_num_seqs": 128}],
                     "engine": {"stretch": stretch, **({} if absorb is None else {"absorb": absorb})}},
            "axes": axes, "sample": {"kind": "lhs", "n": n_configs, "seed": 0},
            "run": {"slots": slots, "progress": False, **({"configs_per_chunk": chunk} if chunk else {})}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, nargs="+", default=[1, 16, 256, 4096])
    ap.add_argument("--requests", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--stretch", type=int, default=64)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--absorb", type=int, default=None,
                    help="arrivals admitted inside a decode stretch (engine.absorb; default: the sweep's, "
                         "mist.sweep.lowering.SWEEP_ABSORB)")
    ap.add_argument("--configs-per-chunk", type=int, default=None, help="default: what fits the memory budget")
    ap.add_argument("--budget-s", type=float, default=900.0, help="skip runs estimated to simulate longer")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_sweep.json"))
    args = ap.parse_args(argv)
    rows, windows = [], set()
    cost = {}  # requests -> (seconds per lane-step, mean steps per config and request) measured so far
    overhead = (0, 1.0)  # (configs, lane-steps per config / mean config steps) of the largest sweep run so far
    for nr in args.requests:
        for nc in sorted(args.configs):
            if cost:  # measured at this request count, else at the nearest one measured
                per_cs, steps_per_req = cost[min(cost, key=lambda m: abs(m - nr))]
                est = per_cs * nc * steps_per_req * overhead[1] * nr
                if est > args.budget_s:
                    rows.append({"configs": nc, "requests": nr, "skipped": True, "estimated_run_s": est})
                    continue
            t0 = time.perf_counter()
            prep = prepare(spec(nc, nr, args.stretch, args.slots, args.configs_per_chunk, args.absorb))
            t1 = time.perf_counter()
            df = run_prepared(prep, progress=False)
            total = time.perf_counter() - t1
            info = prep.info
            windows.add(prep.lowered.dims.window)  # the admission window the sweep ran with
            # the summaries run while the next compiled call simulates (see runner.run_chunks): `summ` is
            # the consumer's own time, `sweep_s` the wall time of simulation and summaries, compile excluded
            summ = total - info.run_s - info.compile_s
            # lanes x batch steps = every lane-step run, busy or idle (a lane idles from its config's
            # end to the end of a call, and in the tail once no config waits)
            lane_steps = info.steps * info.configs_per_chunk
            per_cs = info.run_s / max(lane_steps, 1)
            mean_steps = float(df["scan_steps"].mean())
            cost[nr] = (per_cs, mean_steps / nr)
            if nc >= overhead[0]:
                overhead = (nc, lane_steps / nc / max(mean_steps, 1.0))
            feas = int(df["feasible"].sum())
            rows.append({"configs": nc, "requests": nr, "feasible": feas, "skipped": False,
                         "lower_s": t1 - t0, "compile_s": info.compile_s, "run_s": info.run_s, "summary_s": summ,
                         "sweep_s": total - info.compile_s, "devices": info.devices,
                         "configs_per_s": feas / info.run_s, "sim_requests_per_s": feas * nr / info.run_s,
                         "lanes": info.configs_per_chunk, "batch_steps": info.steps,
                         "lane_steps_per_config": lane_steps / nc, "config_steps_mean": mean_steps,
                         "config_steps_max": int(df["scan_steps"].max()),
                         "us_per_lane_step": 1e6 * per_cs, "end_to_end_s": time.perf_counter() - t0})
    target = None
    big = [r for r in rows if r["requests"] == 10000 and not r["skipped"]]
    if 10000 in cost:
        per_cs, spr = cost[10000]
        target = {"configs": 1000, "requests": 10000, "estimated_run_s": per_cs * 1000 * spr * overhead[1] * 10000,
                  "basis": "s per lane-step and mean steps per config at 10k requests (largest config count "
                           f"run) x lane-steps per config / mean steps of the largest sweep run ({overhead[0]} "
                           f"configs: {overhead[1]:.2f})", "goal_s": 120}
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} (shared with other jobs)",
           "jax_backend": mist._jax.default_backend(), "devices": len(mist._jax.devices()),
           "deployment": f"Llama-3.1-8B, 1 replica, chunked; slots {args.slots}, stretch {args.stretch}"
                         + f", absorb {SWEEP_ABSORB if args.absorb is None else args.absorb}"
                         + f", window {'/'.join(map(str, sorted(windows)))}",
           "results": rows, "target_1000x10k": target, "measured_10k": big}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(out["deployment"], "|", out["machine"], "|", out["jax_backend"], f"x {out['devices']} devices")
    print(f"{'configs':>7} {'requests':>8} {'lanes':>5} {'lower_s':>7} {'compile_s':>9} {'run_s':>8} {'summ_s':>7} "
          f"{'sweep_s':>7} "
          f"{'cfg/s':>8} {'req/s':>9} {'steps/cfg':>9} {'lane-steps/cfg':>14} {'us/lane-step':>12}")
    for r in rows:
        if r["skipped"]:
            print(f"{r['configs']:>7} {r['requests']:>8}  skipped: estimated {r['estimated_run_s']:.0f} s of simulation")
            continue
        print(f"{r['configs']:>7} {r['requests']:>8} {r['lanes']:>5} {r['lower_s']:>7.1f} {r['compile_s']:>9.1f} "
              f"{r['run_s']:>8.2f} {r['summary_s']:>7.1f} {r['sweep_s']:>7.1f} {r['configs_per_s']:>8.2f} "
              f"{r['sim_requests_per_s']:>9.0f} "
              f"{r['config_steps_mean']:>9.0f} {r['lane_steps_per_config']:>14.0f} {r['us_per_lane_step']:>12.1f}")
    if target:
        print(f"1000 configs x 10k requests: estimated {target['estimated_run_s']:.0f} s of simulation (goal 120 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
