"""Entry point of the `mist` command line: sub-commands dispatch to small modules."""

from __future__ import annotations

import argparse
import sys

from ..specs.errors import SpecError, UnknownNameError


def _add_replica_args(p: argparse.ArgumentParser, model_default: str | None = "llama-3.1-8b",
                      hardware_default: str | None = "h100") -> None:
    p.add_argument("--model", default=model_default, help="catalog name, Hugging Face id, or path of a config.json")
    p.add_argument("--hardware", default=hardware_default, help="catalog device name or path of a device spec")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--ep", "--expert-parallel-size", dest="ep", type=int, default=1)
    p.add_argument("--dtype", default=None, help="weight format: bf16, fp16, fp8, fp4, int4 (default: the model's)")
    p.add_argument("--kv-cache-dtype", default=None, help="KV-cache format: bf16, fp8, fp4")


def _cmd_estimate(args) -> int:
    from ..estimate import estimate
    from ._format import emit_json, table

    # with no options at all: a table over batch sizes for the bundled default model and device
    if args.json or args.options_given:
        r = estimate(args.model, args.hardware, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                     kv_cache_dtype=args.kv_cache_dtype, batch=args.batch, input=args.input, output=args.output)
        if args.json:
            emit_json(r)
            return 0
        rows = [r]
    else:
        rows = [estimate(args.model, args.hardware, batch=b, input=args.input, output=args.output)
                for b in (1, 8, 32, 128)]
    r0 = rows[0]
    print(f"{r0['model']} on {r0['hardware']} (tp={r0['tp']}, pp={r0['pp']}, ep={r0['ep']}, weights {r0['dtype']}, "
          f"KV {r0['kv_cache_dtype']}); cost parameters: {r0['cost_params']}")
    mem = r0["memory_gb"]
    print(f"memory per device: weights {mem['weights']:.1f} GB, activations {mem['activations']:.2f} GB, "
          f"runtime {mem['runtime']:.1f} GB, KV cache {mem['kv_cache']:.1f} GB of {mem['capacity']:.0f} GB "
          f"-> {r0['kv_capacity_tokens']:,} KV tokens")
    print(table([{"batch": r["batch"], "input": r["input"], "output": r["output"],
                  "prefill_ms": r["prefill_ms"], "decode_ms/token": r["decode_ms_per_token"],
                  "e2e_ms": r["e2e_ms"], "output_tok/s": r["output_tokens_per_s"],
                  "kv_fits": r["kv_fits_batch"]} for r in rows]))
    return 0


def _cmd_models(args) -> int:
    from ..specs.catalog import all_models
    from ._format import emit_json, table

    rows = [m.summary() for m in all_models()]
    if args.json:
        emit_json(rows)
    else:
        print(table(rows, ["name", "hf_id", "kind", "params_b", "active_params_b", "layers", "hidden", "heads",
                           "kv_heads", "experts", "top_k", "mla", "weight_dtype"], floatfmt=".4g"))
    return 0


def _cmd_hardware(args) -> int:
    from ..specs.catalog import all_hardware
    from ._format import emit_json, table

    rows = [d.summary() for d in all_hardware()]
    if args.json:
        emit_json(rows)
    else:
        print(table(rows, floatfmt=".4g"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mist", description="MIST: simulate multi-stage LLM inference serving on "
                                 "heterogeneous hardware.")
    sub = ap.add_subparsers(dest="command")

    p = sub.add_parser("estimate", help="per-iteration latency, KV capacity and memory of one replica")
    _add_replica_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input", "--input-len", dest="input", type=int, default=2048)
    p.add_argument("--output", "--output-len", dest="output", type=int, default=128)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("hardware", help="list the hardware catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_hardware)

    p = sub.add_parser("calibrate", help="fit, evaluate and report the cost model against measurements",
                       add_help=False)
    p.set_defaults(func=None)

    try:
        from . import run_commands

        run_commands.register(sub)
        from . import sweep_commands; sweep_commands.register(sub)  # noqa: E702
    except ImportError:  # engine front ends not present
        pass
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "calibrate":
        from ..calibration.cli import main as calibrate_main

        return _guard(lambda: calibrate_main(argv[1:]))
    ap = build_parser()
    args = ap.parse_args(argv)
    args.options_given = len(argv) > 1  # from argv, not sys.argv: main() may be called in-process
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    return _guard(lambda: args.func(args))


def _guard(fn) -> int:
    """Turn spec errors into one clear line on stderr and exit code 2 (no traceback)."""
    try:
        return int(fn() or 0)
    except (SpecError, UnknownNameError) as e:
        print(f"mist: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"mist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
