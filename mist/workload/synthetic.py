"""Synthetic workloads: arrival processes and length distributions, seeded by a JAX PRNG key.

Every distribution is a small frozen spec object with ``sample(key, n)``; the
same key always gives the same numbers. Each can also be written as a dict,
``{"kind": "poisson", "rate": 2.0}`` or
``{"kind": "lognormal", "median": 512, "sigma": 1.0, "min": 1, "max": 8192}``,
which is what workload spec files hold. :func:`generate` puts them together::

    reqs = generate(jax.random.key(0), 1000,
                    arrival={"kind": "gamma", "rate": 4.0, "cv": 2.0},
                    input={"kind": "lognormal", "median": 512, "sigma": 1.0, "max": 8192},
                    output={"kind": "uniform", "low": 16, "high": 512})

Arrival times start at ``start`` (0 s by default): the first request arrives at
``start`` and the gaps between successive requests follow the process.
Bad parameters (negative rates or lengths, unknown kinds or fields) raise
``ValueError`` (:class:`mist.specs.errors.SpecError`) naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int32

from mist.specs.errors import SpecError

from .requests import Requests, _float_dtype

__all__ = [
    "ArrivalProcess", "LengthDist",
    "Poisson", "Gamma", "Constant", "Bursty",
    "Fixed", "Uniform", "Normal", "LogNormal", "Empirical",
    "poisson", "gamma", "constant", "bursty",
    "fixed", "uniform", "normal", "lognormal", "empirical",
    "arrival_from_spec", "length_from_spec", "generate", "as_key",
]


def as_key(key: Any) -> Array:
    """Accept a JAX PRNG key (new-style or legacy uint32[2]) or an int seed."""
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def _err(owner: str, field: str, problem: str, fix: str = "") -> SpecError:
    return SpecError(owner, field, problem, fix)


def _num(owner: str, field: str, v: Any, *, positive: bool = False, nonneg: bool = False,
         integer: bool = False, allow_none: bool = False) -> Any:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise _err(owner, field, f"{v!r} is not a number", "give a number")
    v = float(v)
    if not math.isfinite(v):
        raise _err(owner, field, f"{v} is not finite", "give a finite number")
    if positive and v <= 0:
        raise _err(owner, field, f"must be > 0, got {v:g}", "give a positive value")
    if nonneg and v < 0:
        raise _err(owner, field, f"must be >= 0, got {v:g}", "give a non-negative value")
    if integer:
        if v != round(v):
            raise _err(owner, field, f"must be an integer, got {v:g}", "give a whole number of tokens")
        return int(round(v))
    return v


# ----------------------------------------------------------------------------- arrivals
class ArrivalProcess:
    """Base: ``sample(key, n) -> Float[Array, "n"]`` sorted arrival times starting at ``start``."""

    kind: ClassVar[str] = ""
    start: float

    @staticmethod
    def _gaps(p: dict, key: Array, n: int) -> Float[Array, " n"]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _draw(cls, p: dict, key: Array, n: int) -> Float[Array, " n"]:
        g = cls._gaps(p, key, n).astype(_float_dtype())
        # the first request arrives at `start`; gap i separates requests i and i+1
        t = jnp.concatenate([jnp.zeros((1,), g.dtype), jnp.cumsum(g[:-1])])
        # XLA's parallel cumsum can round a later partial sum below an earlier one; keep it sorted
        return jax.lax.cummax(t, axis=0) + p["start"].astype(g.dtype)

    def sample(self, key: Any, n: int) -> Float[Array, " n"]:
        """``n`` sorted arrival times (seconds); jitted, cached per (kind, n), not per parameter value."""
        n = int(n)
        if n == 0:
            return jnp.zeros((0,), _float_dtype())
        return _jitted_draw(type(self), _params(self), as_key(key), n)

    def to_spec(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Poisson(ArrivalProcess):
    """Poisson process: exponential gaps with mean ``1/rate`` (requests per second)."""

    rate: float
    start: float = 0.0
    kind: ClassVar[str] = "poisson"

    def __post_init__(self):
        object.__setattr__(self, "rate", _num("arrival 'poisson'", "rate", self.rate, positive=True))
        object.__setattr__(self, "start", _num("arrival 'poisson'", "start", self.start, nonneg=True))

    @staticmethod
    def _gaps(p, key, n):
        return jax.random.exponential(key, (n,)) / p["rate"]


@dataclasses.dataclass(frozen=True)
class Gamma(ArrivalProcess):
    """Renewal process with gamma gaps: mean ``1/rate``, coefficient of variation ``cv``.

    ``cv = 1`` is Poisson; ``cv > 1`` is burstier, ``cv < 1`` more regular.
    """

    rate: float
    cv: float = 1.0
    start: float = 0.0
    kind: ClassVar[str] = "gamma"

    def __post_init__(self):
        o = "arrival 'gamma'"
        object.__setattr__(self, "rate", _num(o, "rate", self.rate, positive=True))
        object.__setattr__(self, "cv", _num(o, "cv", self.cv, positive=True))
        object.__setattr__(self, "start", _num(o, "start", self.start, nonneg=True))

    @staticmethod
    def _gaps(p, key, n):
        shape = 1.0 / (p["cv"] * p["cv"])
        return jax.random.gamma(key, shape, (n,)) / (shape * p["rate"])


@dataclasses.dataclass(frozen=True)
class Constant(ArrivalProcess):
    """Evenly spaced arrivals, ``1/rate`` seconds apart (the key is unused)."""

    rate: float
    start: float = 0.0
    kind: ClassVar[str] = "constant"

    def __post_init__(self):
        object.__setattr__(self, "rate", _num("arrival 'constant'", "rate", self.rate, positive=True))
        object.__setattr__(self, "start", _num("arrival 'constant'", "start", self.start, nonneg=True))

    @staticmethod
    def _draw(p, key, n):
        dt = _float_dtype()
        return jnp.arange(n, dtype=dt) / p["rate"].astype(dt) + p["start"].astype(dt)


@dataclasses.dataclass(frozen=True)
class Bursty(ArrivalProcess):
    """On/off modulated Poisson process.

    Each ``period`` seconds starts with a burst of ``burst_duration`` seconds at
    ``burst_rate`` req/s, followed by ``period - burst_duration`` seconds at
    ``base_rate`` (which may be 0: silent off phases). Sampled exactly by time
    rescaling of a unit-rate Poisson process.
    """

    base_rate: float
    burst_rate: float
    burst_duration: float
    period: float
    start: float = 0.0
    kind: ClassVar[str] = "bursty"

    def __post_init__(self):
        o = "arrival 'bursty'"
        object.__setattr__(self, "base_rate", _num(o, "base_rate", self.base_rate, nonneg=True))
        object.__setattr__(self, "burst_rate", _num(o, "burst_rate", self.burst_rate, nonneg=True))
        object.__setattr__(self, "period", _num(o, "period", self.period, positive=True))
        object.__setattr__(self, "burst_duration",
                           _num(o, "burst_duration", self.burst_duration, nonneg=True))
        object.__setattr__(self, "start", _num(o, "start", self.start, nonneg=True))
        if self.burst_duration > self.period:
            raise _err(o, "burst_duration", f"{self.burst_duration:g} exceeds period {self.period:g}",
                       "the burst must fit inside one period")
        if self.per_period_mass <= 0:
            raise _err(o, "burst_rate", "base_rate and burst_rate give no requests at all",
                       "make base_rate or burst_rate (with burst_duration > 0) positive")

    @property
    def per_period_mass(self) -> float:
        return self.burst_rate * self.burst_duration + self.base_rate * (self.period - self.burst_duration)

    @property
    def mean_rate(self) -> float:
        return self.per_period_mass / self.period

    @staticmethod
    def _draw(p, key, n):
        dt = _float_dtype()
        e = jax.random.exponential(key, (n,)).astype(dt)
        u = jnp.concatenate([jnp.zeros((1,), dt), jnp.cumsum(e[:-1])])  # unit-rate times, first at 0
        on_mass = p["burst_rate"] * p["burst_duration"]
        mass = on_mass + p["base_rate"] * (p["period"] - p["burst_duration"])
        k = jnp.floor(u / mass)
        r = u - k * mass
        in_burst = r < on_mass
        t_on = r / jnp.maximum(p["burst_rate"], 1e-30)
        t_off = p["burst_duration"] + (r - on_mass) / jnp.maximum(p["base_rate"], 1e-30)
        t = (k * p["period"] + jnp.where(in_burst, t_on, t_off)).astype(dt)
        # guard float rounding so the output stays sorted
        return jax.lax.cummax(t, axis=0) + p["start"].astype(dt)


# ------------------------------------------------------------------------------ lengths
class LengthDist:
    """Base: ``sample(key, n) -> Int32[Array, "n"]`` token counts."""

    kind: ClassVar[str] = ""

    @staticmethod
    def _draw(p: dict, key: Array, n: int) -> Int32[Array, " n"]:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, key: Any, n: int) -> Int32[Array, " n"]:
        """``n`` token counts; jitted, cached per (kind, n), not per parameter value."""
        n = int(n)
        if n == 0:
            return jnp.zeros((0,), jnp.int32)
        return _jitted_draw(type(self), _params(self), as_key(key), n)

    def to_spec(self) -> dict:
        d = dataclasses.asdict(self)
        return {"kind": self.kind, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}}

    @property
    def lowest(self) -> int:
        """Smallest value the distribution can produce."""
        raise NotImplementedError  # pragma: no cover


def _round_clip(x: Array, lo: Any, hi: Any) -> Array:
    x = jnp.round(x)
    x = jnp.clip(x, lo, hi if hi is not None else 2.0 ** 31 - 1)
    return x.astype(jnp.int32)


def _bounds(o: str, lo: Any, hi: Any, default_lo: int = 1) -> tuple[int, int | None]:
    lo = default_lo if lo is None else _num(o, "min", lo, nonneg=True, integer=True)
    hi = _num(o, "max", hi, nonneg=True, integer=True, allow_none=True)
    if hi is not None and hi < lo:
        raise _err(o, "max", f"{hi} is below min {lo}", "make max >= min")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Fixed(LengthDist):
    """Every request gets ``value`` tokens."""

    value: int
    kind: ClassVar[str] = "fixed"

    def __post_init__(self):
        object.__setattr__(self, "value", _num("length 'fixed'", "value", self.value, nonneg=True, integer=True))

    @property
    def lowest(self):
        return self.value

    @staticmethod
    def _draw(p, key, n):
        return jnp.full((n,), p["value"], jnp.int32)


@dataclasses.dataclass(frozen=True)
class Uniform(LengthDist):
    """Integers uniform on ``[low, high]`` (both inclusive)."""

    low: int
    high: int
    kind: ClassVar[str] = "uniform"

    def __post_init__(self):
        o = "length 'uniform'"
        object.__setattr__(self, "low", _num(o, "low", self.low, nonneg=True, integer=True))
        object.__setattr__(self, "high", _num(o, "high", self.high, nonneg=True, integer=True))
        if self.high < self.low:
            raise _err(o, "high", f"{self.high} is below low {self.low}", "make high >= low")

    @property
    def lowest(self):
        return self.low

    @staticmethod
    def _draw(p, key, n):
        return jax.random.randint(key, (n,), p["low"], p["high"] + 1, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Normal(LengthDist):
    """Rounded normal(``mean``, ``std``), clipped to ``[min, max]`` (``min`` defaults to 1)."""

    mean: float
    std: float
    min: int | None = None
    max: int | None = None
    kind: ClassVar[str] = "normal"

    def __post_init__(self):
        o = "length 'normal'"
        object.__setattr__(self, "mean", _num(o, "mean", self.mean, nonneg=True))
        object.__setattr__(self, "std", _num(o, "std", self.std, nonneg=True))
        lo, hi = _bounds(o, self.min, self.max)
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)

    @property
    def lowest(self):
        return self.min

    @staticmethod
    def _draw(p, key, n):
        z = jax.random.normal(key, (n,))
        return _round_clip(p["mean"] + p["std"] * z, p["min"], p["max"])


@dataclasses.dataclass(frozen=True)
class LogNormal(LengthDist):
    """Rounded log-normal, clipped to ``[min, max]`` (``min`` defaults to 1).

    Give exactly one of ``median`` (= exp(mu)) or ``mean`` (= exp(mu + sigma^2/2)),
    and ``sigma``, the standard deviation of the log.
    """

    sigma: float
    median: float | None = None
    mean: float | None = None
    min: int | None = None
    max: int | None = None
    kind: ClassVar[str] = "lognormal"

    def __post_init__(self):
        o = "length 'lognormal'"
        object.__setattr__(self, "sigma", _num(o, "sigma", self.sigma, nonneg=True))
        med = _num(o, "median", self.median, positive=True, allow_none=True)
        mean = _num(o, "mean", self.mean, positive=True, allow_none=True)
        if (med is None) == (mean is None):
            raise _err(o, "median", "give exactly one of 'median' or 'mean'",
                       "e.g. {'kind': 'lognormal', 'median': 512, 'sigma': 1.0}")
        object.__setattr__(self, "median", med)
        object.__setattr__(self, "mean", mean)
        lo, hi = _bounds(o, self.min, self.max)
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)

    @property
    def mu(self) -> float:
        if self.median is not None:
            return math.log(self.median)
        return math.log(self.mean) - 0.5 * self.sigma ** 2

    @property
    def lowest(self):
        return self.min

    def _params(self):
        return {"mu": self.mu, "sigma": self.sigma, "min": self.min, "max": self.max}

    @staticmethod
    def _draw(p, key, n):
        z = jax.random.normal(key, (n,))
        return _round_clip(jnp.exp(p["mu"] + p["sigma"] * z), p["min"], p["max"])


@dataclasses.dataclass(frozen=True)
class Empirical(LengthDist):
    """Draw (with replacement) from observed ``values``, optionally with ``weights``."""

    values: Sequence[int]
    weights: Sequence[float] | None = None
    kind: ClassVar[str] = "empirical"

    def __post_init__(self):
        o = "length 'empirical'"
        v = np.asarray(self.values)
        if v.ndim != 1 or v.size == 0:
            raise _err(o, "values", "must be a non-empty list of token counts", "give observed lengths")
        if not np.issubdtype(v.dtype, np.number) or not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
            raise _err(o, "values", "must all be whole numbers", "give integer token counts")
        if np.any(v < 0):
            i = int(np.argmax(v < 0))
            raise _err(o, "values", f"entry {i} is negative ({v[i]})", "token counts are >= 0")
        object.__setattr__(self, "values", tuple(int(x) for x in v))
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if w.shape != v.shape:
                raise _err(o, "weights", f"has {w.size} entries for {v.size} values", "one weight per value")
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise _err(o, "weights", "must be finite, >= 0 and not all 0", "give relative frequencies")
            object.__setattr__(self, "weights", tuple(float(x) for x in w))

    @property
    def lowest(self):
        return min(self.values)

    def _params(self):
        w = None if self.weights is None else np.asarray(self.weights) / np.sum(self.weights)
        return {"values": np.asarray(self.values, np.int32), "p": w}

    @staticmethod
    def _draw(p, key, n):
        vals = p["values"]
        idx = jax.random.choice(key, vals.shape[0], (n,), replace=True, p=p["p"])
        return vals[idx]


def _params(spec: Any) -> dict:
    """Numeric parameters as a pytree (traced under jit, so new values do not recompile)."""
    if hasattr(spec, "_params"):
        d = spec._params()
    else:
        d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    return {k: (None if v is None else np.asarray(v, np.float32) if isinstance(v, float) else np.asarray(v))
            for k, v in d.items()}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jitted_draw(cls: type, params: dict, key: Array, n: int) -> Array:
    return cls._draw(params, key, n)


# lowercase factories
poisson, gamma, constant, bursty = Poisson, Gamma, Constant, Bursty
fixed, uniform, normal, lognormal, empirical = Fixed, Uniform, Normal, LogNormal, Empirical

_ARRIVALS = {c.kind: c for c in (Poisson, Gamma, Constant, Bursty)}
_LENGTHS = {c.kind: c for c in (Fixed, Uniform, Normal, LogNormal, Empirical)}


def _from_spec(spec: Any, table: dict, what: str, base: type, where: str):
    if isinstance(spec, base):
        return spec
    if what == "length" and isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return Fixed(int(spec))
    if not isinstance(spec, Mapping):
        raise SpecError(where, "kind", f"{spec!r} is not a {what} spec",
                        f"use a dict like {{'kind': '{next(iter(table))}', ...}}; kinds: {', '.join(table)}")
    d = dict(spec)
    kind = d.pop("kind", None)
    if kind not in table:
        raise SpecError(where, "kind", f"unknown {what} kind {kind!r}", f"use one of: {', '.join(table)}")
    cls = table[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise SpecError(f"{where} ({what} '{kind}')", k, "unknown field",
                            f"fields of '{kind}' are: {', '.join(sorted(names))}")
    try:
        return cls(**d)
    except TypeError:
        req = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [r for r in req if r not in d]
        raise SpecError(f"{where} ({what} '{kind}')", missing[0] if missing else "kind",
                        "required field is missing", f"'{kind}' needs: {', '.join(req)}") from None


def arrival_from_spec(spec: Any, where: str = "arrival") -> ArrivalProcess:
    """An :class:`ArrivalProcess` from a spec dict (or pass one through)."""
    return _from_spec(spec, _ARRIVALS, "arrival", ArrivalProcess, where)


def length_from_spec(spec: Any, where: str = "length") -> LengthDist:
    """A :class:`LengthDist` from a spec dict or an int (fixed length), or pass one through."""
    return _from_spec(spec, _LENGTHS, "length", LengthDist, where)


def generate(
    key: Any,
    num_requests: int,
    arrival: Any = None,
    input: Any = None,  # noqa: A002 - matches the spec-file key
    output: Any = None,
    *,
    pipeline: int = 0,
    model: int = 0,
    capacity: int | None = None,
) -> Requests:
    """Generate a synthetic workload of ``num_requests`` requests.

    ``arrival``, ``input`` and ``output`` are spec objects or dicts (an int means a
    fixed length). ``key`` is a JAX PRNG key or an int seed; it is split into
    independent streams for arrivals, input and output lengths, so the same key
    always yields the same workload. Input lengths are forced to >= 1 (a prompt
    needs a token); output lengths may be 0 only if the output spec allows it.
    ``capacity`` pads the result to a fixed size (>= ``num_requests``).
    """
    n = _num("generate", "num_requests", num_requests, nonneg=True, integer=True)
    if arrival is None or input is None or output is None:
        missing = [k for k, v in (("arrival", arrival), ("input", input), ("output", output)) if v is None]
        raise SpecError("generate", missing[0], "is required",
                        "e.g. arrival={'kind': 'poisson', 'rate': 2.0}, input=512, output=128")
    arr = arrival_from_spec(arrival, "arrival")
    inp = length_from_spec(input, "input")
    out = length_from_spec(output, "output")
    if isinstance(inp, Fixed) and inp.value < 1:
        raise SpecError("input (length 'fixed')", "value", "must be >= 1 for prompts", "prompts need a token")
    for name, v in (("pipeline", pipeline), ("model", model)):
        _num("generate", name, v, nonneg=True, integer=True)
    k_arr, k_in, k_out = jax.random.split(as_key(key), 3)
    t = arr.sample(k_arr, n)
    i = jnp.maximum(inp.sample(k_in, n), 1)
    o = out.sample(k_out, n)
    r = Requests(
        arrival=t,
        input_tokens=i.astype(jnp.int32),
        output_tokens=o.astype(jnp.int32),
        cached_tokens=jnp.zeros((n,), jnp.int32),
        prefix_hash=jnp.full((n, 1), -1, jnp.int32),
        pipeline=jnp.full((n,), int(pipeline), jnp.int32),
        model=jnp.full((n,), int(model), jnp.int32),
        valid=jnp.ones((n,), bool),
    )
    if capacity is not None:
        if capacity < n:
            raise SpecError("generate", "capacity", f"{capacity} is below num_requests {n}",
                            "pass capacity >= num_requests")
        r = r.pad_to(capacity)
    return r
