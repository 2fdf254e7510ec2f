"""Case study 2: the best batching strategy for hybrid pipelines, and RAG placement.

32 clients of Llama-3.1-70B on H100 TP2 (fp8 weights: bf16 weights do not fit two 80 GB H100s
with room for KV), continuous vs chunked vs 12P/20D, 16P/16D, 20P/12D disaggregation, for three
pipelines: plain chat, RAG (query embedding on GPU, IVF-PQ search on a CPU socket with 4M
centroids, 50 probes, 5K points per probe; bge-reranker-base over the top 20 documents; 20 x 512
document tokens added to the prompt) and KV retrieval (a 4K-token context fetched from host DRAM,
80% hits, recompute on a miss), across load. Reported: throughput, throughput per energy
(output tokens per joule) and SLO goodput (TTFT 250 ms plain, 1000 ms RAG / KV; TPOT 25 ms).
RAG placement: query embedding on the CPU vs on a GPU, the CPU reaching the GPUs over PCIe 4.0 x4
(32 GB/s). By default a 1/4 slice is simulated (8 clients, P:D 3:5, 4:4, 5:3; rates scaled by
8/32; 100 requests per run) to finish in minutes; --clients 32 runs the full cluster.

    python experiments/hybrid_batching.py --out experiments/results/hybrid_batching [--quick]

Writes hybrid_batching.csv, rag_placement.csv and hybrid_batching.png.
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
STRATEGIES = {"continuous": None, "chunked": None, "12P/20D": (12, 20), "16P/16D": (16, 16), "20P/12D": (20, 12)}
#: the full cluster is 32 clients; --scale simulates a slice with the same P:D ratios and load per client
INDEX = dict(index="ivf_pq", num_vectors=2e10, dim=1024, centroids=4e6, nprobe=50, points_per_probe=5000, top_k=20)
DOCS = 20 * 512
PCIE4_X4 = (32.0, 5.0)


def deployment(strategy: str, pipeline: str, n_llm: int = 32, embed_hw: str = "h100", slots: int = 64) -> Deployment:
    kw = dict(model=MODEL, hardware="h100", tp=2, dtype="fp8", max_num_seqs=slots)
    split = STRATEGIES[strategy]
    if split is not None and n_llm != 32:
        p = max(1, round(split[0] * n_llm / 32))
        split = (p, max(1, n_llm - p))
    if split is None:
        cs = [ClientSpec(f"llm{i}", "llm", policy=strategy, **kw) for i in range(n_llm)]
        llm_stages = [StageSpec("llm", emits=True)]
        first, links = "llm", []
    else:
        cs = [ClientSpec(f"p{i}", "prefill", role="prefill", policy="chunked", **kw) for i in range(split[0])]
        cs += [ClientSpec(f"d{i}", "decode", role="decode", policy="chunked", **kw) for i in range(split[1])]
        llm_stages = [StageSpec("prefill", emits=True), StageSpec("decode", kv_transfer=True)]
        first, links = "prefill", [LinkSpec("prefill", "decode", 50.0, 5.0)]
    routers = {"llm": "least-outstanding", "prefill": "least-outstanding", "decode": "least-outstanding"}
    pipes = []
    if pipeline == "plain":
        pipes = [PipelineSpec("plain", llm_stages)]
    elif pipeline == "rag":
        cs += rag_clients(embed_hw, slots)
        st = list(llm_stages)
        pipes = [PipelineSpec("rag", [StageSpec("embed"), StageSpec("search"),
                                      StageSpec("rerank", extra_prompt=DOCS)] + st)]
        links += [LinkSpec("embed", "search", *PCIE4_X4), LinkSpec("search", "rerank", *PCIE4_X4),
                  LinkSpec("rerank", first, 50.0, 5.0)]
    elif pipeline == "kv":
        # host DRAM read over PCIe 5.0 x16 (64 GB/s); one tier reader per 8 LLM clients (a platform)
        cs += [S.kv_tier_client(f"dram{i}", "dram", 64.0, 2.0, 0.8, max_num_seqs=slots)
               for i in range(max(1, n_llm // 8))]
        pipes = [PipelineSpec("kv_hit", [StageSpec("dram")] + llm_stages), PipelineSpec("recompute", llm_stages)]
        links += [LinkSpec("dram", first, 64.0, 2.0)]
    return Deployment(cs, pipes, routers={k: v for k, v in routers.items() if any(c.pool == k for c in cs)},
                      links=links, name=f"{strategy} {pipeline}")


def rag_clients(embed_hw: str, slots: int) -> list:
    return [S.encoder_client("embed", "embed", "bge-large-en-v1.5", hardware=embed_hw, max_num_seqs=slots),
            S.rag_search_client("search", "search", "epyc-9654", max_num_seqs=slots, **INDEX),
            S.encoder_client("rerank", "rerank", "bge-reranker-base", hardware="h100", max_num_seqs=slots)]


def workload(pipeline: str, n: int, rate: float, dep: Deployment):
    base = bundled_trace("azure_conv_2023", first=n, rate=rate)
    if pipeline == "kv":
        return S.assign_kv_hits(base, dep, context_tokens=4096, seed=0)
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/hybrid_batching")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8, help="LLM clients simulated (32 = the full cluster)")
    ap.add_argument("--rates", default="8,24", help="arrival rates of the 32-client cluster (req/s), scaled to --clients")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rates = [float(x) for x in a.rates.split(",")]
    if a.quick:
        n, n_llm, caps, rates = 8, 4, S.QUICK_CAPS, [rates[0]]
        strategies, pipelines = ["chunked", "16P/16D"], ["plain", "rag", "kv"]
    else:
        n, n_llm = a.requests, a.clients
        rates = [r * n_llm / 32 for r in rates]
        caps = dict(num_requests=n, num_clients=n_llm + 4, slots=64, window=32, queue=n + 16, stages=5, pools=5,
                    pipelines=2, stretch=64)
        strategies, pipelines = list(STRATEGIES), ["plain", "rag", "kv"]
    rows = []
    for pipe in pipelines:
        slo = {"ttft_ms": 250.0 if pipe == "plain" else 1000.0, "tpot_ms": 25.0}
        for rate in rates:
            for s in strategies:
                dep = deployment(s, pipe, n_llm, slots=caps["slots"])
                df, summ, _ = S.simulate_at(dep, workload(pipe, n, rate, dep), caps, slo=slo)
                g = S.goodput(df, **slo)
                row = {"pipeline": pipe, "rate": rate, "strategy": s, "completed": summ["completed"],
                       "rejected": summ["rejected"], "output_tok_s": summ["output_throughput"],
                       "request_throughput": summ["request_throughput"],
                       "output_tok_per_j": summ["output_throughput"] / summ["avg_power_w"],
                       "goodput_rps": g["goodput_rps"], "goodput_fraction": g["goodput_fraction"],
                       "p50_ttft_ms": summ["median_ttft_ms"], "p99_ttft_ms": summ["p99_ttft_ms"],
                       "p50_tpot_ms": summ["median_tpot_ms"], "p50_e2e_ms": summ["median_e2el_ms"]}
                rows.append(row)
                print(f"{pipe:6s} {rate:5.1f}/s {s:10s} out {row['output_tok_s']:8.0f} tok/s  "
                      f"{row['output_tok_per_j']:.3f} tok/J  goodput {row['goodput_fraction']:.2f}", flush=True)
    res = pd.DataFrame(rows)
    res.to_csv(out / "hybrid_batching.csv", index=False)

    # RAG placement: embedding on the CPU socket vs on an H100 (chunked colocated LLM clients)
    place = []
    for hw in ("epyc-9654", "h100"):
        dep = deployment("chunked", "rag", n_llm, embed_hw=hw, slots=caps["slots"])
        df, summ, _ = S.simulate_at(dep, workload("rag", n, rates[0], dep), caps, slo={"ttft_ms": 1000.0})
        emb = (df["stage0_end"] - df["stage0_start"]) * 1e3
        srch = (df["stage1_end"] - df["stage1_start"]) * 1e3
        place.append({"embed_on": hw, "rate": rates[0], "p50_embed_ms": emb.median(), "p99_embed_ms": emb.quantile(.99),
                      "p50_search_ms": srch.median(), "p50_ttft_ms": summ["median_ttft_ms"],
                      "p99_ttft_ms": summ["p99_ttft_ms"], "goodput_fraction": S.goodput(df, 1000.0, 25.0)[
                          "goodput_fraction"]})
        print(f"embedding on {hw}: p50 embed {emb.median():.1f} ms, p50 TTFT {summ['median_ttft_ms']:.0f} ms")
    pd.DataFrame(place).to_csv(out / "rag_placement.csv", index=False)
    plot(res, out / "hybrid_batching.png")
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


def plot(res: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipes = list(dict.fromkeys(res["pipeline"]))
    metrics = [("output_tok_s", "output tokens/s"), ("output_tok_per_j", "output tokens per joule"),
               ("goodput_fraction", "SLO goodput fraction")]
    fig, axes = plt.subplots(len(metrics), len(pipes), figsize=(5 * len(pipes), 3.2 * len(metrics)), squeeze=False)
    for j, p in enumerate(pipes):
        sub = res[res["pipeline"] == p]
        for i, (col, lab) in enumerate(metrics):
            for s in dict.fromkeys(sub["strategy"]):
                ss = sub[sub["strategy"] == s]
                axes[i, j].plot(ss["rate"], ss[col], marker="o", label=s)
            axes[i, j].set_xlabel("arrival rate (req/s)")
            axes[i, j].set_ylabel(lab)
            axes[i, j].set_title(f"{p}: Llama-3.1-70B H100 TP2 (slice of 32)")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
