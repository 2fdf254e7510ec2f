"""Case study 3: remote KV-cache retrieval vs recompute.

256 H100s as 128 TP2 clients of Llama-3.1-8B at 240 req/s; every request carries a cached context
of 4K or 24K tokens (plus its Azure conversation prompt as the new tokens) whose KV is read from:
per-client host DRAM, platform-shared DRAM (one per 8-GPU platform = 4 clients), rack-shared SSD
(one per 32-GPU rack = 16 clients), SSD over the data-centre network (one storage service for the
cluster), or recomputed in prefill. Each shared tier is also run as a private variant (same
bandwidth, one per client) to isolate contention. To keep the run short the cluster is simulated
as a 1/16 slice (8 clients at 15 req/s, 120 requests; a tier shared beyond the slice keeps the
slice's share of its bandwidth), which preserves the load per client and per tier bandwidth.
Private variants are run for the two SSD tiers. Reported: TTFT and end-to-end
p50/p90/p99; and, from the cost model, the context length beyond which fetching beats recomputing
as a function of tier bandwidth.

    python experiments/remote_kv.py --out experiments/results/remote_kv [--quick]

Writes remote_kv.csv, remote_kv_crossover.csv and remote_kv.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

import mist  # noqa: F401
from mist.cost.iteration import iteration_time, make_batch
from mist.cost.params import load_params
from mist.cost.replica import lower_replica
from mist.lowering import stages as S
from mist.lowering.deployment import ClientSpec, Deployment, LinkSpec, PipelineSpec, StageSpec
from mist.specs.catalog import get_hardware, get_model
from mist.workload import bundled_trace

MODEL, TP = "llama-3.1-8b", 2
#: tier -> (tier bandwidth GB/s, latency us, clients per tier reader, link bandwidth GB/s, link latency us)
TIERS = {
    "local DRAM": (64.0, 2.0, 1, 64.0, 1.0),  # host DRAM of the client's own node over PCIe 5.0 x16
    "platform DRAM": (300.0, 3.0, 4, 64.0, 2.0),  # one CXL/host memory pool per 8-GPU platform
    "rack SSD": (50.0, 100.0, 16, 50.0, 5.0),  # NVMe array per rack, 400 Gb/s to each client
    "network SSD": (400.0, 150.0, 128, 25.0, 20.0),  # cluster storage service, 200 Gb/s NIC per client
}


def deployment(tier: str | None, n_llm: int, shared: bool = True, slice_frac: float = 1 / 8, slots: int = 64):
    cs = [ClientSpec(f"llm{i}", "llm", model=MODEL, hardware="h100", tp=TP, policy="chunked", max_num_seqs=slots)
          for i in range(n_llm)]
    llm = [StageSpec("llm", emits=True)]
    if tier is None:
        return Deployment(cs, [PipelineSpec("recompute", llm)], routers={"llm": "least-outstanding"},
                          name="recompute")
    bw, lat, per, link_bw, link_lat = TIERS[tier]
    if shared:
        readers = max(1, round(n_llm / per))
        if per > n_llm:  # a tier shared beyond the simulated slice keeps the slice's share of its bandwidth
            bw = bw * n_llm / per
    else:
        readers = n_llm
    cs += [S.kv_tier_client(f"tier{i}", "tier", bw, lat, 1.0, tier=tier, max_num_seqs=slots) for i in range(readers)]
    pipes = [PipelineSpec("hit", [StageSpec("tier")] + llm), PipelineSpec("recompute", llm)]
    return Deployment(cs, pipes, routers={"llm": "least-outstanding"},
                      links=[LinkSpec("tier", "llm", link_bw, link_lat)], name=f"{tier} {'shared' if shared else 'private'}")


def crossover(contexts=(512, 1024, 2048, 4096, 8192, 16384, 24576, 32768, 65536),
              bandwidths=(4, 8, 16, 32, 64, 128)) -> pd.DataFrame:
    """Fetch (latency 10 us + context x KV bytes / bandwidth) vs recompute (one prefill iteration of
    the context on the client, from the cost model), no queueing."""
    m, dev = get_model(MODEL), get_hardware("h100")
    rep = lower_replica(m, dev, tp=TP)
    params, _ = load_params(dev.name, dev.kind)
    kvb = S.kv_bytes_per_token(MODEL, TP)
    rows = []
    for L in contexts:
        t_re = float(iteration_time(params, rep, make_batch([L])))
        for bw in bandwidths:
            t_f = 10e-6 + L * kvb / (bw * 1e9)
            rows.append({"context_tokens": L, "bandwidth_gbs": bw, "recompute_ms": t_re * 1e3, "fetch_ms": t_f * 1e3,
                         "fetch_wins": t_f < t_re})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/remote_kv")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--slice", type=float, default=1 / 16, help="fraction of the 128-client cluster simulated")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.quick:
        n, n_llm, caps, contexts = 16, 4, S.QUICK_CAPS, [4096]
        cases = [("local DRAM", True), ("rack SSD", True), (None, True)]
    else:
        n, n_llm, contexts = a.requests, max(1, round(128 * a.slice)), [4096, 24576]
        caps = dict(num_requests=n, num_clients=2 * n_llm, slots=64, window=32, queue=n + 16, stages=2, pools=2,
                    pipelines=2, stretch=64)
        cases = [(t, True) for t in TIERS] + [("rack SSD", False), ("network SSD", False), (None, True)]
    rate = 240.0 * n_llm / 128
    base = bundled_trace("azure_conv_2023", first=n, rate=rate)
    rows = []
    for ctx in contexts:
        for tier, shared in cases:
            dep = deployment(tier, n_llm, shared, a.slice, caps["slots"])
            d = S.assign_kv_hits(base, dep, context_tokens=ctx, seed=0) if tier else \
                {**base.to_numpy(valid_only=True)}
            if tier is None:
                d["input_tokens"] = d["input_tokens"] + ctx
            df, summ, _ = S.simulate_at(dep, d, caps, slo={"ttft_ms": 1000.0})
            done = df[df["completed"]]
            row = {"context": ctx, "tier": tier or "recompute", "sharing": "shared" if shared else "private",
                   "completed": len(done), "rejected": summ["rejected"]}
            for col in ("ttft", "e2e"):
                for p in (50, 90, 99):
                    row[f"p{p}_{col}_ms"] = float(np.percentile(done[col], p) * 1e3)
            if tier:
                rd = (done["stage0_end"] - done["stage0_start"]) * 1e3
                row["p50_fetch_ms"] = float(rd.median())
            rows.append(row)
            print(f"{ctx:6d} {row['tier']:14s} {row['sharing']:8s} TTFT p50/p90/p99 {row['p50_ttft_ms']:8.1f} "
                  f"{row['p90_ttft_ms']:8.1f} {row['p99_ttft_ms']:8.1f} ms   e2e p50 {row['p50_e2e_ms']:8.1f} ms",
                  flush=True)
    res = pd.DataFrame(rows)
    res.to_csv(out / "remote_kv.csv", index=False)
    cx = crossover()
    cx.to_csv(out / "remote_kv_crossover.csv", index=False)
    plot(res, cx, out / "remote_kv.png")
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


def plot(res: pd.DataFrame, cx: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = list(dict.fromkeys(res["context"]))
    fig, axes = plt.subplots(1, len(ctxs) + 1, figsize=(6 * (len(ctxs) + 1), 4.5), squeeze=False)
    for j, c in enumerate(ctxs):
        sub = res[res["context"] == c]
        labels = [f"{t}\n({s})" if t != "recompute" else t for t, s in zip(sub["tier"], sub["sharing"])]
        x = np.arange(len(sub))
        for i, p in enumerate((50, 90, 99)):
            axes[0, j].bar(x + (i - 1) * 0.27, sub[f"p{p}_ttft_ms"], 0.27, label=f"p{p} TTFT")
        axes[0, j].set_xticks(x, labels, fontsize=7, rotation=30)
        axes[0, j].set_yscale("log")
        axes[0, j].set_ylabel("TTFT (ms)")
        axes[0, j].set_title(f"{c // 1024}K-token cached context")
        axes[0, j].legend(fontsize=7)
    ax = axes[0, -1]
    for bw in sorted(set(cx["bandwidth_gbs"])):
        s = cx[cx["bandwidth_gbs"] == bw]
        ax.plot(s["context_tokens"], s["fetch_ms"], marker=".", label=f"fetch @ {bw:g} GB/s")
    s = cx[cx["bandwidth_gbs"] == cx["bandwidth_gbs"].iloc[0]]
    ax.plot(s["context_tokens"], s["recompute_ms"], "k-", lw=2, label="recompute (prefill)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("ms")
    ax.set_title("fetch vs recompute, Llama-3.1-8B H100 TP2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
