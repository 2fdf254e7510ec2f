"""The request table: the engine's input.

A :class:`Requests` holds fixed-capacity arrays, one row per request. Rows whose
``valid`` flag is False are padding (arrival ``+inf``, all lengths 0, no hashes);
valid rows come first and are sorted by arrival time. Fixed capacity lets one
jitted engine serve many workloads of different sizes without recompiling.

Build one from user data with :meth:`Requests.from_numpy` or
:meth:`Requests.from_dataframe`: these validate in NumPy and raise a
``ValueError`` (:class:`mist.specs.errors.SpecError`) naming the field and the fix,
never a JAX traceback. The other methods (``take``, ``sort_by_arrival``,
``concat``) are plain ``jnp`` code and work under ``jax.jit``; ``pad_to`` takes a
static capacity.
"""

from __future__ import annotations

from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int32

from mist.specs.errors import SpecError

__all__ = ["Requests", "concat", "pack_hashes"]

_INT32_MAX = np.iinfo(np.int32).max


def _float_dtype() -> np.dtype:
    """float64 when jax_enable_x64 is on, else float32 (what jnp would pick)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def pack_hashes(hashes: Sequence[Sequence[int]], max_blocks: int | None = None) -> np.ndarray:
    """Pack ragged per-request prefix-block hash lists into an int32 ``(n, b)`` array padded with -1.

    ``b`` is ``max_blocks`` if given (longer lists are truncated: only the first
    ``max_blocks`` blocks of a prefix are kept), else the longest list (at least 1).
    """
    n = len(hashes)
    lens = np.fromiter((len(h) for h in hashes), dtype=np.int64, count=n)
    longest = int(lens.max()) if n else 0
    b = max(1, longest if max_blocks is None else int(max_blocks))
    if max_blocks is not None and max_blocks < 1:
        raise SpecError("prefix hashes", "max_blocks", f"must be >= 1, got {max_blocks}",
                        "pass a positive number of blocks to keep per request, or None for all")
    out = np.full((n, b), -1, dtype=np.int64)
    if n and longest:
        flat = np.concatenate([np.asarray(h[:b], dtype=np.int64) for h in hashes if len(h)]) \
            if any(len(h) for h in hashes) else np.zeros(0, np.int64)
        kept = np.minimum(lens, b)
        rows = np.repeat(np.arange(n), kept)
        cols = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
        out[rows, cols] = flat
    if out.size and (out.min() < -1 or out.max() > _INT32_MAX):
        raise SpecError("prefix hashes", "prefix_hash", "hash ids must be integers in [0, 2^31)",
                        "remap hash ids to small non-negative integers (e.g. with np.unique(..., return_inverse=True))")
    return out.astype(np.int32)


def _where(source: str, i: int) -> str:
    return f"{source} row {i}"


def _check_int_field(source: str, name: str, a: Any, n: int, *, lo: int, lo_text: str, fix: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,):
        raise SpecError(source, name, f"has shape {arr.shape}, expected ({n},) like 'arrival'",
                        "give one value per request")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.argmax(bad))
            raise SpecError(_where(source, i), name, f"{arr[i]!r} is not an integer", fix)
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        try:
            arr = arr.astype(np.int64)
        except (TypeError, ValueError):
            raise SpecError(source, name, f"values of type {arr.dtype} are not integers", fix) from None
    arr = arr.astype(np.int64)
    if n:
        bad = arr < lo
        if bad.any():
            i = int(np.argmax(bad))
            raise SpecError(_where(source, i), name, f"{arr[i]} is {lo_text}", fix)
        if arr.max() > _INT32_MAX:
            i = int(np.argmax(arr))
            raise SpecError(_where(source, i), name, f"{arr[i]} does not fit in int32", fix)
    return arr.astype(np.int32)


class Requests(eqx.Module):
    """A batch of inference requests, as fixed-capacity arrays (capacity ``n``).

    Fields (all of length ``n``; valid rows first, sorted by ``arrival``):

    - ``arrival``: arrival time in seconds (``+inf`` on padding rows).
    - ``input_tokens``: prompt length (>= 1 on valid rows).
    - ``output_tokens``: tokens to generate (>= 0; 0 means a prefill-only request).
    - ``cached_tokens``: prompt-prefix tokens already known to be cached (0 default,
      at most ``input_tokens``).
    - ``prefix_hash``: ``(n, b)`` prefix-block hash ids, -1 padded (``b`` may be 1 when unused).
    - ``pipeline``: pipeline / route id (0 default).
    - ``model``: model id (0 default).
    - ``valid``: False on padding rows.
    """

    arrival: Float[Array, " n"]
    input_tokens: Int32[Array, " n"]
    output_tokens: Int32[Array, " n"]
    cached_tokens: Int32[Array, " n"]
    prefix_hash: Int32[Array, "n b"]
    pipeline: Int32[Array, " n"]
    model: Int32[Array, " n"]
    valid: Bool[Array, " n"]

    def __check_init__(self):
        shapes = [getattr(getattr(self, f), "shape", None) for f in
                  ("arrival", "input_tokens", "output_tokens", "cached_tokens", "pipeline", "model", "valid")]
        ph = getattr(self.prefix_hash, "shape", None)
        if None in shapes or ph is None:
            return
        if len(set(shapes)) != 1 or len(shapes[0]) != 1 or len(ph) != 2 or ph[0] != shapes[0][0]:
            raise ValueError(f"Requests: inconsistent field shapes {shapes} / prefix_hash {ph}; "
                             "build Requests with Requests.from_numpy to get matching shapes")

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        """Number of rows, valid or padding (static)."""
        return int(self.arrival.shape[0])

    @property
    def max_blocks(self) -> int:
        """Width ``b`` of ``prefix_hash`` (static)."""
        return int(self.prefix_hash.shape[1])

    @property
    def num_valid(self) -> Array:
        """Number of valid rows (a JAX int scalar; works under jit, ``int(r.num_valid)`` outside)."""
        return jnp.sum(self.valid.astype(jnp.int32))

    def __len__(self) -> int:
        return self.capacity

    # ------------------------------------------------------------ construction
    @classmethod
    def from_numpy(
        cls,
        arrival: Any,
        input_tokens: Any,
        output_tokens: Any,
        cached_tokens: Any = None,
        prefix_hash: Any = None,
        pipeline: Any = None,
        model: Any = None,
        *,
        capacity: int | None = None,
        sort: bool = False,
        max_blocks: int | None = None,
        source: str = "requests",
    ) -> "Requests":
        """Validate user data (array-likes of length ``n``) and build a ``Requests``.

        ``cached_tokens``/``pipeline``/``model`` may be omitted (0) or scalars.
        ``prefix_hash`` may be an ``(n, b)`` int array (-1 padded) or a sequence of
        per-request hash lists (ragged). ``sort=True`` sorts rows by arrival
        (stable); otherwise unsorted arrivals are an error. ``capacity`` pads the
        result with invalid rows. ``source`` names the data in error messages.
        """
        arr = np.asarray(arrival)
        if arr.ndim != 1:
            raise SpecError(source, "arrival", f"has shape {arr.shape}, expected a 1-D array of seconds",
                            "pass one arrival time per request")
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise SpecError(source, "arrival", f"values of type {arr.dtype} are not numbers",
                            "arrival times are seconds (floats)") from None
        n = arr.shape[0]
        if n:
            bad = np.isnan(arr)
            if bad.any():
                i = int(np.argmax(bad))
                raise SpecError(_where(source, i), "arrival", "is NaN",
                                "every request needs a finite arrival time in seconds; drop or fill the row")
            bad = ~np.isfinite(arr) | (arr < 0)
            if bad.any():
                i = int(np.argmax(bad))
                raise SpecError(_where(source, i), "arrival", f"{arr[i]} is negative or infinite",
                                "arrival times are finite seconds >= 0; shift them so the first is 0")
        inp = _check_int_field(source, "input_tokens", input_tokens, n, lo=1, lo_text="not positive",
                               fix="every request needs at least 1 prompt token; drop empty prompts")
        out = _check_int_field(source, "output_tokens", output_tokens, n, lo=0, lo_text="negative",
                               fix="output lengths are token counts >= 0")
        cached = _check_int_field(source, "cached_tokens", 0 if cached_tokens is None else cached_tokens, n,
                                  lo=0, lo_text="negative", fix="cached prefix lengths are token counts >= 0")
        if n:
            bad = cached > inp
            if bad.any():
                i = int(np.argmax(bad))
                raise SpecError(_where(source, i), "cached_tokens",
                                f"{cached[i]} exceeds input_tokens {inp[i]}",
                                "a cached prefix cannot be longer than the prompt")
        pipe = _check_int_field(source, "pipeline", 0 if pipeline is None else pipeline, n, lo=0,
                                lo_text="negative", fix="pipeline ids are integers >= 0")
        mdl = _check_int_field(source, "model", 0 if model is None else model, n, lo=0,
                               lo_text="negative", fix="model ids are integers >= 0")
        if prefix_hash is None:
            ph = np.full((n, 1), -1, np.int32)
        elif isinstance(prefix_hash, np.ndarray) and prefix_hash.ndim == 2:
            if prefix_hash.shape[0] != n:
                raise SpecError(source, "prefix_hash", f"has {prefix_hash.shape[0]} rows, expected {n}",
                                "give one row of hash ids per request")
            ph = prefix_hash
            if ph.dtype.kind not in "iu":
                raise SpecError(source, "prefix_hash", f"dtype {ph.dtype} is not integer",
                                "hash ids are integers, -1 for padding")
            if max_blocks is not None:
                ph = ph[:, :max_blocks]
            if ph.shape[1] == 0:
                ph = np.full((n, 1), -1, np.int64)
            if ph.size and (ph.min() < -1 or ph.max() > _INT32_MAX):
                raise SpecError(source, "prefix_hash", "hash ids must be in [0, 2^31) with -1 as padding",
                                "remap hash ids to small non-negative integers")
            ph = ph.astype(np.int32)
        else:
            if len(prefix_hash) != n:
                raise SpecError(source, "prefix_hash", f"has {len(prefix_hash)} entries, expected {n}",
                                "give one list of hash ids per request")
            ph = pack_hashes(prefix_hash, max_blocks)
        if n > 1:
            d = np.diff(arr)
            if (d < 0).any():
                if not sort:
                    i = int(np.argmax(d < 0)) + 1
                    raise SpecError(_where(source, i), "arrival",
                                    f"{arr[i]} is earlier than the previous row's {arr[i - 1]} (not sorted)",
                                    "sort the requests by arrival time, or pass sort=True")
                order = np.argsort(arr, kind="stable")
                arr, inp, out, cached, ph, pipe, mdl = (x[order] for x in (arr, inp, out, cached, ph, pipe, mdl))
        r = cls(
            arrival=jnp.asarray(arr.astype(_float_dtype())),
            input_tokens=jnp.asarray(inp),
            output_tokens=jnp.asarray(out),
            cached_tokens=jnp.asarray(cached),
            prefix_hash=jnp.asarray(ph),
            pipeline=jnp.asarray(pipe),
            model=jnp.asarray(mdl),
            valid=jnp.ones((n,), dtype=bool),
        )
        if capacity is not None:
            r = r.pad_to(capacity)
        return r

    @classmethod
    def empty(cls, capacity: int = 0, max_blocks: int = 1) -> "Requests":
        """An all-padding table."""
        n = int(capacity)
        return cls(
            arrival=jnp.full((n,), jnp.inf, dtype=_float_dtype()),
            input_tokens=jnp.zeros((n,), jnp.int32),
            output_tokens=jnp.zeros((n,), jnp.int32),
            cached_tokens=jnp.zeros((n,), jnp.int32),
            prefix_hash=jnp.full((n, max(1, int(max_blocks))), -1, jnp.int32),
            pipeline=jnp.zeros((n,), jnp.int32),
            model=jnp.zeros((n,), jnp.int32),
            valid=jnp.zeros((n,), bool),
        )

    @classmethod
    def from_dataframe(cls, df: Any, *, capacity: int | None = None, sort: bool = False,
                       max_blocks: int | None = None, source: str = "dataframe") -> "Requests":
        """Build from a pandas DataFrame with columns ``arrival``, ``input_tokens``,
        ``output_tokens`` and optionally ``cached_tokens``, ``pipeline``, ``model``
        and ``prefix_hash`` (a column of hash-id lists). Validated like :meth:`from_numpy`.
        """
        missing = [c for c in ("arrival", "input_tokens", "output_tokens") if c not in df.columns]
        if missing:
            raise SpecError(source, missing[0], "column is missing",
                            f"the DataFrame needs columns arrival, input_tokens, output_tokens; it has {list(df.columns)}")
        if df["arrival"].isna().any():
            i = int(np.argmax(df["arrival"].isna().to_numpy()))
            raise SpecError(_where(source, i), "arrival", "is missing (NaN)",
                            "every request needs an arrival time in seconds")

        def col(name):
            if name not in df.columns:
                return None
            s = df[name]
            if s.isna().any():
                i = int(np.argmax(s.isna().to_numpy()))
                raise SpecError(_where(source, i), name, "is missing (NaN)", "fill or drop the row")
            return s.to_numpy()

        ph = None
        if "prefix_hash" in df.columns:
            ph = [list(h) if h is not None and not (isinstance(h, float) and np.isnan(h)) else []
                  for h in df["prefix_hash"].tolist()]
        return cls.from_numpy(
            df["arrival"].to_numpy(), col("input_tokens"), col("output_tokens"),
            cached_tokens=col("cached_tokens"), prefix_hash=ph, pipeline=col("pipeline"), model=col("model"),
            capacity=capacity, sort=sort, max_blocks=max_blocks, source=source)

    # ---------------------------------------------------------------- export
    def to_numpy(self, valid_only: bool = True) -> dict[str, np.ndarray]:
        """The fields as NumPy arrays (valid rows only by default)."""
        d = {f: np.asarray(getattr(self, f)) for f in
             ("arrival", "input_tokens", "output_tokens", "cached_tokens", "prefix_hash",
              "pipeline", "model", "valid")}
        if valid_only:
            m = d["valid"]
            d = {k: v[m] for k, v in d.items()}
        return d

    def to_dataframe(self, valid_only: bool = True) -> Any:
        """A pandas DataFrame of the (valid) rows; ``prefix_hash`` is a column of lists with -1 stripped."""
        import pandas as pd

        d = self.to_numpy(valid_only)
        ph = d.pop("prefix_hash")
        df = pd.DataFrame({k: d[k] for k in ("arrival", "input_tokens", "output_tokens", "cached_tokens",
                                             "pipeline", "model")})
        df["prefix_hash"] = [row[row >= 0].tolist() for row in ph]
        if not valid_only:
            df["valid"] = d["valid"]
        return df

    # ------------------------------------------------------------ reshaping
    def pad_to(self, capacity: int) -> "Requests":
        """Grow (or shrink) to ``capacity`` rows.

        New rows are padding (valid False, arrival +inf, lengths 0, hashes -1).
        Shrinking only drops rows that are padding; dropping valid rows raises ValueError.
        """
        capacity = int(capacity)
        n = self.capacity
        if capacity < 0:
            raise SpecError("Requests.pad_to", "capacity", f"{capacity} is negative", "pass a capacity >= 0")
        if capacity == n:
            return self
        if capacity < n:
            try:
                lost = int(np.asarray(self.valid[capacity:]).sum())
            except jax.errors.ConcretizationTypeError:
                raise SpecError("Requests.pad_to", "capacity",
                                f"{capacity} is below the current capacity {n} inside jit",
                                "shrink outside jit, or only grow inside jit") from None
            if lost:
                raise SpecError("Requests.pad_to", "capacity",
                                f"{capacity} would drop {lost} valid requests (capacity {n}, "
                                f"{int(self.num_valid)} valid)",
                                "pass a capacity >= num_valid (valid rows come first)")
            return jax.tree_util.tree_map(lambda x: x[:capacity], self)
        return concat(self, Requests.empty(capacity - n, self.max_blocks), sort=False)

    def take(self, indices: Any) -> "Requests":
        """Rows at ``indices`` (a gather; works under jit)."""
        idx = jnp.asarray(indices)
        return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), self)

    def sort_by_arrival(self) -> "Requests":
        """Stable sort: valid rows by arrival, then padding rows (works under jit)."""
        key = jnp.where(self.valid, self.arrival, jnp.inf)
        # lexsort: last key is primary -> invalid rows (valid False -> 1) go last
        order = jnp.lexsort((key, (~self.valid).astype(jnp.int32)))
        return self.take(order)

    def with_fields(self, **fields: Any) -> "Requests":
        """A copy with some fields replaced (e.g. ``r.with_fields(pipeline=...)``)."""
        names = list(fields)
        return eqx.tree_at(lambda r: [getattr(r, k) for k in names], self,
                           [jnp.asarray(fields[k]) for k in names])

    def __repr__(self) -> str:
        try:
            nv = int(self.num_valid)
        except Exception:  # traced
            nv = "?"
        return f"Requests(capacity={self.capacity}, valid={nv}, max_blocks={self.max_blocks})"


def _widen_hashes(ph: Array, b: int) -> Array:
    if ph.shape[1] == b:
        return ph
    return jnp.concatenate([ph, jnp.full((ph.shape[0], b - ph.shape[1]), -1, ph.dtype)], axis=1)


def concat(*parts: Requests, sort: bool = True) -> Requests:
    """Stack several ``Requests`` (e.g. one per pipeline or model) into one table.

    ``prefix_hash`` is widened to the largest ``b``. With ``sort=True`` (default) the
    result is re-sorted by arrival with padding rows last, so it is a valid table.
    Works under jit.
    """
    if len(parts) == 1 and not isinstance(parts[0], Requests):
        parts = tuple(parts[0])
    if not parts:
        return Requests.empty(0)
    b = max(p.max_blocks for p in parts)
    fields = {}
    for f in ("arrival", "input_tokens", "output_tokens", "cached_tokens", "pipeline", "model", "valid"):
        dt = jnp.result_type(*[getattr(p, f).dtype for p in parts])
        fields[f] = jnp.concatenate([getattr(p, f).astype(dt) for p in parts])
    fields["prefix_hash"] = jnp.concatenate([_widen_hashes(p.prefix_hash, b) for p in parts], axis=0)
    out = Requests(**fields)
    return out.sort_by_arrival() if sort else out
