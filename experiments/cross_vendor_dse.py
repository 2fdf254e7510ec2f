"""Cross-vendor design-space exploration: Qwen3-32B served at 100 requests/s for a chat workload
(Azure LLM inference 2023, conversation) and a code workload (Azure 2023, code), over H200, B200,
GB300, MI350X, MI355X, TPU v6e, TPU v7 and a transformer ASIC (Etched-Sohu-like), homogeneous
(colocated, or prefill/decode disaggregated on one SKU) and heterogeneous (prefill on one SKU,
decode on another). SLOs from DESIGN.md (TTFT 250 ms, TPOT 25 ms, P50/P90/P99 slowdowns 2/3/6x and
1.25/1.5/5x, nothing rejected).

Method. Each serving unit (one colocated replica, or P prefill + D decode clients) is simulated on
N requests drawn at random from the whole trace (`--arrivals first`: its first N rows) with
arrivals rescaled to a rate, and the highest rate that meets the SLOs is found for every unit at
once by a vectorised bisection over rate (`mist.sweep.max_sustainable_rate`: each round is one
vmapped batch of the units still undecided). Every unit is tried with several batching-knob
settings (`knob_grid`: the colocated token budget max_num_batched_tokens, the prefill clients'
budget, max_num_seqs), and each unit keeps its best setting (highest sustainable rate, then its own
tokens per dollar). 100 requests/s is then served by ceil(100 / max_rate) units behind a router
(assumed to split load evenly), so output tokens per dollar = 100 x mean output tokens x 3600 /
(units x unit $/h). Prices: the catalog's hourly list prices (`mist hardware`; the MIST study's:
H200 6.31, B200 8.60, GB300 12, ASIC 12, MI350X 7.5, MI355X 9.5, TPU v6e 3, TPU v7 8 $/h per
device).

    python experiments/cross_vendor_dse.py [--quick] [--out DIR] [--requests N] [--rounds R]
        [--mbt N ...] [--prefill-mbt N ...] [--seqs N ...] [--ratios P:D ...] [--skus ...] [--progress]

Outputs: cross_vendor_dse.csv (every unit x knob setting; best_knobs marks each unit's best),
cross_vendor_dse_units.csv (the best setting per unit), cross_vendor_dse_best.csv (best homogeneous
vs best heterogeneous per workload), cross_vendor_dse.png, run_time_s.txt, run_info.json.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

import mist  # noqa: F401
from mist.sweep import max_sustainable_rate, prepare

SKUS = ["H200-SXM", "B200", "GB300", "MI350X", "MI355X", "TPU-v6e", "TPU-v7", "Etched-Sohu"]
MODEL = "qwen3-32b"
WORKLOADS = {"chat": "azure_conv_2023", "code": "azure_code_2023"}
TARGET_RATE = 100.0
#: bisection bracket per workload (req/s per unit): chat units sustain tens of req/s, code units (2k-token
#: prompts, prefill-bound) a few
BRACKETS = {"chat": (1.0, 128.0), "code": (0.25, 32.0)}


def tp_options(sku: str, quick: bool) -> list[int]:
    """Tensor-parallel degrees tried: the smallest that holds Qwen3-32B (bf16, ~66 GB) with room for
    KV, and twice that (full mode)."""
    base = 4 if sku == "TPU-v6e" else 1
    return [base] if quick else [base, 2 * base]


def knob_grid(kind: str, args) -> list[dict]:
    """Batching knobs tried for each serving unit (the best setting per unit is kept).

    Colocated replicas (chunked prefill): the per-iteration token budget `max_num_batched_tokens`
    (a small budget bounds how long a mixed prefill+decode iteration takes, so co-scheduled decodes
    keep their TPOT, at the cost of slower prefills) x `max_num_seqs`. Disaggregated units: the
    prefill clients' token budget (`prefill.max_num_batched_tokens`) x the decode clients' batch cap
    (`decode.max_num_seqs`); decode clients always get a small prefill budget (512 tokens), which only
    matters when a preempted request recomputes its prompt there.
    """
    if kind == "colocated":
        return [{"max_num_batched_tokens": m, "max_num_seqs": s} for m in args.mbt for s in args.seqs]
    return [{"prefill.max_num_batched_tokens": m, "decode.max_num_batched_tokens": args.decode_mbt,
             "decode.max_num_seqs": s} for m in args.prefill_mbt for s in args.seqs]


def points(skus: list[str], ratios: list[str], quick: bool, args) -> list[dict]:
    pts = []
    for s in skus:
        for tp in tp_options(s, quick):
            for k in knob_grid("colocated", args):
                pts.append({"hardware": s, "tp": tp, "pd_ratio": "colocated", **k})
    for p in skus:
        for d in skus:
            for r in ratios:
                for k in knob_grid("disaggregated", args):
                    pts.append({"pd_ratio": r, "prefill.hardware": p, "prefill.tp": tp_options(p, True)[0],
                                "decode.hardware": d, "decode.tp": tp_options(d, True)[0],
                                "prefill.max_num_seqs": max(args.seqs), **k})
    return pts


def knobs_label(pt: dict) -> str:
    if pt.get("pd_ratio", "colocated") == "colocated":
        return f"mbt {pt['max_num_batched_tokens']}, seqs {pt['max_num_seqs']}"
    return f"P mbt {pt['prefill.max_num_batched_tokens']}; D seqs {pt['decode.max_num_seqs']}"


def label(pt: dict) -> str:
    if pt.get("pd_ratio", "colocated") == "colocated":
        return f"{pt['hardware']} tp{pt['tp']} colocated"
    return f"P:{pt['prefill.hardware']} tp{pt['prefill.tp']} / D:{pt['decode.hardware']} tp{pt['decode.tp']} " \
           f"({pt['pd_ratio']})"


def run(workload: str, trace: str, pts: list[dict], args) -> pd.DataFrame:
    spec = {"name": f"dse-{workload}",
            "base": {"workload": {"trace": trace, **({"first": args.requests} if args.arrivals == "first"
                                                      else {"sample": args.requests, "seed": args.seed})},
                     "clients": [{"name": "llm", "pool": "llm", "model": MODEL, "hardware": "H200-SXM",
                                  "policy": "chunked", "max_num_seqs": max(args.seqs)}],
                     "routers": {"llm": "round-robin"}},
            "points": pts,
            "run": {**({"configs_per_chunk": args.configs_per_chunk} if args.configs_per_chunk else {}),
                    "clients": args.clients, "slots": max(args.seqs),
                    "stages": 2, "pools": 2, "requests": args.requests, "progress": False}}
    prep = prepare(spec)
    t0 = time.perf_counter()
    low, high = args.low or BRACKETS[workload][0], args.high or BRACKETS[workload][1]
    rates = max_sustainable_rate(prep, low=low, high=high, rounds=args.rounds, progress=args.progress)
    print(f"{workload}: {len(prep.plans)} configs, compile {prep.info.compile_s:.0f} s, run {prep.info.run_s:.0f} s "
          f"({prep.info.configs} config-runs in {prep.info.chunks} chunks), total {time.perf_counter() - t0:.0f} s",
          flush=True)
    mean_out = {w: float(np.mean(np.asarray(v["output_tokens"]))) for w, v in prep.workloads.items()}
    rows = []
    by_cfg = rates.set_index("config")
    for p in prep.plans:
        pt = p.point
        homo = pt.get("pd_ratio") == "colocated" or pt["prefill.hardware"] == pt["decode.hardware"]
        r = {"workload": workload, "config": p.index, "deployment": label(pt), "knobs": knobs_label(pt),
             "feasible": p.feasible, "reason": p.reason, "homogeneous": homo,
             "kind": "colocated" if pt.get("pd_ratio") == "colocated" else "disaggregated", **dict(pt)}
        if p.feasible:
            m = by_cfg.loc[p.index]
            unit_price = float(m["price_per_hour_usd"]) if np.isfinite(m["price_per_hour_usd"]) else math.nan
            rate = float(m["max_rate"])
            units = math.ceil(TARGET_RATE / rate) if rate > 0 else math.inf
            r.update(max_rate_per_unit=rate, rate_upper=float(m["upper"]), unit_price_per_hour=unit_price,
                     unit_p99_ttft_ms=float(m["p99_ttft_ms"]), unit_p99_tpot_ms=float(m["p99_tpot_ms"]),
                     unit_output_tokens_per_dollar=float(m["output_tokens_per_dollar"]), units_for_target=units,
                     price_per_hour_at_target=units * unit_price if math.isfinite(units) else math.inf,
                     output_tokens_per_dollar_at_target=(TARGET_RATE * mean_out[p.workload] * 3600.0
                                                         / (units * unit_price)) if math.isfinite(units) else 0.0)
        rows.append(r)
    return mark_best_knobs(pd.DataFrame(rows))


def mark_best_knobs(df: pd.DataFrame) -> pd.DataFrame:
    """`best_knobs`: the knob setting of each serving unit (same workload and deployment) with the
    highest sustainable rate, ties broken by the unit's own output tokens per dollar at that rate."""
    df = df.copy()
    df["best_knobs"] = False
    ok = df[df["feasible"]].copy()
    if ok.empty:
        return df
    ok["_tpd"] = ok["unit_output_tokens_per_dollar"].fillna(-1.0)
    ok = ok.sort_values(["max_rate_per_unit", "_tpd", "config"], ascending=[False, False, True], kind="stable")
    best = ok.groupby(["workload", "deployment"], sort=False).head(1).index
    df.loc[best, "best_knobs"] = True
    return df


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(dict.fromkeys(df["workload"]))
    fig, axes = plt.subplots(1, len(wls), figsize=(6 * len(wls), 4.2), squeeze=False)
    for ax, w in zip(axes[0], wls):
        d = df[(df["workload"] == w) & df["feasible"] & df["best_knobs"]]
        homo = d[d["homogeneous"]].copy()
        homo["sku"] = [x["hardware"] if x["kind"] == "colocated" else x["prefill.hardware"] for _, x in homo.iterrows()]
        best_h = homo.groupby("sku")["output_tokens_per_dollar_at_target"].max().sort_values()
        het = d[~d["homogeneous"]].sort_values("output_tokens_per_dollar_at_target")
        names = list(best_h.index) + (["best hetero:\n" + het.iloc[-1]["deployment"].replace(" / ", "\n")]
                                      if len(het) else [])
        vals = list(best_h.values) + ([het.iloc[-1]["output_tokens_per_dollar_at_target"]] if len(het) else [])
        colors = ["tab:blue"] * len(best_h) + ["tab:orange"] * (1 if len(het) else 0)
        ax.barh(range(len(vals)), vals, color=colors)
        ax.set_yticks(range(len(vals)), names, fontsize=7)
        ax.set_xlabel(f"output tokens per $ at {TARGET_RATE:g} req/s meeting SLOs")
        ax.set_title(f"Qwen3-32B, {w} ({WORKLOADS[w]}), best knobs per unit", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for w, d in df[df["feasible"] & df["best_knobs"]].groupby("workload", sort=False):
        key = "output_tokens_per_dollar_at_target"
        h = d[d["homogeneous"]].sort_values([key, "max_rate_per_unit"], ascending=False)
        x = d[~d["homogeneous"]].sort_values([key, "max_rate_per_unit"], ascending=False)
        bh, bx = (h.iloc[0] if len(h) else None), (x.iloc[0] if len(x) else None)
        gain = (bx[key] / bh[key] - 1) * 100 if bh is not None and bx is not None and bh[key] > 0 else math.nan
        row = {"workload": w}
        for tag, b in (("homogeneous", bh), ("heterogeneous", bx)):
            row.update({f"best_{tag}": None if b is None else b["deployment"],
                        f"{tag}_knobs": None if b is None else b["knobs"],
                        f"{tag}_rate_per_unit": None if b is None else b["max_rate_per_unit"],
                        f"{tag}_unit_price_per_hour": None if b is None else b["unit_price_per_hour"],
                        f"{tag}_tokens_per_dollar": None if b is None else b[key],
                        f"{tag}_units": None if b is None else b["units_for_target"]})
        row["heterogeneous_gain_pct"] = gain
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 SKUs, 1:1 only, 2 colocated token budgets, 20 requests, 3 bisection rounds (< 1 min)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cross_vendor_dse"))
    ap.add_argument("--requests", type=int, default=None, help="requests per simulation (default 200; quick 20)")
    ap.add_argument("--rounds", type=int, default=None, help="bisection rounds (default 5; quick 3)")
    ap.add_argument("--low", type=float, default=None,
                    help="lowest rate tried per unit (req/s; default chat 1, code 0.25)")
    ap.add_argument("--high", type=float, default=None,
                    help="highest rate tried per unit (req/s; default chat 128, code 32)")
    ap.add_argument("--mbt", type=int, nargs="+", default=None,
                    help="colocated max_num_batched_tokens tried (default 512 2048 8192; quick 2048 8192)")
    ap.add_argument("--prefill-mbt", type=int, nargs="+", default=None,
                    help="prefill clients' max_num_batched_tokens tried (default 8192)")
    ap.add_argument("--decode-mbt", type=int, default=512, help="decode clients' max_num_batched_tokens (512)")
    ap.add_argument("--seqs", "--max-num-seqs", dest="seqs", type=int, nargs="+", default=None,
                    help="max_num_seqs tried (colocated, and decode clients; default 128; quick 32)")
    ap.add_argument("--configs-per-chunk", type=int, default=None)
    ap.add_argument("--skus", nargs="+", default=None, help=f"default: {' '.join(SKUS)}")
    ap.add_argument("--ratios", nargs="+", default=None, help="prefill:decode ratios (default 1:1 2:1; quick 1:1)")
    ap.add_argument("--arrivals", choices=["sample", "first"], default="sample",
                    help="requests per simulation: a random sample of the whole trace (default; thins its bursts "
                         "like a unit's share of a fleet's traffic) or its first N rows (the trace's own bursts)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the trace sample")
    ap.add_argument("--progress", action="store_true", help="progress bars over chunks (stderr)")
    ap.add_argument("--workloads", nargs="+", default=None, choices=list(WORKLOADS), help="default: all")
    args = ap.parse_args(argv)
    q = args.quick
    args.requests = args.requests or (20 if q else 200)
    args.rounds = args.rounds if args.rounds is not None else (3 if q else 5)
    args.mbt = args.mbt or ([2048, 8192] if q else [512, 2048, 8192])
    args.prefill_mbt = args.prefill_mbt or [8192]
    args.seqs = args.seqs or ([32] if q else [128])
    skus = args.skus or (["H200-SXM", "B200"] if q else SKUS)
    ratios = args.ratios or (["1:1"] if q else ["1:1", "2:1"])
    args.clients = max(sum(int(x) for x in r.split(":")) for r in ratios)
    pts = points(skus, ratios, q, args)
    # lanes: the sweep's default (a quarter of the configs, at least 64; lanes are refilled as configs
    # end), 2 in quick mode (the test suite's compiled program)
    args.configs_per_chunk = args.configs_per_chunk or (2 if q else None)
    wls = {w: WORKLOADS[w] for w in (args.workloads or WORKLOADS)}
    t0 = time.perf_counter()
    df = pd.concat([run(w, tr, pts, args) for w, tr in wls.items()], ignore_index=True)
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "cross_vendor_dse.csv", index=False)
    s = summary(df)
    s.to_csv(out / "cross_vendor_dse_best.csv", index=False)
    df[df["best_knobs"]].to_csv(out / "cross_vendor_dse_units.csv", index=False)
    plot(df, out / "cross_vendor_dse.png")
    print(f"{len(pts)} configs ({int(df['feasible'].sum())} feasible in all) x {len(wls)} workloads "
          f"({int(df['best_knobs'].sum())} units after keeping each unit's best knobs) in {elapsed:.0f} s "
          f"({'quick' if q else 'full'} mode, {args.requests} requests, {args.rounds} rounds)")
    for _, r in s.iterrows():
        print(f"{r['workload']}: best homogeneous {r['best_homogeneous']} [{r['homogeneous_knobs']}] "
              f"{r['homogeneous_rate_per_unit']:.3g} req/s/unit, {r['homogeneous_tokens_per_dollar']:.4g} tok/$"
              f" ({r['homogeneous_units']} units); best heterogeneous {r['best_heterogeneous']} "
              f"[{r['heterogeneous_knobs']}] {r['heterogeneous_rate_per_unit']:.3g} req/s/unit, "
              f"{r['heterogeneous_tokens_per_dollar']:.4g} tok/$ ({r['heterogeneous_units']} units): "
              f"{r['heterogeneous_gain_pct']:+.1f}% (published: chat +22%, code +49%)")
    (out / "run_time_s.txt").write_text(f"{elapsed:.1f}\n")
    import json
    import os
    import platform
    import sys

    (out / "run_info.json").write_text(json.dumps({
        "command": "python experiments/cross_vendor_dse.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": round(elapsed, 1), "arrivals": args.arrivals, "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average_at_end": os.getloadavg(), "requests": args.requests, "rounds": args.rounds,
        "configs_per_workload": len(pts), "skus": skus, "ratios": ratios, "mbt": args.mbt,
        "prefill_mbt": args.prefill_mbt, "decode_mbt": args.decode_mbt, "seqs": args.seqs,
        "brackets": {w: [args.low or BRACKETS[w][0], args.high or BRACKETS[w][1]] for w in wls}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
