"""One sweep point -> a concrete deployment and workload: axis values applied to the base config.

Structure axes reshape the deployment before field axes set client fields:
- `pd_ratio` "P:D" turns the base's LLM pool into a prefill pool of P clients and a decode pool of D
  clients (the stage that used the LLM pool becomes a prefill stage that emits the first token and a
  decode stage that receives the KV cache over the link between the pools); "colocated" keeps it.
- `replicas` is the number of serving units: colocated replicas, or P:D groups.
- `<field>` sets the field on every LLM client, `<pool>.<field>` on that pool's clients only (and
  does nothing for configs without that pool).
- `rate` rescales the workload's arrival times to that mean rate (requests/s); `workload` picks one
  of the sweep's workloads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..lowering.deployment import ClientSpec, Deployment, PipelineSpec, StageSpec
from ..specs.errors import SpecError
from .spec import CLIENT_FIELDS, SweepSpec, parse_pd_ratio


@dataclass
class ConfigPlan:
    """A sweep point made concrete (or the reason it could not be)."""

    index: int
    point: dict
    deployment: Deployment | None
    workload: str  # label of the workload (before rate scaling)
    rate: float | None  # requests/s, None: the workload's own arrivals
    reason: str = ""

    @property
    def feasible(self) -> bool:
        return not self.reason


def _llm_pools(dep: Deployment) -> list[str]:
    pools = []
    for c in dep.clients:
        if c.kind == "llm" and c.pool not in pools:
            pools.append(c.pool)
    return pools


def _disaggregate(dep: Deployment, p: int, d: int, replicas: int) -> Deployment:
    pools = _llm_pools(dep)
    roles = {c.role for c in dep.clients if c.kind == "llm"}
    if {"prefill", "decode"} <= roles:
        pre = next(c for c in dep.clients if c.role == "prefill")
        dec = next(c for c in dep.clients if c.role == "decode")
        others = [c for c in dep.clients if c.kind != "llm"]
        clients = others + [replace(pre, name=f"{pre.pool}{i}") for i in range(p * replicas)]
        clients += [replace(dec, name=f"{dec.pool}{i}") for i in range(d * replicas)]
        return replace(dep, clients=clients)
    if len(pools) != 1:
        raise SpecError(dep.name, "axes.pd_ratio", f"the base has {len(pools)} LLM pools",
                        "disaggregate a base with exactly one colocated LLM pool")
    llm = pools[0]
    tmpl = next(c for c in dep.clients if c.pool == llm)
    others = [c for c in dep.clients if c.pool != llm]
    clients = others + [replace(tmpl, name=f"prefill{i}", pool="prefill", role="prefill") for i in range(p * replicas)]
    clients += [replace(tmpl, name=f"decode{i}", pool="decode", role="decode") for i in range(d * replicas)]
    pipes = []
    for pipe in dep.pipelines:
        stages = []
        for s in pipe.stages:
            if s.pool == llm:
                stages.append(StageSpec("prefill", extra_prompt=s.extra_prompt, emits=True, kv_transfer=s.kv_transfer))
                stages.append(StageSpec("decode", kv_transfer=True))
            else:
                stages.append(s)
        pipes.append(PipelineSpec(pipe.name, stages))
    routers = {k: v for k, v in dep.routers.items() if k != llm}
    r = dep.routers.get(llm, "round-robin")
    routers.update(prefill=r, decode=r)
    links = [ln for ln in dep.links if llm not in (ln.a, ln.b)]
    return replace(dep, clients=clients, pipelines=pipes, routers=routers, links=links)


def _set_replicas(dep: Deployment, replicas: int) -> Deployment:
    clients = [c for c in dep.clients if c.kind != "llm"]
    for pool in _llm_pools(dep):
        tmpl = next(c for c in dep.clients if c.pool == pool)
        clients += [replace(tmpl, name=f"{pool}{i}") for i in range(replicas)]
    return replace(dep, clients=clients)


def apply_point(spec: SweepSpec, point: dict, index: int = 0) -> ConfigPlan:
    """Build the deployment of one point; spec errors make the plan infeasible (never raise)."""
    base = spec.base.deployment
    label = str(point.get("workload", next(iter(spec.workloads), "base")))
    rate = point.get("rate")
    try:
        dep = replace(base, clients=list(base.clients), name=spec.name)
        pd = parse_pd_ratio(point.get("pd_ratio"), spec.path)
        reps = point.get("replicas")
        if pd is not None:
            dep = _disaggregate(dep, pd[0], pd[1], int(reps or 1))
        elif reps is not None:
            dep = _set_replicas(dep, int(reps))
        pools = {c.pool for c in dep.clients}
        # general axes first, pool-specific ones override them
        for key in sorted(point, key=lambda k: "." in k):
            fld = key.split(".")[-1]
            if fld not in CLIENT_FIELDS:
                continue
            pool = key.split(".")[0] if "." in key else None
            if pool is not None and pool not in pools:
                continue
            val = CLIENT_FIELDS[fld](point[key])
            dep.clients = [replace(c, **{fld: val}) if c.kind == "llm" and (pool is None or c.pool == pool) else c
                           for c in dep.clients]
        return ConfigPlan(index, dict(point), dep, label, None if rate is None else float(rate))
    except SpecError as e:
        return ConfigPlan(index, dict(point), None, label, rate, reason=str(e))


def rescale_arrivals(arrival: np.ndarray, rate: float | None) -> np.ndarray:
    """Arrival times stretched so that their mean rate is `rate` requests/s (shape of gaps kept)."""
    arr = np.asarray(arrival, dtype=np.float64)
    if rate is None or len(arr) < 2:
        return arr
    span = arr[-1] - arr[0]
    own = (len(arr) - 1) / span if span > 0 else np.inf
    if not np.isfinite(own):
        return arr
    return arr[0] + (arr - arr[0]) * (own / rate)


def mean_rate(arrival: np.ndarray) -> float:
    arr = np.asarray(arrival, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    span = arr[-1] - arr[0] if len(arr) > 1 else 0.0
    return (len(arr) - 1) / span if span > 0 else float("inf")


__all__ = ["ConfigPlan", "apply_point", "rescale_arrivals", "mean_rate", "ClientSpec"]
