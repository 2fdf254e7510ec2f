"""`mist calibrate ...`: fit, evaluate, transfer and report the cost model's calibration.

    mist calibrate --hardware H [--sources S ...] [--steps N]      fit H and write its params file
    mist calibrate evaluate --hardware H --path P [--format F] [--json]
    mist calibrate transfer --hardware H [--from X]               params for H from a measured device
    mist calibrate report                                          regenerate calibration/REPORT.md
"""

from __future__ import annotations

import argparse
import json
import sys

FORMATS = ("table", "csv", "parquet", "aiconfigurator", "vidur", "aiter", "llmcompass")


def _fmt_table(df) -> str:
    return df.to_string(float_format=lambda v: f"{v:.2f}")


def _cmd_fit(a) -> int:
    from .fit import calibrate

    sources = [s for x in (a.sources or []) for s in x.split(",") if s]
    res = calibrate(a.hardware, sources=sources or None, steps=a.steps, lr=a.lr, save=not a.dry_run)
    s = res.summary()
    if a.json:
        print(json.dumps({"device": res.device, "seconds": res.seconds, "dropped": res.dropped,
                          "gemm_stacks": {"default": res.default_stack, "own_parameters": res.stack_rows},
                          "ops": json.loads(s.to_json(orient="index"))}, indent=2))
    else:
        print(f"{res.device}: fitted on {len(res.train)} rows, tested on {len(res.test)} held-out shapes "
              f"in {res.seconds:.1f} s")
        print(_fmt_table(s))
        if res.dropped:
            print("dropped: " + ", ".join(f"{v} {k}" for k, v in sorted(res.dropped.items())))
        if res.stacks:
            print(f"GEMM parameters of the default stack ({res.default_stack}) and of "
                  + ", ".join(f"{k} ({n} training rows)" for k, n in sorted(res.stack_rows.items())))
        if not a.dry_run:
            from ..cost.params import params_path

            print(f"wrote {params_path(res.device)}")
    return 0


def _cmd_evaluate(a) -> int:
    from .evaluate import evaluate

    m = evaluate(a.hardware, a.path, None if a.format in (None, "table") else a.format)
    if a.json:
        print(json.dumps({"device": m.attrs["device"], "params_origin": m.attrs["params_origin"],
                          "rows": m.attrs["rows"], "predicted_rows": m.attrs["predicted_rows"],
                          "dropped": m.attrs["dropped"], "gemm_stacks": m.attrs["gemm_stacks"],
                          "ops": json.loads(m.to_json(orient="index"))}, indent=2))
    else:
        print(f"{m.attrs['device']} ({m.attrs['params_origin']}): {m.attrs['predicted_rows']} of "
              f"{m.attrs['rows']} rows predicted")
        print(_fmt_table(m.rename(columns={"mape": "MAPE %", "p90_ape": "p90 APE %"})))
        if m.attrs["gemm_stacks"]:
            print("GEMM rows measured by " + ", ".join(m.attrs["gemm_stacks"]) + " (source column) are scored "
                  "with that stack's own GEMM parameters")
        if m.attrs["dropped"]:
            print("dropped: " + ", ".join(f"{v} {k}" for k, v in sorted(m.attrs["dropped"].items())))
    return 0


def _cmd_transfer(a) -> int:
    from .fit import transfer_params

    _, meta = transfer_params(a.hardware, getattr(a, "from_"))
    from ..specs.catalog import get_hardware

    print(f"{get_hardware(a.hardware).name}: {meta['origin']} ({meta['reason']}); caveat: {meta['caveat']}")
    return 0


def _cmd_report(a) -> int:
    from .report import write_report

    p = write_report(refit=a.refit, steps=a.steps)
    print(f"wrote {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mist calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", help="device to fit (catalog name or alias)")
    p.add_argument("--sources", nargs="*", help="read these sources from the shared measured data "
                   "instead of the curated traces/ops subset (vidur, aiconfigurator, aiter, llmcompass)")
    p.add_argument("--steps", type=int, default=600, help="Adam steps (default 600)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="cmd")
    e = sub.add_parser("evaluate", help="score the current parameters on a measured table")
    e.add_argument("--hardware", required=True)
    e.add_argument("--path", required=True, help="a normalised table (CSV/Parquet) or a source's folder")
    e.add_argument("--format", choices=FORMATS, default=None)
    e.add_argument("--json", action="store_true")
    t = sub.add_parser("transfer", help="parameters for a device without measurements")
    t.add_argument("--hardware", required=True)
    t.add_argument("--from", dest="from_", default=None, help="measured device to copy (default: closest)")
    r = sub.add_parser("report", help="refit every measured device and regenerate calibration/REPORT.md")
    r.add_argument("--no-refit", dest="refit", action="store_false",
                   help="use the parameter files as they are")
    r.add_argument("--steps", type=int, default=600)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "calibrate":
        argv = argv[1:]
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if a.cmd == "evaluate":
            return _cmd_evaluate(a)
        if a.cmd == "transfer":
            return _cmd_transfer(a)
        if a.cmd == "report":
            return _cmd_report(a)
        if not a.hardware:
            p.error("--hardware is required to fit (or use: evaluate, transfer, report)")
        return _cmd_fit(a)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"mist calibrate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
