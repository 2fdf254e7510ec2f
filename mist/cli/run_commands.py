"""`mist simulate` and `mist bench latency|throughput|serve` (vLLM-style benchmarks, simulated)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ._format import emit_json, table


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _engine_args(p: argparse.ArgumentParser) -> None:
    from .main import _add_replica_args

    _add_replica_args(p)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enable-chunked-prefill", type=_bool, nargs="?", const=True, default=True,
                   help="chunked prefill (default on, as in vLLM v1); 'false' gives vLLM v0-style prefill priority")
    p.add_argument("--scheduling-policy", choices=["static", "continuous", "chunked", "decode-priority"], default=None,
                   help="batching policy (overrides --enable-chunked-prefill)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute",
                   help="when the KV cache runs out: drop a request's KV and recompute it, or swap it to host memory")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action="store_true")
    p.add_argument("--prefix-cache-hit-rate", type=float, default=None,
                   help="fraction of each prompt found in the prefix cache (else trace hash ids when present)")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel replicas behind --router")
    p.add_argument("--router", default="round-robin", choices=["round-robin", "least-outstanding", "prefix-affinity"])
    p.add_argument("--seeds", type=int, default=1, help="vmap N seeds; report mean and 95%% interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-noise", type=float, default=None, help="sigma of lognormal step-time noise (default off)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="directory for requests.csv/parquet, summary.json, trace.json")


def _deployment(args):
    from ..lowering import Deployment

    policy = args.scheduling_policy or ("chunked" if args.enable_chunked_prefill else "continuous")
    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    return Deployment.single(args.model, args.hardware, tp=args.tp, pp=args.pp, ep=args.ep, replicas=args.replicas,
                             router=args.router, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, policy=policy,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             block_size=args.block_size, memory_utilization=args.gpu_memory_utilization,
                             max_model_len=args.max_model_len, step_noise_sigma=args.step_noise,
                             preemption_mode=args.preemption_mode)


def _positive(name, v, allow_zero=False):
    if v is None:
        return
    if (v < 0) if allow_zero else (v <= 0):
        from ..specs.errors import SpecError

        raise SpecError("<arguments>", name, f"must be {'>= 0' if allow_zero else '> 0'}, got {v}", f"pass a valid --{name}")


def _with_cache(d: dict, args) -> dict:
    from ..lowering.prefix_cache import cached_from_hashes, cached_from_hit_rate

    if args.prefix_cache_hit_rate is not None:
        d["cached_tokens"] = cached_from_hit_rate(d["input_tokens"], args.prefix_cache_hit_rate, args.block_size)
    elif args.enable_prefix_caching and "prefix_hash" in d and np.asarray(d["prefix_hash"]).max() >= 0:
        from ..lowering.prefix_cache import predicted_clients

        clients, replicas = predicted_clients(_deployment(args), np.zeros(len(d["input_tokens"]), np.int64),
                                              d["prefix_hash"])
        d["cached_tokens"] = cached_from_hashes(d["prefix_hash"], d["input_tokens"], capacity_blocks=1 << 16,
                                                clients=clients, replicas=replicas)
    return d


def _fixed(n, inp, out, arrival):
    return {"arrival": np.asarray(arrival, float), "input_tokens": np.full(n, inp), "output_tokens": np.full(n, out)}


def _trace_lengths(args):
    from ..workload import bundled_trace, bundled_trace_names, load_trace

    r = bundled_trace(args.trace) if args.trace in bundled_trace_names() else load_trace(args.trace)
    d = r.to_numpy(valid_only=True)
    if args.num_prompts:
        for k in list(d):
            d[k] = np.asarray(d[k])[: args.num_prompts]
    return d


def _run(args, workloads):
    from ..simulate import simulate

    wl = [_with_cache(w, args) for w in workloads]
    return simulate(deployment=_deployment(args), seeds=len(wl), workloads=wl, seed=args.seed,
                    progress=not args.json and sys.stderr.isatty())


def _common_json(res) -> dict:
    s = res.summary
    return {"rejected": s.get("rejected", 0), "rejected_reasons": s.get("rejected_by_reason", {}),
            "preemptions": s.get("total_preemptions", 0),
            "sim_compile_s": res.stats.compile_s, "sim_run_s": res.stats.run_s, "sim_steps": res.stats.steps}


def _cmd_latency(args) -> int:
    for n in ("batch", "input_len", "output_len"):
        _positive(n, getattr(args, n))
    wls = [_fixed(args.batch, args.input_len, args.output_len, np.zeros(args.batch)) for _ in range(args.seeds)]
    res = _run(args, wls)
    lats = [float(s["duration_s"]) for s in (res.seed_summaries or [res.summary])]
    pct = {str(p): float(np.percentile(lats, p)) for p in (10, 25, 50, 75, 90, 99)}
    out = {"avg_latency": float(np.mean(lats)), "latencies": lats, "percentiles": pct, **_common_json(res)}
    return _finish(args, res, out, f"batch {args.batch} x ({args.input_len} in, {args.output_len} out) on "
                   f"{args.model} / {args.hardware} tp={args.tp}: avg latency {out['avg_latency']:.4f} s over "
                   f"{args.seeds} seed(s)")


def _finish(args, res, out: dict, line: str) -> int:
    """Write outputs if asked, then print the JSON object or a one-line report."""
    if args.out:
        res.write(args.out)
    if args.json:
        emit_json(out)
    else:
        print(line)
        print(f"simulated in {res.stats.run_s:.3f} s (+{res.stats.compile_s:.1f} s compile)")
    return 0


def _cmd_throughput(args) -> int:
    _positive("num_prompts", args.num_prompts)
    if args.trace:
        d = _trace_lengths(args)
        d["arrival"] = np.zeros(len(d["arrival"]))
    else:
        for n in ("input_len", "output_len"):
            _positive(n, getattr(args, n))
        n = args.num_prompts or 1000
        d = _fixed(n, args.input_len, args.output_len, np.zeros(n))
    res = _run(args, [dict(d) for _ in range(args.seeds)])
    s = res.summary
    dur = s["duration_s"]
    done = s["completed"]
    inp = float(s.get("total_input_tokens", 0))
    outt = float(s.get("total_output_tokens", 0))
    out = {"elapsed_time": dur, "num_requests": done, "total_num_tokens": inp + outt,
           "requests_per_second": done / dur if dur else 0.0, "tokens_per_second": (inp + outt) / dur if dur else 0.0,
           "output_tokens_per_second": outt / dur if dur else 0.0, **_common_json(res)}
    if "seeds" in s:
        out["seeds"] = s["seeds"]
    return _finish(args, res, out, f"Throughput: {out['requests_per_second']:.2f} requests/s, "
                   f"{out['tokens_per_second']:.2f} total tokens/s, {out['output_tokens_per_second']:.2f} output "
                   f"tokens/s ({done} requests, {out['rejected']} rejected)")


SERVE_KEYS = ("completed", "request_throughput", "output_throughput", "total_token_throughput",
              "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
              "p90_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
              "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms")


def _cmd_serve(args) -> int:
    from ..workload import generate

    _positive("rate", args.rate)
    n = args.num_prompts or 1000
    wls = []
    for i in range(args.seeds):
        if args.trace:
            d = _trace_lengths(args)
            if args.rate is not None:
                arr = generate(args.seed + i, len(d["arrival"]), arrival={"kind": "poisson", "rate": args.rate},
                               input=1, output=1).to_numpy()["arrival"]
                d["arrival"] = np.asarray(arr, float)
        else:
            if args.rate is None:
                raise ValueError("--rate is required without --trace")
            d = generate(args.seed + i, n, arrival={"kind": "poisson", "rate": args.rate}, input=args.input_len,
                         output=args.output_len).to_numpy()
        wls.append(dict(d))
    res = _run(args, wls)
    s = res.summary
    out = {k: s.get(k) for k in SERVE_KEYS}
    out.update({"duration": s.get("duration_s"), "goodput": s.get("request_goodput"), "slo_met": s.get("slo_met"),
                "cost_per_million_output_tokens": s.get("cost_per_million_output_tokens"),
                "energy_per_output_token_j": s.get("energy_per_output_token_j"), **_common_json(res)})
    if "seeds" in s:
        out["seeds"] = s["seeds"]
    if args.out:
        res.write(args.out)
    if args.json:
        emit_json(out)
    else:
        _print_summary(s, res)
    return 0


def _print_summary(s: dict, res) -> None:
    ci = s.get("seeds", {})

    def val(k):
        v = s.get(k)
        if v is None:
            return "-"
        txt = f"{v:.4g}" if isinstance(v, float) else str(v)
        if k in ci and isinstance(ci[k], dict) and "ci95" in ci[k]:
            lo, hi = ci[k]["ci95"]
            txt += f"  [{lo:.4g}, {hi:.4g}]"
        return txt

    rows = []
    for metric in ("ttft", "tpot", "itl", "e2el"):
        rows.append({"metric": metric + " (ms)", **{p: val(f"{p}_{metric}_ms") for p in ("mean", "median", "p90", "p99")}})
    print(table(rows))
    print()
    keys = ["completed", "rejected", "duration_s", "request_throughput", "output_throughput", "request_goodput",
            "slo_met", "energy_per_output_token_j", "cost_per_million_output_tokens"]
    print(table([{"summary": k, "value": val(k)} for k in keys if k in s]))
    print(f"\nsimulated {s.get('completed', 0)} requests in {res.stats.run_s:.2f} s "
          f"(+{res.stats.compile_s:.1f} s compile, {res.stats.steps} scan steps)")


def _cmd_simulate(args) -> int:
    from ..simulate import simulate

    res = simulate(args.config, seeds=args.seeds, progress=not args.json and sys.stderr.isatty())
    if args.out:
        res.write(args.out)
    if args.json:
        emit_json({k: v for k, v in res.summary.items() if not k.startswith("_")})
    else:
        lo = res.lowered
        print(f"{lo.notes.get('name', '')}deployment: {', '.join(n for n in lo.client_names if not n.startswith('pad'))}")
        _print_summary(res.summary, res)
        if args.out:
            print(f"wrote {args.out}/requests.csv, requests.parquet, summary.json, trace.json")
    return 0


def register(sub) -> None:
    p = sub.add_parser("simulate", help="run a simulation config (default: the bundled trace and deployment)")
    p.add_argument("config", nargs="?", default=None, help="YAML or TOML config (default: bundled)")
    p.add_argument("--out", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_simulate)

    b = sub.add_parser("bench", help="vLLM-style latency / throughput / serving benchmarks, simulated")
    bsub = b.add_subparsers(dest="bench")
    p = bsub.add_parser("latency", help="a batch of identical requests arriving together")
    _engine_args(p)
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=8)
    p.add_argument("--input", "--input-len", dest="input_len", type=int, default=32)
    p.add_argument("--output", "--output-len", dest="output_len", type=int, default=128)
    p.set_defaults(func=_cmd_latency)
    p = bsub.add_parser("throughput", help="all requests available at once (offline)")
    _engine_args(p)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--input", "--input-len", dest="input_len", type=int, default=1024)
    p.add_argument("--output", "--output-len", dest="output_len", type=int, default=128)
    p.add_argument("--trace", default=None, help="bundled trace name or path (lengths only)")
    p.set_defaults(func=_cmd_throughput)
    p = bsub.add_parser("serve", help="Poisson arrivals at --rate; TTFT/TPOT/ITL/E2E percentiles")
    _engine_args(p)
    p.add_argument("--rate", "--request-rate", dest="rate", type=float, default=None)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--input", "--input-len", dest="input_len", type=int, default=1024)
    p.add_argument("--output", "--output-len", dest="output_len", type=int, default=128)
    p.add_argument("--trace", default=None)
    p.set_defaults(func=_cmd_serve)
    b.set_defaults(func=lambda a: (b.print_help(), 0)[1])


__all__ = ["register"]
