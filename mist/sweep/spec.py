"""Sweep files (YAML or TOML): a base simulation config, the axes to vary, how to sample them,
the SLOs and the capacities of the shared compiled program. Errors name the file and the field.

    name: llama8b-batching
    base: ../../mist/configs/default.yaml     # a simulation config file, or the same keys inline
    axes:
      hardware: [h100, h200]
      tp: [1, 2]
      max_num_seqs: [64, 128, 256]
      decode.hardware: [h200, b200]          # "<pool>.<field>": only that pool's clients
      pd_ratio: [colocated, "1:1", "1:2"]    # prefill:decode clients per serving unit
      replicas: [1, 2, 4]                    # serving units (colocated replicas or P:D groups)
      rate: {min: 2, max: 20, num: 4}        # requests/s (the workload's arrivals rescaled)
      workload: [azure_conv_2023, azure_code_2023]
    sample: {kind: lhs, n: 64, seed: 0}      # grid (default) | random | lhs
    slo: {ttft_ms: 250, tpot_ms: 25}
    run: {configs_per_chunk: 64, memory_gb: 2}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lowering.config import SimConfig, parse_config
from ..lowering.deployment import POLICIES
from ..specs._toml import Fields, read_spec_file
from ..specs.errors import SpecError, UnknownNameError

#: per-client fields an axis may set, on every LLM client or ("<pool>.<field>") on one pool's clients
CLIENT_FIELDS = {"hardware": str, "model": str, "tp": int, "pp": int, "ep": int, "dtype": str,
                 "kv_cache_dtype": str, "policy": str, "max_num_seqs": int, "max_num_batched_tokens": int,
                 "chunk_size": int, "block_size": int, "memory_utilization": float, "max_model_len": int,
                 "preemption_mode": str}
#: axes that change the deployment's shape or the workload
STRUCTURE_AXES = {"replicas": int, "pd_ratio": str, "rate": float, "workload": str}
SAMPLING_KINDS = ("grid", "random", "lhs")


@dataclass
class Axis:
    """One swept quantity: a list of values, or a numeric range (`low`..`high`, `log` spacing)
    that grids take `num` points of and random / Latin-hypercube sampling draws from."""

    name: str
    values: list | None = None
    low: float | None = None
    high: float | None = None
    num: int | None = None
    log: bool = False

    @property
    def kind(self) -> type:
        return CLIENT_FIELDS.get(self.name.split(".")[-1]) or STRUCTURE_AXES[self.name]


@dataclass
class Sampling:
    kind: str = "grid"
    n: int | None = None
    seed: int = 0


@dataclass
class RunOptions:
    """How the sweep runs: minimum capacities of the shared program (raise them so that several
    sweeps share one compiled program), configs simulated at once (lanes of the vmapped batch,
    refilled as configs end), and the memory budget."""

    # lanes; None: what fits `memory_gb`, at most max(32, the configs / 32 on CPU, / 8 on GPU)
    configs_per_chunk: int | None = None
    memory_gb: float | None = None  # None: a share of free host (or device) memory
    clients: int = 0
    slots: int = 0
    stages: int = 0
    pools: int = 0
    pipelines: int = 0
    requests: int = 0
    progress: bool = True


@dataclass
class SweepSpec:
    """A parsed sweep: the base config, the axes, sampling, SLOs and run options. `points`, when
    given, replaces the expansion of `axes` with an explicit list of axis-value dicts."""

    base: SimConfig
    axes: list[Axis] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    slo: dict = field(default_factory=dict)
    run: RunOptions = field(default_factory=RunOptions)
    workloads: dict[str, dict] = field(default_factory=dict)  # label -> workload table
    points: list[dict] | None = None
    name: str = "sweep"
    path: str = "<sweep>"
    base_dir: Path = field(default_factory=Path.cwd)
    base_data: dict = field(default_factory=dict)  # the base config as a mapping (workload re-parsing)


def _check_axis_values(where: str, name: str, ax: Axis) -> None:
    typ = ax.kind
    fld = f"axes.{name}"
    for v in ax.values or []:
        if name == "workload":
            if not isinstance(v, (str, dict)):
                raise SpecError(where, fld, f"expected a trace name or a workload table, got {v!r}",
                                "write e.g. [azure_conv_2023, {trace: azure_code_2023, first: 500}]")
            continue
        if typ is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SpecError(where, fld, f"expected positive integers, got {v!r}", "write e.g. [1, 2, 4]")
        if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise SpecError(where, fld, f"expected positive numbers, got {v!r}", "write e.g. [1.5, 3, 6]")
        if typ is str and not isinstance(v, str):
            raise SpecError(where, fld, f"expected strings, got {v!r}", "quote the values")
    base = name.split(".")[-1]
    if base == "hardware":
        from ..specs.catalog import get_hardware

        for v in ax.values or []:
            try:
                get_hardware(v)
            except UnknownNameError as e:
                raise SpecError(where, fld, str(e), "use a name from `mist hardware`") from None
    if base == "policy":
        for v in ax.values or []:
            if str(v).lower() not in POLICIES:
                raise SpecError(where, fld, f"'{v}' is not a policy", f"use one of {', '.join(sorted(POLICIES))}")
    if name == "pd_ratio":
        for v in ax.values or []:
            parse_pd_ratio(v, where, fld)


def parse_pd_ratio(v: Any, where: str = "<sweep>", fld: str = "axes.pd_ratio") -> tuple[int, int] | None:
    """'P:D' -> (P, D) prefill and decode clients per serving unit; 'colocated' -> None."""
    if v is None or str(v).lower() in ("colocated", "none", "0"):
        return None
    parts = str(v).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SpecError(where, fld, f"'{v}' is not a prefill:decode ratio", 'write e.g. "1:2" or colocated')
    return int(parts[0]), int(parts[1])


def parse_axis(f: Fields, name: str, where: str) -> Axis:
    field_name = name.split(".")[-1]
    if name not in STRUCTURE_AXES and field_name not in CLIENT_FIELDS:
        known = sorted(set(CLIENT_FIELDS) | set(STRUCTURE_AXES))
        raise SpecError(where, f"axes.{name}", "unknown axis",
                        f"use one of {', '.join(known)} (client fields may be prefixed by a pool: decode.hardware)")
    raw = f.raw(name)
    if isinstance(raw, dict):
        r = Fields(raw, where, f"axes.{name}.")
        ax = Axis(name, low=r.number("min", positive=True), high=r.number("max", positive=True),
                  num=r.number("num", None, integer=True, positive=True), log=bool(r.raw("log", False)))
        r.check_unknown({"min", "max", "num", "log"})
        if not isinstance(ax.kind, type) or ax.kind is str:
            raise SpecError(where, f"axes.{name}", "a range needs a numeric axis", "give a list of values")
        if ax.high < ax.low:
            raise SpecError(where, f"axes.{name}.max", "max < min", "swap them")
        return ax
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise SpecError(where, f"axes.{name}", "empty list", "give at least one value")
    ax = Axis(name, values=list(values))
    _check_axis_values(where, name, ax)
    return ax


def workload_label(v: Any, i: int) -> str:
    if isinstance(v, str):
        return v
    return str(v.get("name") or v.get("trace") or f"workload{i}")


def parse_sweep(data: dict, where: str = "<sweep>", base_dir: Path | None = None) -> SweepSpec:
    """A sweep mapping (as read from a file) -> `SweepSpec`; the base config is validated too."""
    base_dir = base_dir or Path.cwd()
    f = Fields(data, where)
    name = f.string("name", Path(where).stem)
    base_raw = f.raw("base")
    if isinstance(base_raw, str):
        bp = Path(base_raw)
        bp = bp if bp.is_absolute() else base_dir / bp
        base_data, base_where, bdir = read_spec_file(bp), str(bp), bp.parent
    elif isinstance(base_raw, dict):
        base_data, base_where, bdir = copy.deepcopy(base_raw), f"{where}: base", base_dir
    else:
        raise SpecError(where, "base", "expected a config file path or an inline config table",
                        "write base: path/to/config.yaml, or base: {clients: [...], workload: {...}}")
    af = f.table("axes", {})
    axes = [parse_axis(af, k, where) for k in list(af.data)]
    workloads: dict[str, dict] = {}
    wl_ax = next((a for a in axes if a.name == "workload"), None)
    base_wl = dict(base_data.get("workload") or {})
    if wl_ax is not None:
        labels = []
        for i, v in enumerate(wl_ax.values):
            label = workload_label(v, i)
            if isinstance(v, str):
                tbl = {k: x for k, x in base_wl.items()
                       if k not in ("num_requests", "arrival", "input", "output", "trace", "format")}
                tbl["trace"] = v
            else:
                tbl = {k: x for k, x in v.items() if k != "name"}
            workloads[label] = tbl
            labels.append(label)
        wl_ax.values = labels
        if not base_wl:
            base_data["workload"] = workloads[labels[0]]
    base = parse_config(base_data, base_where, bdir)
    sf = f.table("sample", {})
    sampling = Sampling(kind=sf.string("kind", "grid", choices=SAMPLING_KINDS),
                        n=sf.number("n", None, integer=True, positive=True), seed=sf.number("seed", 0, integer=True))
    sf.check_unknown({"kind", "n", "seed"})
    if sampling.kind != "grid" and sampling.n is None:
        raise SpecError(where, "sample.n", f"{sampling.kind} sampling needs a sample count", "add n: 64")
    for ax in axes:
        if ax.values is None and sampling.kind == "grid" and ax.num is None:
            raise SpecError(where, f"axes.{ax.name}.num", "a range in a grid needs a number of points", "add num: 5")
    slo = {**base.slo, **dict(f.raw("slo", {}) or {})}
    _check_slo(slo, where)
    rf = f.table("run", {})
    run = RunOptions(configs_per_chunk=rf.number("configs_per_chunk", None, integer=True, positive=True),
                     memory_gb=rf.number("memory_gb", None, positive=True),
                     **{k: rf.number(k, 0, integer=True) for k in ("clients", "slots", "stages", "pools", "pipelines",
                                                                 "requests")},
                     progress=bool(rf.raw("progress", True)))
    rf.check_unknown({"configs_per_chunk", "memory_gb", "clients", "slots", "stages", "pools", "pipelines",
                      "requests", "progress"})
    pts = f.raw("points", None)
    if pts is not None:
        if not isinstance(pts, list) or not all(isinstance(p, dict) for p in pts):
            raise SpecError(where, "points", "expected a list of axis-value tables", "write points: [{tp: 1}, ...]")
        for i, p in enumerate(pts):
            pf = Fields(p, where, f"points[{i}].")
            for k in p:
                parse_axis(pf, k, where)
    f.check_unknown({"name", "base", "axes", "sample", "slo", "run", "points", "description"})
    return SweepSpec(base=base, axes=axes, sampling=sampling, slo=slo, run=run, workloads=workloads,
                     points=[dict(p) for p in pts] if pts is not None else None, name=name, path=where,
                     base_dir=bdir, base_data=base_data)


def _check_slo(slo: dict, where: str) -> None:
    from ..results import SLO

    try:
        SLO(**slo)
    except TypeError as e:
        raise SpecError(where, "slo", str(e), "use ttft_ms, tpot_ms, percentiles, ttft_slowdown, tpot_slowdown, "
                        "max_rejected_fraction") from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (.yaml, .yml, .toml or .json)."""
    p = Path(path)
    return parse_sweep(read_spec_file(p), str(p), p.parent)


__all__ = ["Axis", "Sampling", "RunOptions", "SweepSpec", "load_sweep", "parse_sweep", "parse_pd_ratio",
           "CLIENT_FIELDS", "STRUCTURE_AXES"]
