"""Sweep points from axes: the full grid, or random / Latin-hypercube samples of it."""

from __future__ import annotations

import itertools

import numpy as np

from .spec import Axis, Sampling


def _grid_values(ax: Axis) -> list:
    if ax.values is not None:
        return list(ax.values)
    if ax.log:
        vals = np.geomspace(ax.low, ax.high, ax.num)
    else:
        vals = np.linspace(ax.low, ax.high, ax.num)
    return [_cast(ax, v) for v in vals]


def _cast(ax: Axis, v: float):
    return int(round(v)) if ax.kind is int else float(v)


def _from_unit(ax: Axis, u: np.ndarray) -> list:
    """Map uniform [0, 1) draws to axis values: an index into a list, or a point of a range."""
    if ax.values is not None:
        idx = np.minimum((u * len(ax.values)).astype(int), len(ax.values) - 1)
        return [ax.values[i] for i in idx]
    if ax.log:
        x = np.exp(np.log(ax.low) + u * (np.log(ax.high) - np.log(ax.low)))
    else:
        x = ax.low + u * (ax.high - ax.low)
    return [_cast(ax, v) for v in x]


def latin_hypercube(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n points in [0, 1)^d with exactly one point in each of the n strata of every dimension."""
    u = (rng.random((n, d)) + np.arange(n)[:, None]) / n
    for j in range(d):
        u[:, j] = u[rng.permutation(n), j]
    return u


def expand(axes: list[Axis], sampling: Sampling) -> list[dict]:
    """Axis-value dicts, one per config, in a deterministic order."""
    if not axes:
        return [{}]
    names = [a.name for a in axes]
    if sampling.kind == "grid":
        return [dict(zip(names, combo)) for combo in itertools.product(*(_grid_values(a) for a in axes))]
    rng = np.random.default_rng(sampling.seed)
    n = int(sampling.n)
    u = latin_hypercube(n, len(axes), rng) if sampling.kind == "lhs" else rng.random((n, len(axes)))
    cols = [_from_unit(a, u[:, j]) for j, a in enumerate(axes)]
    return [{names[j]: cols[j][i] for j in range(len(axes))} for i in range(n)]


__all__ = ["expand", "latin_hypercube"]
