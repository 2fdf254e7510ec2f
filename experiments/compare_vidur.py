#!/usr/bin/env python
"""MIST vs Vidur on the same workload: Llama-2-7B on one A100, vLLM-style scheduler, Poisson arrivals.

    python experiments/compare_vidur.py [--num-requests 1000] [--qps 2] [--lengths fixed|trace]
                                        [--skip-vidur] [--venv PATH] [--out DIR]

What it does
  1. Generates one workload with a fixed seed (Poisson arrivals; fixed 512/128-token lengths, or
     prompt/output lengths sampled from the bundled Azure 2023 conversation trace) and gives the
     *same* requests to both simulators (Vidur reads them through its `trace_replay` generator).
  2. Vidur: the `vidur` package from PyPI (default 0.0.26), installed by this script into its own
     virtual environment (default experiments/.vidur-venv, git-ignored; never a dependency of MIST).
     The PyPI wheel ships no profiling data and fetches it from a model hub at run time, which this
     script does not do: it stages the MIT-licensed Vidur profiling CSVs from ../shared/data/vidur
     (or --vidur-data) as a local, offline hub cache inside the venv folder and runs Vidur with
     HF_HUB_OFFLINE=1. Vidur has no Llama-2-7B attention profile in that data; the closest real A100
     attention profile (Llama-2-70B at TP2: same 32 query heads of dimension 128 per GPU, but 4
     instead of 32 KV heads) is relabelled as Llama-2-7B. That makes Vidur's attention times
     approximate (decode attention reads 8x less KV than a real 7B would); the report says so.
     "Cold" = its cache of trained random forests and predictions deleted first (it trains them);
     "warm" = the same run again with that cache.
  3. MIST: `mist.simulate` on `Deployment.single("llama-2-7b", "a100-sxm-80gb", policy="continuous")`
     (vLLM v0: prefill-priority continuous batching), same batch caps and block size.
  4. Prints a side-by-side table of wall times and TTFT/TPOT/E2E statistics and writes
     <out>/compare_vidur.json and <out>/compare_vidur.csv.

Metric definitions are made identical on purpose and computed here from per-request times of both
simulators: TTFT = first token - arrival; E2E = finish - arrival; TPOT = (finish - first token) /
(output tokens - 1). (Vidur's own "decode time normalized" divides by all output tokens instead.)

If Vidur cannot be installed or run, the script says exactly why and still runs (and reports) MIST.
Wall times are whatever this machine gives: on a shared 2-core CPU they are inflated and noisy.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / "experiments" / ".vidur-venv"
DEFAULT_DATA = Path(os.environ.get("MIST_SHARED_DATA", ROOT.parent / "shared" / "data")) / "vidur"
VIDUR_MODEL = "meta-llama/Llama-2-7b-hf"
MIST_MODEL = "llama-2-7b"
# Vidur's "a100" device profile is an A100-SXM 80GB (80 GB in its device SKU table).
MIST_HARDWARE = "a100-sxm-80gb"
COMPUTE_DS = "local/vidur-a100-llama-2-7b-hf"
NETWORK_DS = "local/vidur-a100-pairwise-nvlink"
# Paths inside the shared Vidur data (see ../shared/data/vidur/MANIFEST.md).
MLP_CSV = "head/data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv"
ATTN_CSV = "history/e2d00e9afb/data/profiling/a100/attention.csv"  # Llama-2-70B shapes, TP 2
ALLREDUCE_CSV = "head/data/profiling/network/a100_pairwise_nvlink/all_reduce.csv"
SENDRECV_CSV = "head/data/profiling/network/a100_pairwise_nvlink/send_recv.csv"
STATS = ("mean", "p50", "p90", "p99")
METRICS = ("ttft", "tpot", "e2e")


class VidurUnavailable(RuntimeError):
    """Vidur could not be installed, prepared or run; the message says exactly why."""


# ----------------------------------------------------------------------------------------------
# Workload (shared by both simulators)
# ----------------------------------------------------------------------------------------------

def make_workload(n: int, qps: float, seed: int, lengths: str, input_tokens: int, output_tokens: int,
                  trace: Path, max_tokens: int) -> dict:
    """Poisson arrivals at `qps` starting at t=0 and lengths (fixed or sampled from an Azure trace),
    with prompt + output <= max_tokens (Llama-2's context), as numpy arrays."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / qps, size=n)
    arrival = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    if lengths == "fixed":
        inp = np.full(n, input_tokens, dtype=np.int64)
        out = np.full(n, output_tokens, dtype=np.int64)
    else:
        import pandas as pd

        if not trace.exists():
            raise SystemExit(f"--lengths trace: trace file {trace} not found (use --trace PATH)")
        df = pd.read_csv(trace)
        rows = rng.integers(0, len(df), size=n)
        inp = df["ContextTokens"].to_numpy(np.int64)[rows]
        out = df["GeneratedTokens"].to_numpy(np.int64)[rows]
    out = np.clip(out, 2, None)  # >= 2 so TPOT is defined for every request (Vidur clips to >= 1)
    inp = np.clip(inp, 1, None)
    inp = np.minimum(inp, max_tokens - out)  # the same rule as Vidur's trace generator
    return {"arrival": arrival.astype(np.float64), "input_tokens": inp.astype(np.int64),
            "output_tokens": out.astype(np.int64)}


def stats_ms(values_s) -> dict:
    v = np.asarray(values_s, dtype=np.float64)
    v = v[np.isfinite(v)] * 1e3
    if v.size == 0:
        return {s: float("nan") for s in STATS}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99))}


def per_request_stats(arrival, first, finish, out_tokens) -> dict:
    arrival, first, finish = (np.asarray(x, dtype=np.float64) for x in (arrival, first, finish))
    out_tokens = np.asarray(out_tokens, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out_tokens > 1, (finish - first) / np.maximum(out_tokens - 1, 1), np.nan)
    return {"ttft": stats_ms(first - arrival), "tpot": stats_ms(tpot), "e2e": stats_ms(finish - arrival),
            "completed": int(np.isfinite(finish).sum()),
            "makespan_s": float(np.nanmax(finish) - np.min(arrival)) if np.isfinite(finish).any() else float("nan")}


# ----------------------------------------------------------------------------------------------
# MIST
# ----------------------------------------------------------------------------------------------

def run_mist(wl: dict, max_num_seqs: int, max_batched_tokens: int, block_size: int, hardware: str) -> dict:
    t_import = time.perf_counter()
    import mist
    from mist.lowering import Deployment

    simulate = getattr(mist, "simulate", None)
    if simulate is None or not callable(simulate):  # older checkouts: not yet re-exported
        from mist.simulate import simulate
    import_s = time.perf_counter() - t_import

    dep = Deployment.single(MIST_MODEL, hardware, policy="continuous", max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_batched_tokens, block_size=block_size)
    runs = []
    for _ in range(2):  # first call compiles; second reuses the compiled program
        t0, c0 = time.perf_counter(), time.process_time()
        res = simulate(deployment=dep, workloads=[wl])
        runs.append((time.perf_counter() - t0, time.process_time() - c0, res))
    (wall1, cpu1, res1), (wall2, cpu2, res2) = runs
    df = res1.requests
    done = df["completed"].to_numpy(bool)
    out = per_request_stats(df["arrival"].to_numpy(), np.where(done, df["first_token"], np.nan),
                            np.where(done, df["finish"], np.nan), df["output_tokens"].to_numpy())
    s = res1.summary
    own = {k: s.get(k) for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                                 "median_tpot_ms", "p99_tpot_ms", "mean_e2el_ms", "median_e2el_ms",
                                 "p99_e2el_ms") if k in s}
    out.update({
        "simulator": f"MIST (this checkout, {hardware}, policy=continuous)",
        "import_s": import_s,
        "wall_first_call_s": wall1,
        "wall_second_call_s": wall2,
        "cpu_first_call_s": cpu1,
        "cpu_second_call_s": cpu2,
        "compile_s": float(res1.stats.compile_s),
        "run_s_first_call": float(res1.stats.run_s),
        "run_s_second_call": float(res2.stats.run_s),
        "compile_s_second_call": float(res2.stats.compile_s),
        "scan_steps": int(res1.stats.steps),
        "rejected": int(df["rejected"].sum()),
        "preemptions": int(df["preemptions"].sum()),
        "summary_own_keys": own,
    })
    return out


# ----------------------------------------------------------------------------------------------
# Vidur
# ----------------------------------------------------------------------------------------------

def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_vidur(venv: Path, version: str) -> Path:
    """The venv's python with `vidur` importable; installs it (and a CPU torch first) if needed."""
    py = venv / "bin" / "python"
    if py.exists() and _run([str(py), "-c", "import vidur.main"]).returncode == 0:
        return py
    print(f"[vidur] installing vidur=={version} into {venv} (once; several minutes) ...", flush=True)
    if not py.exists():
        r = _run([sys.executable, "-m", "venv", str(venv)])
        if r.returncode != 0:
            raise VidurUnavailable(f"could not create the venv {venv}: {r.stderr.strip()[-2000:]}")
    # A CPU build of torch first, so that vidur's torch requirement does not pull a multi-GB CUDA build
    # (on machines where torch 2.13.0 is not available this step fails harmlessly and pip picks one).
    _run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"])
    r = _run([str(py), "-m", "pip", "install", "-q", f"vidur=={version}"])
    if r.returncode != 0:
        raise VidurUnavailable(f"`pip install vidur=={version}` failed in {venv}:\n{r.stderr.strip()[-3000:]}")
    r = _run([str(py), "-c", "import vidur.main"])
    if r.returncode != 0:
        raise VidurUnavailable(f"vidur installed but does not import:\n{r.stderr.strip()[-3000:]}")
    return py


def _hub_snapshot(cache: Path, dataset: str, files: dict[str, bytes], config: dict) -> None:
    """Lay out `files` as huggingface_hub's cache of dataset `dataset` (so that snapshot_download
    with HF_HUB_OFFLINE=1 finds it): datasets--org--name/refs/main -> snapshots/<revision>/."""
    org, name = dataset.split("/")
    base = cache / f"datasets--{org}--{name}"
    rev = "0" * 40
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(rev)
    for fname, data in files.items():
        (snap / fname).write_bytes(data)
    (snap / "config.json").write_text(json.dumps(config))


def stage_profiles(data: Path, cache_dir: Path) -> list[str]:
    """Builds Vidur's offline profiling-data cache from the shared CSVs; returns notes for the report."""
    import pandas as pd

    missing = [p for p in (MLP_CSV, ATTN_CSV, ALLREDUCE_CSV, SENDRECV_CSV) if not (data / p).exists()]
    if missing:
        raise VidurUnavailable(
            f"Vidur's profiling data is not in the PyPI wheel and these files are missing under {data}: "
            f"{missing}. Point --vidur-data at a copy of the Vidur profiling CSVs (MIT, github microsoft/vidur).")
    notes = []
    compute = cache_dir / "profiling_data" / "compute"
    network = cache_dir / "profiling_data" / "network"
    stamp = cache_dir / "profiling_data" / "STAGED_FROM"
    if stamp.exists() and stamp.read_text() == str(data.resolve()):
        notes.append("profiling data already staged")
    else:
        mlp = (data / MLP_CSV).read_bytes()
        att = pd.read_csv(data / ATTN_CSV)
        # Relabel the Llama-2-70B/TP2 A100 attention profile as Llama-2-7B/TP1 (same per-GPU query
        # heads and head dim; the 7B has 32 KV heads where 70B/TP2 has 4 per GPU).
        att["n_embd"], att["n_q_head"], att["n_kv_head"], att["num_tensor_parallel_workers"] = 4096, 32, 32, 1
        _hub_snapshot(compute, COMPUTE_DS,
                      {"mlp.csv.xz": lzma.compress(mlp),
                       "attention.csv.xz": lzma.compress(att.to_csv(index=False).encode())},
                      {"model": VIDUR_MODEL, "device_sku": "a100",
                       "source": f"{data} (MIT, microsoft/vidur); attention relabelled from Llama-2-70B TP2"})
        _hub_snapshot(network, NETWORK_DS,
                      {"all_reduce.csv.xz": lzma.compress((data / ALLREDUCE_CSV).read_bytes()),
                       "send_recv.csv.xz": lzma.compress((data / SENDRECV_CSV).read_bytes())},
                      {"sku": "a100_pairwise_nvlink", "source": f"{data} (MIT, microsoft/vidur)"})
        stamp.write_text(str(data.resolve()))
        notes.append(f"staged {data}/{{{MLP_CSV}, {ATTN_CSV}, network}} as an offline hub cache")
    notes.append("Vidur attention profile: the A100 Llama-2-70B TP2 attention.csv (Vidur commit e2d00e9afb) "
                 "relabelled as Llama-2-7B TP1; no Llama-2-7B attention profile is available offline")
    return notes


def write_vidur_trace(wl: dict, path: Path) -> None:
    """Vidur 0.0.26's trace_replay format: Time (s), Date, PromptTokenCount, CompletionTokenCount."""
    import pandas as pd

    pd.DataFrame({"Time": wl["arrival"], "Date": "2023-08-21", "PromptTokenCount": wl["input_tokens"],
                  "CompletionTokenCount": wl["output_tokens"]}).to_csv(path, index=False)


#: Vidur 0.0.26's random-forest hyper-parameter grid is 3 x 3 x 3 points, each scored by 10-fold
#: cross-validation (271 forest fits per operator model). "small" keeps one point of that grid
#: (11 fits per model) for machines where the full search takes hours.
VIDUR_GRIDS = {"full": None, "small": {"num_estimators": "250", "max_depth": "16", "min_samples_split": "2"}}


def vidur_command(py: Path, cache_dir: Path, trace: Path, out_dir: Path, max_num_seqs: int,
                  max_batched_tokens: int, block_size: int, max_tokens: int, predict_max_tokens: int,
                  grid: str = "full") -> list[str]:
    rf = "--random_forrest_execution_time_predictor_config_"
    grid_args = [a for k, v in (VIDUR_GRIDS[grid] or {}).items() for a in (rf + k, v)]
    return [
        str(py), "-m", "vidur.main", *grid_args,
        "--replica_config_device", "a100",
        "--replica_config_network_device", "a100_pairwise_nvlink",
        "--replica_config_model_name", VIDUR_MODEL,
        "--replica_config_tensor_parallel_size", "1",
        "--replica_config_num_pipeline_stages", "1",  # 0.0.26 defaults to 2 (and TP 8)
        "--cluster_config_num_replicas", "1",
        "--global_scheduler_config_type", "round_robin",
        "--replica_scheduler_config_type", "vllm",
        "--vllm_scheduler_config_batch_size_cap", str(max_num_seqs),
        "--vllm_scheduler_config_max_tokens_in_batch", str(max_batched_tokens),
        "--cache_config_block_size", str(block_size),
        "--request_generator_config_type", "trace_replay",
        "--trace_request_generator_config_trace_file", str(trace),
        "--trace_request_generator_config_date", "2023-08-21",
        "--trace_request_generator_config_prefill_scale_factor", "1",  # defaults 0.3 / 1 / 0.04
        "--trace_request_generator_config_decode_scale_factor", "1",
        "--trace_request_generator_config_time_scale_factor", "1",
        "--trace_request_generator_config_max_tokens", str(max_tokens),
        "--execution_time_predictor_config_type", "random_forrest",
        rf + "model_profiling_dataset", COMPUTE_DS,
        rf + "network_profiling_dataset", NETWORK_DS,
        rf + "cache_dir", str(cache_dir),
        # 0.0.26 predicts every op for 1..2,097,152 tokens by default; Llama-2's context is 4,096.
        rf + "prediction_max_tokens_per_request", str(predict_max_tokens),
        rf + "prediction_max_prefill_chunk_size", str(min(max_batched_tokens, predict_max_tokens)),
        "--no-" + rf[2:] + "upload_predictions",
        "--metrics_config_output_dir", str(out_dir),
        "--no-metrics_config_store_plots",
        "--no-metrics_config_write_json_trace",
        "--no-metrics_config_enable_chrome_trace",
        "--no-metrics_config_save_table_to_wandb",
        "--metrics_config_store_request_metrics",
    ]


def clear_vidur_cache(cache_dir: Path) -> None:
    """Everything Vidur learned (trained forests, predictions) goes; the staged profiles stay."""
    if not cache_dir.exists():
        return
    for p in cache_dir.iterdir():
        if p.name == "profiling_data":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_vidur_once(cmd: list[str], workdir: Path, out_root: Path, log: Path,
                   timeout: float) -> tuple[float, float, Path]:
    """(wall s, CPU s of Vidur and its worker processes, output folder)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", WANDB_SILENT="true",
               TOKENIZERS_PARALLELISM="false")
    before = set(out_root.glob("*")) if out_root.exists() else set()
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            r = subprocess.run(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VidurUnavailable(f"Vidur ran past --vidur-timeout {timeout:.0f}s; log: {log}")
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise VidurUnavailable(f"Vidur exited with code {r.returncode}; log {log}; its last lines:\n{tail}")
    new = sorted(set(out_root.glob("*")) - before)
    if not new:
        raise VidurUnavailable(f"Vidur ran but wrote no output folder under {out_root}; log {log}")
    return wall, cpu, new[-1]


def parse_vidur(out_dir: Path, wl: dict) -> dict:
    """Per-request TTFT/TPOT/E2E from Vidur's request_metrics.csv (times in seconds)."""
    import pandas as pd

    files = list(out_dir.rglob("request_metrics.csv"))
    if not files:
        raise VidurUnavailable(f"no request_metrics.csv under {out_dir}")
    df = pd.read_csv(files[0])
    id_col = next(c for c in df.columns if c.lower().replace(" ", "_") in ("request_id", "id"))
    df = df.sort_values(id_col).reset_index(drop=True)
    ids = df[id_col].to_numpy(np.int64)
    arrival = wl["arrival"][ids]
    ttft = df["prefill_e2e_time"].to_numpy(np.float64)
    e2e = df["request_e2e_time"].to_numpy(np.float64)
    dec = df["request_num_decode_tokens"].to_numpy(np.float64)
    pre = df["request_num_prefill_tokens"].to_numpy(np.float64)
    if not (np.array_equal(dec, wl["output_tokens"][ids]) and np.array_equal(pre, wl["input_tokens"][ids])):
        raise VidurUnavailable("Vidur's per-request token counts differ from the workload given to it")
    out = per_request_stats(arrival, arrival + ttft, arrival + e2e, dec)
    out["completed"] = int(len(df))
    out["restarts"] = int(df["request_num_restarts"].sum()) if "request_num_restarts" in df else None
    out["request_metrics_csv"] = str(files[0])
    return out


def vidur_sim_seconds(log: Path) -> float | None:
    """Seconds between Vidur's 'Starting simulation' and 'Metrics written' log lines (whole-second
    timestamps): its event loop plus metric writing, without start-up and predictor training."""
    import re
    from datetime import datetime

    stamps = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\w+ (\d\d-\d\d \d\d:\d\d:\d\d) .*?(Starting simulation|Metrics written)", line)
        if m:
            stamps[m.group(2)] = datetime.strptime(m.group(1), "%m-%d %H:%M:%S")
    if len(stamps) < 2:
        return None
    return (stamps["Metrics written"] - stamps["Starting simulation"]).total_seconds()


def run_vidur(args, wl: dict) -> dict:
    t_setup = time.perf_counter()
    py = ensure_vidur(args.venv, args.vidur_version)
    ver = _run([str(py), "-c", "import importlib.metadata as m; print(m.version('vidur'))"]).stdout.strip()
    work = args.venv / "mist-compare"
    work.mkdir(parents=True, exist_ok=True)
    # one cache per training grid: Vidur's cache key does not include the grid
    cache_dir = work / (".vidur_cache" if args.vidur_grid == "full" else f".vidur_cache-{args.vidur_grid}")
    notes = stage_profiles(args.vidur_data, cache_dir)
    trace = work / "requests.csv"
    write_vidur_trace(wl, trace)
    out_root = work / "simulator_output"
    out_root.mkdir(exist_ok=True)
    setup_s = time.perf_counter() - t_setup
    cmd = vidur_command(py, cache_dir, trace, out_root, args.max_num_seqs, args.max_num_batched_tokens,
                        args.block_size, args.max_tokens, args.vidur_predict_max_tokens, args.vidur_grid)
    res: dict = {"simulator": f"Vidur {ver} (PyPI, random-forest predictor, vllm scheduler)", "version": ver,
                 "training_grid": args.vidur_grid if args.vidur_grid == "full" else
                 f"{args.vidur_grid}: {VIDUR_GRIDS[args.vidur_grid]} (Vidur's default grid is 27 points)",
                 "setup_s": setup_s, "notes": notes, "command": " ".join(cmd), "workdir": str(work)}
    runs = []
    if not args.skip_cold:
        clear_vidur_cache(cache_dir)
        print("[vidur] cold run (cache cleared: trains its random forests) ...", flush=True)
        wall, cpu, od = run_vidur_once(cmd, work, out_root, work / "vidur_cold.log", args.vidur_timeout)
        res.update(wall_cold_s=wall, cpu_cold_s=cpu, sim_cold_s=vidur_sim_seconds(work / "vidur_cold.log"))
        runs.append(od)
        print(f"[vidur] cold: {wall:.1f} s", flush=True)
    print("[vidur] warm run (reuses its cache) ...", flush=True)
    wall, cpu, od = run_vidur_once(cmd, work, out_root, work / "vidur_warm.log", args.vidur_timeout)
    res.update(wall_warm_s=wall, cpu_warm_s=cpu, sim_warm_s=vidur_sim_seconds(work / "vidur_warm.log"))
    print(f"[vidur] warm: {wall:.1f} s", flush=True)
    runs.append(od)
    res.update(parse_vidur(runs[-1], wl))
    if len(runs) == 2:  # the cold and warm runs must agree (same requests, same models)
        cold = parse_vidur(runs[0], wl)
        res["cold_equals_warm"] = all(abs(cold[m][s] - res[m][s]) <= 1e-9 * max(1.0, abs(res[m][s]))
                                      for m in METRICS for s in STATS)
    return res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _fmt(x, nd=1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{nd}f}"


def report(res: dict) -> list[dict]:
    v, m = res.get("vidur"), res["mist"]
    rows = []
    for met in METRICS:
        for s in STATS:
            vv = v[met][s] if v and met in v else float("nan")
            mm = m[met][s]
            rows.append({"metric": f"{met}_ms", "stat": s, "vidur": vv, "mist": mm,
                         "mist_minus_vidur_pct": 100.0 * (mm - vv) / vv if vv and math.isfinite(vv) else float("nan")})
    w = res["workload"]
    print(f"\nWorkload: {w['num_requests']} requests, Poisson {w['qps']} req/s, lengths {w['lengths']} "
          f"(mean in {w['mean_input_tokens']:.0f} / out {w['mean_output_tokens']:.0f} tokens), seed {w['seed']}")
    print(f"Llama-2-7B, one A100 80GB, vLLM-style scheduler (max_num_seqs {res['config']['max_num_seqs']}, "
          f"max tokens/batch {res['config']['max_num_batched_tokens']}, block {res['config']['block_size']})\n")
    print(f"{'metric':<10}{'stat':<6}{'Vidur':>12}{'MIST':>12}{'MIST-Vidur':>12}")
    for r in rows:
        print(f"{r['metric']:<10}{r['stat']:<6}{_fmt(r['vidur'], 2):>12}{_fmt(r['mist'], 2):>12}"
              f"{_fmt(r['mist_minus_vidur_pct'], 1) + '%':>12}")
    print("\nWall time (s)")
    if v and "wall_warm_s" in v:
        print(f"  Vidur cold (trains forests)   {_fmt(v.get('wall_cold_s'), 1):>8}   "
              f"(CPU {_fmt(v.get('cpu_cold_s'), 1)})")
        print(f"  Vidur warm (cached)           {_fmt(v.get('wall_warm_s'), 1):>8}   "
              f"(CPU {_fmt(v.get('cpu_warm_s'), 1)}; simulation phase per its log {_fmt(v.get('sim_warm_s'), 0)})")
    print(f"  MIST first call (compile+run) {_fmt(m['wall_first_call_s'], 2):>8}   "
          f"(CPU {m['cpu_first_call_s']:.1f}; compile {m['compile_s']:.2f}, run {m['run_s_first_call']:.3f})")
    print(f"  MIST second call (compiled)   {_fmt(m['wall_second_call_s'], 2):>8}   "
          f"(CPU {m['cpu_second_call_s']:.1f}; run {m['run_s_second_call']:.3f})")
    if res.get("speed_ratio"):
        for k, val in res["speed_ratio"].items():
            print(f"  ratio {k:<40}{_fmt(val, 1):>8}x")
    if res.get("vidur_error"):
        print(f"\nVidur side not run: {res['vidur_error']}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--qps", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", choices=("fixed", "trace"), default="fixed",
                    help="fixed --input-tokens/--output-tokens, or sampled from --trace (Azure 2023 format)")
    ap.add_argument("--input-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--trace", type=Path, default=ROOT / "traces" / "azure_conv_2023.csv")
    ap.add_argument("--max-tokens", type=int, default=4096, help="prompt + output cap (Llama-2 context)")
    ap.add_argument("--max-num-seqs", type=int, default=128, help="batch cap (Vidur batch_size_cap)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096, help="Vidur max_tokens_in_batch")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--hardware", default=MIST_HARDWARE, help="MIST hardware name")
    ap.add_argument("--skip-vidur", action="store_true", help="run MIST only")
    ap.add_argument("--skip-cold", action="store_true", help="Vidur: warm run only (keeps its cache)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Vidur's own virtual environment")
    ap.add_argument("--vidur-version", default="0.0.26")
    ap.add_argument("--vidur-data", type=Path, default=DEFAULT_DATA, help="Vidur profiling CSVs (MANIFEST.md)")
    ap.add_argument("--vidur-predict-max-tokens", type=int, default=4096,
                    help="Vidur prediction_max_tokens_per_request (its 0.0.26 default is 2,097,152)")
    ap.add_argument("--vidur-grid", choices=tuple(VIDUR_GRIDS), default="full",
                    help="Vidur's random-forest search: its own 27-point grid (full), or one point of it (small)")
    ap.add_argument("--vidur-timeout", type=float, default=3 * 3600)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = ap.parse_args(argv)
    args.venv = args.venv.resolve()

    wl = make_workload(args.num_requests, args.qps, args.seed, args.lengths, args.input_tokens,
                       args.output_tokens, args.trace, args.max_tokens)
    res: dict = {
        "workload": {"num_requests": args.num_requests, "qps": args.qps, "seed": args.seed, "lengths": args.lengths,
                     "fixed": [args.input_tokens, args.output_tokens] if args.lengths == "fixed" else None,
                     "trace": str(args.trace.relative_to(ROOT) if args.trace.is_relative_to(ROOT) else args.trace)
                     if args.lengths == "trace" else None,
                     "mean_input_tokens": float(wl["input_tokens"].mean()),
                     "mean_output_tokens": float(wl["output_tokens"].mean()),
                     "last_arrival_s": float(wl["arrival"][-1])},
        "config": {"model": "Llama-2-7B", "hardware": "A100-SXM 80GB", "mist_hardware": args.hardware,
                   "scheduler": "vLLM v0 style (prefill-priority continuous batching)",
                   "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                   "block_size": args.block_size},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "note": "shared CPU; wall times inflated by other load"},
    }
    git = lambda *a: _run(["git", "-C", str(ROOT), *a]).stdout.strip()  # noqa: E731
    res["mist_checkout"] = {"commit": git("rev-parse", "HEAD"),
                            "uncommitted_files_in_mist_or_calibration": len(
                                git("status", "--porcelain", "--", "mist", "calibration").splitlines())}
    print(f"[mist] simulating {args.num_requests} requests ...", flush=True)
    res["mist"] = run_mist(wl, args.max_num_seqs, args.max_num_batched_tokens, args.block_size, args.hardware)
    if args.skip_vidur:
        res["vidur_error"] = "skipped (--skip-vidur)"
    else:
        try:
            res["vidur"] = run_vidur(args, wl)
        except VidurUnavailable as e:
            res["vidur_error"] = str(e)
            print(f"[vidur] NOT RUN: {e}", file=sys.stderr, flush=True)
    v, m = res.get("vidur"), res["mist"]
    if v:
        ratio = {}
        for vk, vname in (("wall_cold_s", "vidur_cold"), ("wall_warm_s", "vidur_warm")):
            if v.get(vk):
                ratio[f"{vname} / mist_first_call"] = v[vk] / m["wall_first_call_s"]
                ratio[f"{vname} / mist_compiled_call"] = v[vk] / m["wall_second_call_s"]
        for vk, vname in (("cpu_cold_s", "vidur_cold_cpu"), ("cpu_warm_s", "vidur_warm_cpu")):
            if v.get(vk):
                ratio[f"{vname} / mist_first_call_cpu"] = v[vk] / m["cpu_first_call_s"]
                ratio[f"{vname} / mist_compiled_call_cpu"] = v[vk] / m["cpu_second_call_s"]
        res["speed_ratio"] = ratio
    rows = report(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_vidur.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    import pandas as pd

    pd.DataFrame(rows).to_csv(args.out / "compare_vidur.csv", index=False, float_format="%.4f")
    print(f"\nwrote {args.out / 'compare_vidur.json'} and {args.out / 'compare_vidur.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
