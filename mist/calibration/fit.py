"""Fit a device's cost parameters to measured operator timings with optax.

Loss: mean over rows of a robust (soft-L1) penalty of r = log predicted - log measured (r^2 for
small residuals, linear beyond ~10%; see `robust_square`), minimised with Adam on the
unconstrained leaves of :class:`~mist.cost.params.CostParams`. Parameters of operator or
collective classes that have no rows keep their defaults (their gradients are masked), as do the
CPU-side and noise terms, which operator timings cannot inform.

The train/test split is by shape: a stable hash of a row's shape fields decides its side, so the
same shape (on any device, from any source) is never on both sides.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from ..cost.iteration import WIDE_HEAD_DIM
from ..cost.params import NUM_COMMS, NUM_OPS, CostParams, cpu_fields, default_params, save_params
from ..specs.catalog import get_hardware
from ..specs.hardware import Device
from .predict import Prepared, op_classes_present, predict, predict_prepared, prepare
from .stacks import (MIN_STACK_ROWS, default_stack, predict_stacked, rows_of_stacks, stacks_to_dict,
                     variant_stacks, with_class_of)

#: Columns that define a row's shape (everything a kernel's time depends on except the device).
SHAPE_COLUMNS: tuple[str, ...] = (
    "op", "m", "n", "k", "batch", "q_len", "kv_len", "num_heads", "num_kv_heads", "head_dim", "window",
    "num_tokens", "hidden", "inter", "num_experts", "top_k", "ep", "message_bytes", "num_devices",
    "num_nodes", "dtype", "w_dtype", "kv_dtype", "tp",
)
TEST_PERCENT = 20


#: ops whose rows are scored but never fitted: their form shares a parameter class with a
#: better-measured op (MLA with standard attention) and would drag it away
EVAL_ONLY_OPS: tuple[str, ...] = ("mla_prefill", "mla_decode")
#: collectives are fitted on the communication library's own timings (NCCL / RCCL / oneCCL
#: benchmarks) when a device has them; framework-level measurements (Vidur's torch.distributed
#: timings, vLLM's custom all-reduce) are different implementations and are scored only
COLLECTIVES: tuple[str, ...] = ("allreduce", "allgather", "reducescatter", "alltoall", "send_recv")
COLLECTIVE_LIBRARIES: tuple[str, ...] = ("nccl", "rccl", "oneccl")
#: the formats the simulator's defaults run in; fitted first when an op has rows in them
PRIMARY_DTYPES: tuple[str, ...] = ("bf16", "fp16")


def fit_rows_mask(table: pd.DataFrame) -> np.ndarray:
    """Rows that the fit uses (the rest are scored only).

    One parameter set per operator class cannot describe every kernel family at once, so per op
    the fit uses the rows in the primary formats (bf16/fp16 activations, weights and KV cache),
    falling back to plain fp8 (not block-scaled) and then to all rows when an op has none; MLA
    rows are never fitted (see EVAL_ONLY_OPS); collectives prefer the library benchmarks
    (see COLLECTIVE_LIBRARIES)."""
    n = len(table)
    op = table["op"].astype(object).to_numpy()
    def col(c):
        return table[c].astype(object).to_numpy() if c in table.columns else np.full(n, None, object)
    dt, wdt, kvdt, var = col("dtype"), col("w_dtype"), col("kv_dtype"), col("variant")
    def isin(a, vals):
        return np.array([(x is None or (isinstance(x, float) and np.isnan(x)) or x in vals) for x in a])
    prim = isin(dt, PRIMARY_DTYPES) & isin(wdt, PRIMARY_DTYPES) & isin(kvdt, PRIMARY_DTYPES)
    blk = np.array(["block" in str(v).lower() for v in var])
    fp8 = isin(dt, ("fp8",)) & isin(wdt, ("fp8",)) & ~blk
    fw = np.array([str(x).lower() for x in col("framework")])
    lib = np.array([f.startswith(COLLECTIVE_LIBRARIES) for f in fw])
    out = np.zeros(n, bool)
    for o in pd.unique(op):
        m = op == o
        if o in EVAL_ONLY_OPS:
            continue
        if o in COLLECTIVES and (m & lib).any():
            m = m & lib
        for cand in (prim, fp8, np.ones(n, bool)):
            if (m & cand).any():
                out |= m & cand
                break
    return out


def shape_hash(table: pd.DataFrame) -> np.ndarray:
    """A stable 64-bit hash of each row's shape fields (independent of row order, device, source)."""
    cols = [c for c in SHAPE_COLUMNS if c in table.columns]
    norm = pd.DataFrame(index=pd.RangeIndex(len(table)))
    for c in cols:
        v = table[c].reset_index(drop=True)
        if pd.api.types.is_numeric_dtype(v.dtype):
            norm[c] = v.astype("float64").round(6).fillna(-1.0)
        else:
            norm[c] = v.astype(object).where(v.notna(), "").astype(str)
    return pd.util.hash_pandas_object(norm, index=False).to_numpy(np.uint64)


def split_mask(table: pd.DataFrame, test_percent: int = TEST_PERCENT) -> np.ndarray:
    """True for test rows (about `test_percent`% of distinct shapes), deterministic."""
    h = shape_hash(table)
    # mix the bits once more so that the bucket does not depend on the low bits alone
    return ((h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) % np.uint64(100) < np.uint64(test_percent)


def split(table: pd.DataFrame, test_percent: int = TEST_PERCENT) -> tuple[pd.DataFrame, pd.DataFrame]:
    m = split_mask(table, test_percent)
    return table[~m].reset_index(drop=True), table[m].reset_index(drop=True)


# ---- metrics

def metrics(pred: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """Per op: count, MAPE and p90 absolute percentage error (in %), over rows with a prediction."""
    t = table["time_s"].to_numpy(np.float64)
    ok = np.isfinite(pred) & np.isfinite(t) & (t > 0)
    ape = np.abs(pred[ok] / t[ok] - 1.0) * 100.0
    d = pd.DataFrame({"op": table["op"].astype(object).to_numpy()[ok], "ape": ape})
    if not len(d):
        return pd.DataFrame(columns=["count", "mape", "p90_ape"]).rename_axis("op")
    g = d.groupby("op")["ape"]
    return pd.DataFrame({"count": g.size(), "mape": g.mean(), "p90_ape": g.quantile(0.9)})


def _metrics_dict(m: pd.DataFrame) -> dict:
    return {op: {"count": int(r["count"]), "mape": round(float(r["mape"]), 3), "p90_ape": round(float(r["p90_ape"]), 3)}
            for op, r in m.iterrows()}


# ---- loss and optimisation

#: scale (in log units, ~10%) of the robust loss: residuals well below it count squared, those far
#: above it about linearly, so that a few rows no smooth formula follows (kernels that stop
#: splitting work at extreme shapes, a pathological kernel) do not drag the fit of the bulk
ROBUST_SCALE = 0.1


def robust_square(r, scale=ROBUST_SCALE):
    """Soft-L1 (pseudo-Huber) penalty of a log residual: 2 c^2 (sqrt(1 + (r/c)^2) - 1); about r^2
    for |r| << c and 2 c |r| for |r| >> c."""
    return 2.0 * scale * scale * (jnp.sqrt(1.0 + (r / scale) ** 2) - 1.0)


def _loss_fn(params: CostParams, groups: dict, logt: dict, weights: dict):
    preds = predict_prepared(params, groups)
    tot, n = 0.0, 0.0
    for op, y in preds.items():
        r = jnp.log(jnp.maximum(y, 1e-30)) - logt[op]
        tot = tot + jnp.sum(weights[op] * robust_square(r))
        n = n + jnp.sum(weights[op])
    return tot / jnp.maximum(n, 1.0)


def gradient_mask(prep: Prepared, template: CostParams) -> CostParams:
    """1.0 on the leaves (and entries) the prepared rows inform, 0.0 elsewhere."""
    o, c = op_classes_present(prep)
    om = np.zeros(NUM_OPS, np.float32)
    om[list(o)] = 1.0
    cm = np.zeros(NUM_COMMS, np.float32)
    cm[list(c)] = 1.0
    z = jnp.zeros((), jnp.float32)
    mask = eqx.tree_at(
        lambda p: (p.compute_logit, p.memory_logit, p.log_m_half, p.log_overhead, p.log_sharpness, p.log_pair_width,
                   p.log_serial_bw, p.log_item_time, p.log_split_time, p.log_group_time, p.gqa_pack_logit,
                   p.log_block_half, p.log_width_time, p.log_seq_time, p.log_seq_half, p.log_item_wave,
                   p.log_narrow_tile,
                   p.comm_bw_logit, p.log_comm_latency_scale, p.log_comm_s_half, p.comm_beta_logit,
                   p.log_comm_group_exp, p.log_comm_overhead, p.log_cpu_iter, p.log_cpu_per_seq,
                   p.log_cpu_per_token, p.log_cpu_per_prompt, p.log_cpu_per_token_above, p.cpu_token_knee,
                   p.step_noise_sigma),
        template,
        (jnp.asarray(om), jnp.asarray(om), jnp.asarray(om), jnp.asarray(om), jnp.asarray(om), jnp.asarray(om),
         jnp.asarray(om), jnp.asarray(om), jnp.asarray(om), jnp.asarray(om), jnp.asarray(om),
         jnp.asarray(om), jnp.asarray(om), jnp.asarray(om), jnp.asarray(om), jnp.asarray(om),
         jnp.asarray(om),
         jnp.asarray(cm), jnp.asarray(cm), jnp.asarray(cm), jnp.asarray(cm), jnp.asarray(cm),
         jnp.asarray(cm), z, z, z, z, z, z, z),
    )
    return jax.tree_util.tree_map(lambda m, t: jnp.asarray(m, t.dtype), mask, template)


#: where a fit starts the serial bandwidths (B/s per thread block) of the unsplit decode and of a
#: GEMM tile's K loop: the defaults switch those floors off, and from there their gradients vanish;
#: the fit keeps them only where rows need them
SERIAL_BW_START = {"ATTN_DECODE": 25e9, "GEMM": 1e12}
#: where a fit starts the fixed time per work item (s; see CostParams.log_item_time), off by default
ITEM_TIME_START = {"ATTN_DECODE": 1e-8, "ATTN_PREFILL": 1e-8}
#: where a fit starts the time of a decode call's second kernel (s; see CostParams.log_split_time)
SPLIT_TIME_START = {"ATTN_DECODE": 3e-6, "ATTN_PREFILL": 3e-6, "GEMM": 1e-6}
#: where a fit starts the time of the GQA regrouped path (s; see CostParams.log_group_time)
GROUP_TIME_START = {"ATTN_DECODE": 1e-6, "ATTN_PREFILL": 1e-6}
#: where a fit starts the GQA packing exponent (see CostParams.gqa_pack_logit): half way, so that
#: the gradient of its logit does not vanish at full packing
GQA_PACK_START = {"ATTN_PREFILL": 0.5}
#: where a fit starts the half-efficiency thread blocks of prefill attention (see
#: CostParams.log_block_half), off by default
BLOCK_HALF_START = {"ATTN_PREFILL": 32.0}
#: where a fit starts the decode call's fixed time per element of head width (s; see
#: CostParams.log_width_time)
WIDTH_TIME_START = {"ATTN_DECODE": 2e-9}
#: where a fit starts the wide-head decode kernel's time per sequence (s) and its doubling batch
#: (see CostParams.log_seq_time): only for devices with rows of such heads (fit_start), else off
SEQ_TIME_START = {"ATTN_DECODE": 1e-6}
SEQ_HALF_START = {"ATTN_DECODE": 512.0}
#: where a fit starts the decode items of a first wave (see CostParams.log_item_wave)
ITEM_WAVE_START = {"ATTN_DECODE": 64.0, "ATTN_PREFILL": 64.0}


def fit_start(p: CostParams, prep: Prepared | None = None) -> CostParams:
    """The fit's starting point: `p` with the terms that are off by default switched on at a
    neutral value, so that Adam can move them (only for classes that `prep` has rows of, when
    given: the others keep their defaults, as the gradient mask leaves them)."""
    from ..cost.params import Op

    present = op_classes_present(prep)[0] if prep is not None else set(range(NUM_OPS))
    log = lambda x: jnp.log(jnp.float32(x))  # noqa: E731
    logit = lambda e: jnp.log(jnp.float32(e)) - jnp.log1p(-jnp.float32(e))  # noqa: E731
    # (field, start per operator class, how the field stores the value)
    starts = (("log_serial_bw", SERIAL_BW_START, log), ("log_item_time", ITEM_TIME_START, log),
              ("log_split_time", SPLIT_TIME_START, log), ("log_group_time", GROUP_TIME_START, log),
              ("gqa_pack_logit", GQA_PACK_START, logit), ("log_block_half", BLOCK_HALF_START, log),
              ("log_item_wave", ITEM_WAVE_START, log))
    # terms that only rows of several head widths, or of heads wider than FlashAttention-3's, can
    # tell apart from the fixed time per call: off unless such rows are there
    dims = _decode_head_dims(prep) if prep is not None else None
    if dims is None or len(dims) > 1:
        starts += (("log_width_time", WIDTH_TIME_START, log),)
    if dims is None or any(d > WIDE_HEAD_DIM for d in dims):
        starts += (("log_seq_time", SEQ_TIME_START, log), ("log_seq_half", SEQ_HALF_START, log))
    values = []
    for field, start, stored in starts:
        v = getattr(p, field)
        for name, x in start.items():
            if int(Op[name]) in present:
                v = v.at[int(Op[name])].set(stored(x))
        values.append(v)
    return eqx.tree_at(lambda q: tuple(getattr(q, f) for f, _, _ in starts), p, tuple(values))


def _decode_head_dims(prep: Prepared) -> set[float]:
    """The head widths of the prepared decode-attention rows (they decide which decode terms the
    rows can inform: CostParams.width_time needs several, seq_time heads wider than
    WIDE_HEAD_DIM)."""
    g = prep.groups.get("attn_decode")
    if g is None:
        return set()
    idx, a = g
    return {float(x) for x in np.unique(np.asarray(a["head_dim"])[: len(idx)])}


def _as_prep(groups: dict) -> Prepared:
    return Prepared(groups={op: (None, a) for op, a in groups.items()}, measured=None, n_rows=0)


def _loss_on(params, arrays, logt, weights):
    return _loss_fn(params, _as_prep(arrays), logt, weights)


def loss(params: CostParams, prep: Prepared, weights: dict | None = None):
    """The fitting loss of `params` on prepared rows (a jnp scalar; differentiable)."""
    arrays, logt, w = _loss_inputs(prep, balance=False)
    if weights is not None:
        w = weights
    return eqx.filter_jit(_loss_on)(params, arrays, logt, w)


def _loss_inputs(prep: Prepared, balance: bool):
    """Padded arrays, log measured times and row weights (0 on padding) per op."""
    arrays = {op: a for op, (_, a) in prep.groups.items()}
    n_all = sum(len(i) for i, _ in prep.groups.values())
    k = len(prep.groups)
    logt, w = {}, {}
    for op, (i, a) in prep.groups.items():
        size = next(iter(a.values())).shape[0]
        lt = np.zeros(size, np.float32)
        lt[: len(i)] = np.log(prep.measured[i])
        wt = np.zeros(size, np.float32)
        # balance: every op kind present counts equally (so that a kind with few rows, e.g.
        # reduce-scatter beside all-gathers sharing its parameters, is not drowned); mean weight 1
        wt[: len(i)] = n_all / (k * len(i)) if balance else 1.0
        logt[op], w[op] = jnp.asarray(lt), jnp.asarray(wt)
    return arrays, logt, w


def fit_prepared(params0: CostParams, prep: Prepared, *, steps: int = 600, lr: float = 0.05,
                 balance: bool = True) -> tuple[CostParams, list[float]]:
    """Adam on the log-space loss from `params0`; returns (fitted params, loss history)."""
    arrays, logt, weights = _loss_inputs(prep, balance)
    mask = gradient_mask(prep, params0)
    sched = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05)
    opt = optax.adam(sched)
    state = opt.init(params0)

    @eqx.filter_jit
    def run(p, s, arrays, logt, weights, mask, n_steps):
        def body(carry, _):
            p, s = carry
            val, g = eqx.filter_value_and_grad(_loss_on)(p, arrays, logt, weights)
            g = jax.tree_util.tree_map(lambda gi, mi: jnp.where(jnp.isfinite(gi), gi, 0.0) * mi, g, mask)
            upd, s = opt.update(g, s, p)
            p = eqx.apply_updates(p, upd)
            return (p, s), val
        (p, s), vals = jax.lax.scan(body, (p, s), None, length=n_steps)
        return p, s, vals

    p, state, hist = run(params0, state, arrays, logt, weights, mask, steps)
    return p, [float(v) for v in np.asarray(hist)]


@dataclass
class FitResult:
    device: str
    params: CostParams
    defaults: CostParams
    train: pd.DataFrame
    test: pd.DataFrame
    before: pd.DataFrame  # per-op test metrics with default parameters
    after: pd.DataFrame  # per-op test metrics with fitted parameters
    before_train: pd.DataFrame
    after_train: pd.DataFrame
    loss_history: list[float]
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # test metrics restricted to the kinds of rows the fit uses (primary formats, see fit_rows_mask)
    before_fitted: pd.DataFrame | None = None
    after_fitted: pd.DataFrame | None = None
    # GEMM parameters of the measuring stacks other than the default (mist.calibration.stacks),
    # with their training rows, and the default stack's name
    stacks: dict[str, CostParams] = field(default_factory=dict)
    stack_rows: dict[str, int] = field(default_factory=dict)
    default_stack: str | None = None

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """Predicted seconds per row of `table` with the fitted parameters (each row's stack's)."""
        return predict_stacked(self.params, self.stacks, get_hardware(self.device), table)

    def summary(self) -> pd.DataFrame:
        """Per op: train/test rows, test MAPE and p90 before and after fitting."""
        ops_ = sorted(set(self.before.index) | set(self.after.index) | set(self.after_train.index))
        rows = []
        for op in ops_:
            g = lambda m, c: float(m.loc[op, c]) if op in m.index else np.nan  # noqa: E731
            rows.append({"op": op, "train_rows": int(g(self.after_train, "count")) if op in self.after_train.index else 0,
                         "test_rows": int(g(self.after, "count")) if op in self.after.index else 0,
                         "mape_before": g(self.before, "mape"), "p90_before": g(self.before, "p90_ape"),
                         "mape_after": g(self.after, "mape"), "p90_after": g(self.after, "p90_ape"),
                         "fitted_test_rows": int(g(self.after_fitted, "count")) if self.after_fitted is not None
                         and op in self.after_fitted.index else 0,
                         "mape_after_fitted_kind": g(self.after_fitted, "mape") if self.after_fitted is not None
                         else np.nan})
        return pd.DataFrame(rows).set_index("op")

    def meta(self, sources: list[str] | None = None) -> dict:
        return {
            "origin": f"fitted on {self.device} operator measurements"
                      + (f" ({', '.join(sources)})" if sources else ""),
            "sources": sources or sorted(set(self.train["source"].dropna().astype(str))) if "source" in self.train else [],
            "date": _dt.date.today().isoformat(),
            "split": {"train_rows": int(len(self.train)), "test_rows": int(len(self.test)),
                      "rule": f"stable hash of shape fields, {TEST_PERCENT}% of shapes held out"},
            "metrics_test_before": _metrics_dict(self.before),
            "metrics_test_after": _metrics_dict(self.after),
            "metrics_test_after_fitted_kinds": _metrics_dict(self.after_fitted)
            if self.after_fitted is not None else {},
            "fitted_rows_rule": "per op: bf16/fp16 rows, else plain fp8, else all; MLA scored only; "
                                "collectives: NCCL/RCCL/oneCCL benchmark rows when present",
            "dropped_rows": self.dropped,
            "gemm_stacks": {"default": self.default_stack, "own_parameters": sorted(self.stacks),
                            "rule": "GEMM rows of another measuring stack with >= "
                                    f"{MIN_STACK_ROWS} training rows fit GEMM parameters of their own "
                                    "(params.stacks; mist.calibration.stacks)"},
        }

    def save(self, directory=None, sources: list[str] | None = None):
        """Write the parameter file. A CPU block fitted end to end (experiments/validate_e2e.py)
        that the file already has is kept: operator timings do not inform those terms."""
        from ..cost.params import params_dirs

        directory = directory or params_dirs()[0]
        cpu = own_cpu_block(self.device, directory)
        extra = {"stacks": stacks_to_dict(self.stacks, self.stack_rows)} if self.stacks else None
        return keep_cpu_block(save_params(self.params, self.device, self.meta(sources), directory, extra=extra), cpu)


def rows_of(table: pd.DataFrame, device_name: str) -> pd.DataFrame:
    """The rows of `table` measured on `device_name` (device spellings resolved through the
    catalog, so "B60" matches "Arc-Pro-B60"); all rows when the table has no device column."""
    if "device" not in table.columns:
        return table.reset_index(drop=True)
    target = get_hardware(device_name).name
    col = table["device"].astype(object)
    names = {}
    for d in pd.unique(col.dropna()):
        try:
            names[d] = get_hardware(str(d)).name
        except KeyError:
            names[d] = None
    return table[col.map(names) == target].reset_index(drop=True)


def fit(device_name: str | Device, table: pd.DataFrame, *, steps: int = 600, lr: float = 0.05, seed: int = 0,
        init: CostParams | None = None, test_percent: int = TEST_PERCENT, balance: bool = True,
        stacks: bool = True) -> FitResult:
    """Fit `device_name`'s cost parameters to the rows of `table` for that device.

    With `stacks` (the default), GEMM rows of a measuring stack other than the device's default
    (mist.calibration.stacks) fit GEMM parameters of their own and are predicted with them;
    stacks=False fits one parameter set to every row.

    `seed` is accepted for reproducibility of any future stochastic variant; the fit is
    deterministic (full-batch Adam from the defaults, or `init`)."""
    import time

    t0 = time.time()
    dev = get_hardware(device_name)
    tab = rows_of(table, dev.name)
    train, test = split(tab, test_percent)
    defaults = default_params("cpu" if dev.kind == "cpu" else "gpu")
    fit_tr = train[fit_rows_mask(train)].reset_index(drop=True)
    # GEMM rows of a measuring stack other than the device's newest fit that stack's own GEMM
    # parameters (mist.calibration.stacks), from the main fit, which the other rows make
    variants = variant_stacks(fit_tr) if stacks else []
    own = rows_of_stacks(fit_tr, variants)
    prep_tr = prepare(dev, fit_tr[~own].reset_index(drop=True))
    if not prep_tr.groups:
        raise ValueError(f"fit: no rows of {dev.name} that the cost model can predict "
                         f"(dropped: {prep_tr.dropped or 'none'})")
    p0 = init if init is not None else fit_start(defaults, prep_tr)
    params, hist = fit_prepared(p0, prep_tr, steps=steps, lr=lr, balance=balance)
    fitted_stacks, stack_rows = {}, {}
    for s in variants:
        rows_s = fit_tr[rows_of_stacks(fit_tr, [s])].reset_index(drop=True)
        own_p, _ = fit_prepared(params, prepare(dev, rows_s), steps=steps, lr=lr, balance=balance)
        # only the GEMM class is the stack's (as stored and loaded: stacks_to_dict/stacks_from_dict)
        fitted_stacks[s] = with_class_of(params, own_p)
        stack_rows[s] = len(rows_s)
    pr_te_0 = predict(defaults, dev, test, report=False)
    pr_te_1 = predict_stacked(params, fitted_stacks, dev, test)
    pr_tr_0 = predict(defaults, dev, train, report=False)
    pr_tr_1 = predict_stacked(params, fitted_stacks, dev, train)
    fm = fit_rows_mask(test)
    after_fitted = metrics(pr_te_1[fm], test[fm].reset_index(drop=True))
    before_fitted = metrics(pr_te_0[fm], test[fm].reset_index(drop=True))
    dropped = dict(prep_tr.dropped)
    for k, v in prepare(dev, test).dropped.items():
        dropped[k] = dropped.get(k, 0) + v
    return FitResult(device=dev.name, params=params, defaults=defaults, train=train, test=test,
                     before=metrics(pr_te_0, test), after=metrics(pr_te_1, test),
                     before_train=metrics(pr_tr_0, train), after_train=metrics(pr_tr_1, train),
                     loss_history=hist, dropped=dropped, seconds=time.time() - t0,
                     before_fitted=before_fitted, after_fitted=after_fitted, stacks=fitted_stacks,
                     stack_rows=stack_rows, default_stack=default_stack(fit_tr))


# ---- data for a device, whole-device calibration, transfer to unmeasured devices

def load_measurements(device_name: str | None = None, sources: list[str] | None = None) -> pd.DataFrame:
    """Measured rows for a device (all devices when None): the curated subset in traces/ops by
    default, or the named sources read from the shared measured-data folder."""
    from . import schema
    from .sources import load_curated, load_source

    if not sources:
        return load_curated(device_name)
    frames = [load_source(s) for s in sources]
    tab = schema.concat(frames)
    if device_name is not None:
        tab = rows_of(tab, device_name)
    return tab


def calibrate(device_name: str, table: pd.DataFrame | None = None, *, sources: list[str] | None = None,
              steps: int = 600, lr: float = 0.05, save: bool = True, directory=None) -> FitResult:
    """Fit one device from its measurements and (by default) write calibration/params/<device>.json."""
    dev = get_hardware(device_name)
    tab = load_measurements(dev.name, sources) if table is None else table
    res = fit(dev, tab, steps=steps, lr=lr)
    if save:
        srcs = sorted(set(res.train["source"].dropna().astype(str)) | set(res.test["source"].dropna().astype(str)))
        fws = sorted(set(tab["framework"].dropna().astype(str))) if "framework" in tab.columns else []
        meta_sources = [f"{s}" for s in srcs] + ([f"frameworks: {', '.join(fws)}"] if fws else [])
        res.save(directory, meta_sources)
    return res


def _origin(d: dict) -> str:
    return str(d.get("origin", ""))


def measured_devices(directory=None) -> list[str]:
    """Devices whose parameter file was fitted on measurements (not transferred)."""
    import json

    from ..cost.params import params_dirs

    d = directory or params_dirs()[0]
    out = []
    for p in sorted(d.glob("*.json")) if d.exists() else []:
        try:
            if _origin(json.loads(p.read_text())).startswith("fitted"):
                out.append(p.stem)
        except ValueError:
            continue
    return out


def closest_measured(device_name: str, candidates: list[str]) -> tuple[str, str]:
    """The measured device a device without measurements borrows its efficiencies from, and why.

    Preference: same vendor and kind, then any GPU; among those the one closest in the
    ratio of peak bf16 FLOP/s to memory bandwidth (which decides where kernels sit on the
    roofline) and in scale (log peak FLOP/s)."""
    dev = get_hardware(device_name)
    cands = [get_hardware(c) for c in candidates if c != dev.name]
    if not cands:
        raise ValueError("no measured devices to transfer from (fit some first: `mist calibrate --hardware ...`)")
    same = [c for c in cands if c.vendor == dev.vendor and c.kind == dev.kind]
    gpus = [c for c in cands if c.kind == "gpu"]
    pool, why = (same, f"same vendor ({dev.vendor}) and kind ({dev.kind})") if same else \
        (gpus or cands, "no measured device of the same vendor and kind; nearest GPU")

    def feat(d):
        return np.array([np.log(d.flops("bf16") / d.mem_bandwidth), 0.5 * np.log(d.flops("bf16"))])

    f0 = feat(dev)
    best = min(pool, key=lambda c: (float(np.sum((feat(c) - f0) ** 2)), c.name))
    return best.name, why


#: what a transfer to a device kind other than a GPU does not capture
KIND_CAVEATS: dict[str, str] = {
    "cpu": "GPU kernel efficiencies applied to a CPU: CPU matmul and attention reach a smaller fraction "
           "of peak (AMX/AVX-512) and pay more per kernel; treat predictions as optimistic",
    "tpu": "GPU kernel efficiencies applied to a TPU: XLA fusion, systolic-array tiling (128/256) and "
           "ICI collectives differ; treat as a rough guide",
    "asic": "GPU kernel efficiencies applied to an ASIC: dataflow / SRAM-resident designs can behave "
            "very differently from a GPU roofline; treat as a rough guide",
    "accelerator": "GPU kernel efficiencies applied to a non-GPU accelerator; treat as a rough guide",
}


def transfer_params(device_name: str, source: str | None = None, *, directory=None, save: bool = True):
    """Parameters for a device without measurements: copy the efficiencies of the closest
    measured device class and write calibration/params/<device>.json marked as uncalibrated.
    Returns (params, meta)."""
    from ..cost.params import load_params, params_dirs

    dev = get_hardware(device_name)
    directory = directory or params_dirs()[0]
    if source is None:
        source, why = closest_measured(dev.name, measured_devices(directory))
    else:
        why = "chosen by the caller"
    p = directory / f"{source}.json"
    if p.exists():
        import json

        params = CostParams.from_dict(json.loads(p.read_text())["params"], str(p))
    else:
        params, _ = load_params(source)
    # CPU-side engine terms: operator timings never inform them, and the source's may be fitted end
    # to end to its own serving stack, so never copy them: this device's own end-to-end fit when its
    # file has one (experiments/validate_e2e.py writes it), else this kind's defaults
    own_cpu = own_cpu_block(dev.name, directory)
    params = with_cpu_block(params, own_cpu, "cpu" if dev.kind == "cpu" else "gpu")
    meta = {
        "origin": f"transferred from {source} (uncalibrated)",
        "transferred_from": source,
        "reason": why,
        "caveat": KIND_CAVEATS.get(dev.kind, "kernel efficiencies of a different GPU; peak rates, "
                                              "bandwidths and links are this device's own"),
        "date": _dt.date.today().isoformat(),
    }
    if save:
        keep_cpu_block(save_params(params, dev.name, meta, directory), own_cpu)
    return params, meta


def own_cpu_block(device_name: str, directory) -> dict | None:
    """The "cpu" block of `device_name`'s parameter file in `directory` when it was fitted end to
    end (experiments/validate_e2e.py: an e2e origin or serving-stack variants), else None."""
    import json

    own = directory / f"{device_name}.json"
    if not own.exists():
        return None
    c = json.loads(own.read_text()).get("params", {}).get("cpu", {})
    return c if str(c.get("origin", "")).startswith("e2e-fitted") or "variants" in c else None


def with_cpu_block(params: CostParams, cpu: dict | None, kind: str = "gpu") -> CostParams:
    """`params` with the CPU-side terms of a "cpu" block (this kind's defaults when None)."""
    if cpu is not None:  # the default block's terms (a block has no per-worker time: tp stays 1)
        return dataclasses.replace(params, **cpu_fields(cpu, "parameter file", "cpu"))
    d = default_params(kind)
    return eqx.tree_at(lambda q: (q.log_cpu_iter, q.log_cpu_per_seq, q.log_cpu_per_token, q.log_cpu_per_prompt,
                                  q.log_cpu_per_token_above, q.cpu_token_knee), params,
                       (d.log_cpu_iter, d.log_cpu_per_seq, d.log_cpu_per_token, d.log_cpu_per_prompt,
                        d.log_cpu_per_token_above, d.cpu_token_knee))


def keep_cpu_block(path, cpu: dict | None):
    """Write an end-to-end fitted "cpu" block back into a parameter file as it was (its origin and
    serving-stack variants), after the file was rewritten; nothing when None."""
    import json

    if cpu is None:
        return path
    j = json.loads(path.read_text())
    j["params"]["cpu"] = cpu
    path.write_text(json.dumps(j, indent=2) + "\n")
    return path


def transfer_validation(source: str, target: str, table: pd.DataFrame | None = None, *, directory=None,
                        params: CostParams | None = None) -> pd.DataFrame:
    """How well `source`'s fitted efficiencies predict `target`'s measurements on `target`'s
    own spec (the situation of every uncalibrated device). Per op: count, MAPE, p90 with
    the defaults, with the transferred parameters, and (when fitted) with the target's own
    parameters, all on the target's held-out test shapes."""
    import json

    from ..cost.params import params_dirs

    directory = directory or params_dirs()[0]
    tgt = get_hardware(target)
    tab = load_measurements(tgt.name) if table is None else table
    tab = rows_of(tab, tgt.name)
    _, test = split(tab)
    if params is None:
        params = CostParams.from_dict(json.loads((directory / f"{source}.json").read_text())["params"])
    d = default_params("gpu")
    m0 = metrics(predict(d, tgt, test, report=False), test)
    m1 = metrics(predict(params, tgt, test, report=False), test)
    out = pd.DataFrame({"count": m1["count"], "mape_default": m0["mape"], "p90_default": m0["p90_ape"],
                        "mape_transfer": m1["mape"], "p90_transfer": m1["p90_ape"]})
    fm = fit_rows_mask(test)
    tf = test[fm].reset_index(drop=True)
    mf = metrics(predict(params, tgt, tf, report=False), tf)
    out["count_fitted_kind"] = mf["count"]
    out["mape_transfer_fitted_kind"] = mf["mape"]
    own = directory / f"{tgt.name}.json"
    if own.exists() and _origin(json.loads(own.read_text())).startswith("fitted"):
        po = CostParams.from_dict(json.loads(own.read_text())["params"])
        m2 = metrics(predict(po, tgt, test, report=False), test)
        out["mape_own_fit"] = m2["mape"]
        out["p90_own_fit"] = m2["p90_ape"]
        out["mape_own_fit_fitted_kind"] = metrics(predict(po, tgt, tf, report=False), tf)["mape"]
    return out
