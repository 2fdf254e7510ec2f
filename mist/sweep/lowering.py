"""Lower every config of a sweep to one set of padded capacities (so they share one compiled
program), marking the ones that cannot be lowered (model does not fit, TP does not divide the
heads ...) infeasible with the reason instead of failing.

Deployments are lowered once each (configs that differ only in rate or workload share them) with
their own capacities, then padded on the host with numpy to the sweep's common capacities: padding
clients are disabled copies of the first client, padding pools have no members, padding stages
serve no pool, padding requests are invalid; exactly what `lower()` does with raised capacities.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import numpy as np

from ..engine.state import init_state
from ..engine.tables import (ClientTable, EngineDims, Policy, Topology, Workload, admits_in_parts, default_queue,
                             default_window, uniform_swap)
from ..lowering.deployment import lower, lower_workload
from ..specs.errors import SpecError
from .configs import ConfigPlan, rescale_arrivals

_TINY = {"arrival": np.zeros(1), "input_tokens": np.ones(1, np.int64), "output_tokens": np.ones(1, np.int64)}


def stack_trees(trees: list):
    """PyTrees of the same structure stacked leaf by leaf along a new leading (lane) axis (numpy)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


@dataclass
class LoweredSweep:
    """Feasible configs as references into deduplicated, padded host (numpy) tables.

    `feasible[j]` is the plan index of the j-th runnable config; it uses deployment tables
    `dep_id[j]` and workload `wl_id[j]`.
    """

    plans: list[ConfigPlan]
    dims: EngineDims
    feasible: list[int]
    dep_id: list[int]
    wl_id: list[int]
    clients: list[ClientTable]
    topologies: list[Topology]
    workloads: list[Workload]
    client_names: list[list[str]]
    pool_names: list[list[str]]
    pipeline_names: list[list[str]]

    def stack(self, rows: list[int]) -> tuple[ClientTable, Topology, Workload]:
        """Stacked (numpy) tables of feasible configs `rows` (positions in `feasible`)."""
        return (stack_trees([self.clients[self.dep_id[r]] for r in rows]),
                stack_trees([self.topologies[self.dep_id[r]] for r in rows]),
                stack_trees([self.workloads[self.wl_id[r]] for r in rows]))

    def with_rates(self, rates: dict[int, float]) -> "LoweredSweep":
        """A copy whose feasible config j (a position in `feasible`) runs its workload at rates[j] req/s."""
        wls, wl_id, cache = list(self.workloads), list(self.wl_id), {}
        for j, r in rates.items():
            key = (self.wl_id[j], float(r))
            if key not in cache:
                w = self.workloads[self.wl_id[j]]
                n = int(w.valid.sum())
                arr = np.array(w.arrival, dtype=np.float64)
                arr[:n] = rescale_arrivals(arr[:n], float(r))
                wls.append(replace(w, arrival=arr))
                cache[key] = len(wls) - 1
            wl_id[j] = cache[key]
        return replace(self, workloads=wls, wl_id=wl_id)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _pad_rows(x: np.ndarray, n: int, fill=None) -> np.ndarray:
    if x.shape[0] >= n:
        return x
    extra = np.repeat(x[:1], n - x.shape[0], axis=0) if fill is None else np.full((n - x.shape[0],) + x.shape[1:],
                                                                                 fill, x.dtype)
    return np.concatenate([x, extra], axis=0)


def _pad2(x: np.ndarray, r: int, c: int, fill) -> np.ndarray:
    out = np.full((r, c) + x.shape[2:], fill, dtype=x.dtype)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def pad_clients(cl: ClientTable, C: int) -> ClientTable:
    c0 = cl.enabled.shape[0]
    out = jax.tree.map(lambda x: _pad_rows(x, C), cl)
    enabled = np.concatenate([cl.enabled, np.zeros(C - c0, bool)])
    return replace(out, enabled=enabled)


def pad_topology(t: Topology, C: int, P: int, NP: int, K: int) -> Topology:
    """`t` padded to C clients, P pools, NP pipelines and K stages (padding: no members, no stages,
    whole-KV transfers, clients that feed nobody). Every field is kept: a dropped `feeds` would bound
    every client's decode stretches by every other client's events (the same results in many more
    steps), a dropped `stage_kv_layers` would expose a layer-by-layer KV transfer whole."""
    feeds = np.ones((C, C), bool) if t.feeds is None else _pad2(t.feeds, C, C, False)
    layers = np.ones((NP, K)) if t.stage_kv_layers is None else _pad2(t.stage_kv_layers, NP, K, 1.0)
    return Topology(link_latency=_pad2(t.link_latency, C, C, 0.0), link_bandwidth=_pad2(t.link_bandwidth, C, C, 1e18),
                    pool_members=_pad2(t.pool_members, P, C, False),
                    router=np.concatenate([t.router, np.zeros(P - t.router.shape[0], t.router.dtype)]),
                    pipeline_pools=_pad2(t.pipeline_pools, NP, K, -1),
                    stage_extra_prompt=_pad2(t.stage_extra_prompt, NP, K, 0),
                    stage_emits=_pad2(t.stage_emits, NP, K, False),
                    stage_kv_transfer=_pad2(t.stage_kv_transfer, NP, K, False),
                    stage_kv_layers=layers.astype(np.float64), feeds=feeds)


# Arrivals admitted inside a decode stretch (EngineDims.absorb) in vmapped sweeps where at least half
# the configs are a lone chunked-prefill client (the only kind that uses them), unless the sweep
# file's `engine.absorb` says otherwise; results are the same with any value (up to the order of
# floating-point sums). Under vmap each admission pass runs for every lane, so a lane-step costs
# ~1.5x more while those configs' steps halve: on the 2-core CPU, 256 such configs x 1k requests ran
# 1.3-1.4x faster with 2 than with 0 (1, 4 and 8 slower than 2), and 1000 x 10k 1.2x; a sweep of
# mostly replicas and PD units (pd_ratio_sweep.yaml) ran 1.4x slower with 2 (experiments/README.md,
# "Sweep speed", 2026-12-03 night).
SWEEP_ABSORB = 2


def _admits_inside_stretches(lo) -> bool:
    """Whether a lowered deployment admits arrivals inside its stretches: `lower` compiled them in
    (a lone client) and its policy is chunked prefill (see engine.step._absorb)."""
    return lo.dims.absorb > 0 and int(np.asarray(lo.clients.policy)[0]) == Policy.CHUNKED


def lower_sweep(plans: list[ConfigPlan], workloads: dict[str, dict], *, stretch: int = 64,
                min_dims: dict | None = None, window: int | None = None, queue: int | None = None,
                absorb: int | None = None) -> LoweredSweep:
    """Lower feasible plans (infeasible ones get their `reason` set) to common padded dims.

    `workloads` maps a label to a dict of request arrays; `min_dims` holds minimum capacities
    (clients, slots, stages, pools, pipelines, requests) so that separate sweeps can share dims.
    `absorb`: arrivals admitted inside a decode stretch (`EngineDims.absorb`; None: `SWEEP_ABSORB`
    when at least half the feasible configs can use them, else 0).
    """
    md = {k: int(v or 0) for k, v in (min_dims or {}).items()}
    dep_cache: dict[str, int] = {}  # deployment -> index into dep_lowered
    dep_errors: dict[str, str] = {}  # deployment -> why it cannot be lowered
    wl_cache: dict[tuple, int] = {}
    dep_lowered, wl_arrays = [], []
    feasible, dep_id, wl_key = [], [], []
    for p in plans:
        if not p.feasible:
            continue
        key = repr(replace(p.deployment, name=""))
        if key not in dep_cache and key not in dep_errors:
            try:
                dep_lowered.append(lower(p.deployment, _TINY, stretch=stretch))
                dep_cache[key] = len(dep_lowered) - 1
            except SpecError as e:
                dep_errors[key] = str(e)
        if key in dep_errors:
            p.reason = dep_errors[key]
            continue
        d = dep_cache[key]
        wk = (p.workload, p.rate)
        if wk not in wl_cache:
            src = workloads[p.workload]
            arrays = {k: np.asarray(v) for k, v in src.items()}
            arrays["arrival"] = rescale_arrivals(arrays["arrival"], p.rate)
            wl_arrays.append(arrays)
            wl_cache[wk] = len(wl_arrays) - 1
        npipe = len(dep_lowered[d].pipeline_names)
        pipe = wl_arrays[wl_cache[wk]].get("pipeline")
        if pipe is not None and len(pipe) and int(np.max(pipe)) >= npipe:
            p.reason = f"{p.deployment.name}: field 'pipelines': the workload names pipeline {int(np.max(pipe))} " \
                       f"but the deployment has {npipe}"
            continue
        feasible.append(p.index)
        dep_id.append(d)
        wl_key.append(wl_cache[wk])
    used = sorted(set(dep_id))
    remap = {d: i for i, d in enumerate(used)}
    los = [dep_lowered[d] for d in used]
    dep_id = [remap[d] for d in dep_id]
    dm = lambda attr, k: max([getattr(lo.dims, attr) for lo in los] + [md.get(k, 0), 1])  # noqa: E731
    C, K, P, NP = dm("num_clients", "clients"), dm("stages", "stages"), dm("pools", "pools"), dm("pipelines", "pipelines")
    S = max([int(np.max(np.asarray(lo.clients.max_num_seqs))) for lo in los] + [md.get("slots", 0), 1])
    N = max([len(w["arrival"]) for w in wl_arrays] + [md.get("requests", 0), 1])
    lone_dep = [_admits_inside_stretches(lo) for lo in los]
    lone = sum(lone_dep[d] for d in dep_id)  # feasible configs that admit inside their stretches
    in_parts = all(admits_in_parts(lo.clients) for lo in los)
    dims = EngineDims(num_requests=N, num_clients=C, slots=S, window=default_window(S, in_parts, window),
                      queue=int(queue or default_queue(N)), stages=K, stretch=max(stretch, 1), pools=P, pipelines=NP,
                      absorb=int(absorb) if absorb is not None else
                      SWEEP_ABSORB if 2 * lone >= len(dep_id) else 0)
    clients = uniform_swap([pad_clients(_host(lo.clients), C) for lo in los])
    topos = [pad_topology(_host(lo.topology), C, P, NP, K) for lo in los]
    wls = [_host(lower_workload(w, N)) for w in wl_arrays]
    names = [lo.client_names + [f"pad{i}" for i in range(C - len(lo.client_names))] for lo in los]
    return LoweredSweep(plans=plans, dims=dims, feasible=feasible, dep_id=dep_id, wl_id=wl_key, clients=clients,
                        topologies=topos, workloads=wls, client_names=names,
                        pool_names=[lo.pool_names for lo in los], pipeline_names=[lo.pipeline_names for lo in los])


def bytes_per_config(dims: EngineDims, ls: LoweredSweep | None = None) -> int:
    """Host/device bytes one config occupies while it runs: the scan state (held twice: the carry
    in and out of a compiled chunk) plus its input tables, times a margin for temporaries."""
    st = jax.eval_shape(lambda k: init_state(dims, k), jax.ShapeDtypeStruct((2,), np.uint32))
    state_b = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(st))
    in_b = 0
    if ls is not None and ls.feasible:
        trees = (ls.clients[0], ls.topologies[0], ls.workloads[0])
        in_b = sum(x.nbytes for x in jax.tree.leaves(trees))
    # cost tables (see engine.step.cost_tables): decode times, token and sample pieces
    tab_b = 8 * dims.num_clients * ((dims.slots + 1) + (6 * (dims.absorb_tokens + 1) + 2 * (dims.slots + 2))
                                    * (dims.absorb > 0))
    return int(3 * state_b + in_b + tab_b + 64 * 1024)


__all__ = ["LoweredSweep", "lower_sweep", "pad_clients", "pad_topology", "bytes_per_config", "stack_trees"]
