"""`mist sweep SWEEP.yaml --out DIR` and `mist search` (cheapest deployment meeting SLOs)."""

from __future__ import annotations

import json
import sys

from ._format import emit_json, table

SHOW = ("config", "deployment", "workload", "rate", "feasible", "completed", "output_throughput", "p99_ttft_ms",
        "p99_tpot_ms", "output_tokens_per_dollar", "slo_met")


def _cmd_sweep(args) -> int:
    from pathlib import Path

    from ..sweep import load_sweep, sweep
    from ..sweep.analysis import best_under_slo, pareto_front, plot_heatmap, plot_pareto

    spec = load_sweep(args.sweep)
    if args.configs_per_chunk:
        spec.run.configs_per_chunk = args.configs_per_chunk
    if args.memory_gb:
        spec.run.memory_gb = args.memory_gb
    progress = not args.json and sys.stderr.isatty()
    process = (args.process_index, args.process_count) if args.process_count else None
    df = sweep(spec, out=args.out, progress=progress, distributed=args.distributed, process=process)
    run = df.attrs.get("run", {})
    feas = int(df["feasible"].sum())
    best = best_under_slo(df, objective=args.objective, k=args.top) if "slo_met" in df else df.head(0)
    if args.out and not args.distributed and not process:
        out = Path(args.out)
        front = pareto_front(df, per=args.per)
        front.to_csv(out / "pareto.csv", index=False)
        if not front.empty:
            plot_pareto(df, out / "pareto.png", per=args.per, front=None)
        if args.heatmap:
            x, y, metric = args.heatmap
            plot_heatmap(df, x, y, metric, out / f"heatmap_{metric}.png")
    if args.json:
        emit_json({"configs": len(df), "feasible": feas, "run": run,
                   "best": json.loads(best.to_json(orient="records")),
                   "infeasible": json.loads(df[~df["feasible"]][["config", "reason"]].to_json(orient="records"))})
        return 0
    print(f"{len(df)} configs, {feas} feasible; lowered in {run.get('lower_s', 0):.1f} s, compiled in "
          f"{run.get('compile_s', 0):.1f} s, ran {run.get('chunks', 0)} chunk(s) of {run.get('configs_per_chunk', 0)} "
          f"on {run.get('devices', 1)} device(s) in {run.get('run_s', 0):.1f} s")
    for _, r in df[~df["feasible"]].head(5).iterrows():
        print(f"  infeasible config {r['config']}: {r['reason']}")
    if len(best):
        print(f"\nbest {len(best)} by {args.objective} meeting the SLOs:")
        print(table(best[[c for c in SHOW if c in best]].to_dict("records"), floatfmt=".4g"))
    else:
        print("\nno config meets the SLOs")
    if args.out:
        print(f"\nwrote {args.out}/sweep.parquet, sweep.csv, pareto.csv, pareto.png")
    return 0


def _cmd_search(args) -> int:
    from ..sweep.search import search

    res = search(model=args.model, rate=args.rate, hardware=args.hardware, tp=args.tp,
                 max_replicas=args.max_replicas, trace=args.trace, num_requests=args.num_requests,
                 slo={"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms}, top=args.top, refine=args.refine_grad,
                 out=args.out)
    if args.json:
        emit_json(res.to_json())
        return 0
    print(res.report())
    return 0


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a configuration sweep (grid / random / Latin hypercube) as one vmapped batch")
    p.add_argument("sweep", help="sweep file (YAML or TOML), see experiments/configs/*sweep*")
    p.add_argument("--out", default=None, help="directory for sweep.parquet, sweep.csv, pareto.csv/png")
    p.add_argument("--configs-per-chunk", type=int, default=None)
    p.add_argument("--memory-gb", type=float, default=None, help="memory budget per chunk (default: a share of free)")
    p.add_argument("--objective", default="output_tokens_per_dollar")
    p.add_argument("--per", default="dollar", choices=("dollar", "device", "gpu", "watt"),
                   help="throughput normalisation of the Pareto frontier")
    p.add_argument("--heatmap", nargs=3, metavar=("X_AXIS", "Y_AXIS", "METRIC"), default=None)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() and run this host's shard (writes part-<i>.parquet)")
    p.add_argument("--process-index", type=int, default=0, help=argparse_hidden())
    p.add_argument("--process-count", type=int, default=0, help=argparse_hidden())
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("search", help="cheapest deployment meeting SLOs at a given rate (grid + refinement)")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--rate", type=float, required=True, help="requests/s to serve")
    p.add_argument("--hardware", nargs="+", default=["h100", "h200", "a100-sxm-80gb", "l40s"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-replicas", type=int, default=8)
    p.add_argument("--trace", default="azure_conv_2023")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--ttft-ms", type=float, default=250.0)
    p.add_argument("--tpot-ms", type=float, default=25.0)
    p.add_argument("--top", type=int, default=5, help="runners-up to report")
    p.add_argument("--refine-grad", action="store_true",
                   help="also find the best deployment's rate at the mean-TTFT SLO boundary by Newton steps with "
                        "forward-mode derivatives through the scan, next to bisection")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_search)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


__all__ = ["register"]
