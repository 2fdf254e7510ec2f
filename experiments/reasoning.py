"""Case study 1: the effect of reasoning on end-to-end latency and goodput.

Llama-3.1-70B on 64 H100s as 8 TP8 clients: continuous batching, chunked prefill, and prefill/decode
disaggregation 4P/4D, 2P/6D, 1P/7D (KV over a 50 GB/s, 5 us link), on the Azure 2023 conversation
and code traces (the first requests of each, rate-scaled). Reasoning variants: none, thinking tokens
x2 and x4 (output multiplier), and x2 with 4 parallel branches that share the prefill KV (a
request's end-to-end latency is its slowest branch). SLO: TTFT 250 ms, TPOT 25 ms.

    python experiments/reasoning.py --out experiments/results/reasoning [--quick]

Writes reasoning.csv and reasoning.png. All runs share one set of engine capacities (one compile).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import mist  # noqa: F401
from mist.lowering import stages as S
from mist.lowering.deployment import ClientSpec, Deployment, LinkSpec, PipelineSpec, StageSpec
from mist.workload import bundled_trace

MODEL = "llama-3.1-70b"
STRATEGIES = {"continuous": None, "chunked": None, "4P/4D": (4, 4), "2P/6D": (2, 6), "1P/7D": (1, 7)}
VARIANTS = {"none": (1.0, 1), "think x2": (2.0, 1), "think x4": (4.0, 1), "think x2, 4 branches": (2.0, 4)}
TRACES = {"conv": "azure_conv_2023", "code": "azure_code_2023"}


def deployment(strategy: str, clients: int = 8, max_num_seqs: int = 64) -> Deployment:
    kw = dict(model=MODEL, hardware="h100", tp=8, max_num_seqs=max_num_seqs)
    if STRATEGIES[strategy] is None:
        cs = [ClientSpec(f"llm{i}", "llm", policy=strategy, **kw) for i in range(clients)]
        return Deployment(cs, [PipelineSpec("chat", [StageSpec("llm", emits=True)])],
                          routers={"llm": "prefix-affinity"}, name=strategy)
    p, d = STRATEGIES[strategy]
    if clients != 8:  # quick mode: keep the P:D split shape on fewer clients
        p, d = max(1, round(p * clients / 8)), max(1, clients - max(1, round(p * clients / 8)))
    cs = [ClientSpec(f"p{i}", "prefill", role="prefill", policy="chunked", **kw) for i in range(p)]
    cs += [ClientSpec(f"d{i}", "decode", role="decode", policy="chunked", **kw) for i in range(d)]
    pipe = PipelineSpec("pd", [StageSpec("prefill", emits=True), StageSpec("decode", kv_transfer=True)])
    return Deployment(cs, [pipe], routers={"prefill": "prefix-affinity", "decode": "least-outstanding"},
                      links=[LinkSpec("prefill", "decode", 50.0, 5.0)], name=strategy)


def metrics(df: pd.DataFrame, parent, summary: dict) -> dict:
    pf = S.parent_frame(df, parent)
    done = pf[pf["completed"]]
    e2e = done["e2e"].to_numpy() * 1e3
    ttft = done["ttft"].to_numpy() * 1e3
    g = S.goodput(pf, 250.0, 25.0)
    return {"requests": len(pf), "completed": int(pf["completed"].sum()),
            "p50_e2e_ms": np.percentile(e2e, 50), "p90_e2e_ms": np.percentile(e2e, 90),
            "p99_e2e_ms": np.percentile(e2e, 99), "p50_ttft_ms": np.percentile(ttft, 50),
            "p99_ttft_ms": np.percentile(ttft, 99), "goodput_rps": g["goodput_rps"],
            "goodput_fraction": g["goodput_fraction"], "output_tok_s": summary["output_throughput"],
            "rejected": summary["rejected"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/reasoning")
    ap.add_argument("--quick", action="store_true", help="a tiny run for the tests")
    ap.add_argument("--requests", type=int, default=64, help="requests per trace (before branching)")
    ap.add_argument("--rate", type=float, default=12.0, help="arrival rate (req/s) the traces are scaled to")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.quick:
        n, clients, caps = 6, 2, S.QUICK_CAPS
        strategies, variants, traces = ["chunked", "4P/4D"], ["none", "think x2, 4 branches"], ["conv"]
    else:
        n, clients = a.requests, 8
        caps = dict(num_requests=4 * n, num_clients=8, slots=64, window=32, queue=4 * n + 16, stages=2, pools=2,
                    pipelines=1, stretch=64)
        strategies, variants, traces = list(STRATEGIES), list(VARIANTS), list(TRACES)
    rows = []
    for tr in traces:
        base = bundled_trace(TRACES[tr], first=n, rate=a.rate)
        for v in variants:
            mult, br = VARIANTS[v]
            d = S.apply_reasoning(base, multiplier=mult, branches=br, seed=0)
            for s in strategies:
                dep = deployment(s, clients, max_num_seqs=caps["slots"])
                df, summ, _ = S.simulate_at(dep, d, caps)
                m = metrics(df, d["parent"], summ)
                rows.append({"trace": tr, "reasoning": v, "strategy": s, **m})
                print(f"{tr:5s} {v:22s} {s:10s} p50 e2e {m['p50_e2e_ms']:9.0f} ms  p99 {m['p99_e2e_ms']:9.0f} ms  "
                      f"goodput {m['goodput_rps']:.2f} req/s", flush=True)
    res = pd.DataFrame(rows)
    res.to_csv(out / "reasoning.csv", index=False)
    plot(res, out / "reasoning.png")
    print(f"wrote {out}/reasoning.csv, reasoning.png in {time.time() - t0:.0f} s")
    return 0


def plot(res: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(res["trace"]))
    fig, axes = plt.subplots(2, len(traces), figsize=(6 * len(traces), 7), squeeze=False)
    for j, tr in enumerate(traces):
        sub = res[res["trace"] == tr]
        strategies = list(dict.fromkeys(sub["strategy"]))
        variants = list(dict.fromkeys(sub["reasoning"]))
        w = 0.8 / len(variants)
        x = np.arange(len(strategies))
        for i, v in enumerate(variants):
            sv = sub[sub["reasoning"] == v].set_index("strategy").reindex(strategies)
            axes[0, j].bar(x + i * w, sv["p50_e2e_ms"] / 1e3, w, label=v)
            axes[1, j].bar(x + i * w, sv["goodput_fraction"], w, label=v)
        for r, lab in ((0, "p50 end-to-end (s)"), (1, "goodput fraction (TTFT 250 ms, TPOT 25 ms)")):
            axes[r, j].set_xticks(x + 0.4 - w / 2, strategies)
            axes[r, j].set_ylabel(lab)
            axes[r, j].set_title(f"Llama-3.1-70B, 8x H100 TP8, Azure {tr}")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
