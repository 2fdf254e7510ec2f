"""`mist.estimate`: latency, KV capacity and memory of one replica for a uniform batch (no queueing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .cost.iteration import MixedBatch, iteration_breakdown
from .cost.memory import plan_memory
from .cost.params import load_params
from .cost.replica import lower_replica
from .specs.catalog import get_hardware, get_model
from .specs.errors import SpecError
from .specs.model import Precision


@jax.jit
def _prefill_parts(params, rep, batch_size, input_len):
    # `batch_size` identical prompts in a fixed-capacity batch: one compiled program for every size
    rows = jnp.arange(512.0)
    b = MixedBatch(prefill_tokens=jnp.where(rows < batch_size, input_len * 1.0, 0.0),
                   prefill_context=jnp.zeros((512,)), prefill_last=rows < batch_size,
                   prefill_mask=rows < batch_size, decode_context=jnp.zeros((1,)),
                   decode_mask=jnp.zeros((1,), bool))
    return iteration_breakdown(params, rep, b)


@jax.jit
def _decode_steps(params, rep, batch_size, input_len, steps):
    rows = jnp.arange(512.0)

    def one(ctx):
        b = MixedBatch(prefill_tokens=jnp.zeros((1,)), prefill_context=jnp.zeros((1,)),
                       prefill_last=jnp.zeros((1,), bool), prefill_mask=jnp.zeros((1,), bool),
                       decode_context=jnp.where(rows < batch_size, ctx, 0.0), decode_mask=rows < batch_size)
        return iteration_breakdown(params, rep, b)

    return jax.vmap(one)(input_len + steps)


MAX_BATCH = 512


def estimate(model: str = "llama-3.1-8b", hardware: str = "h100", tp: int = 1, pp: int = 1, ep: int = 1,
             dtype: str | None = None, kv_cache_dtype: str | None = None, batch: int = 1, input: int = 2048,
             output: int = 128, params=None, memory_utilization: float = 0.9) -> dict:
    """Prefill time, per-token decode time, end-to-end latency, KV capacity and memory breakdown for
    `batch` identical requests of `input` prompt and `output` generated tokens, served together."""
    m = get_model(model)
    d = get_hardware(hardware)
    for name, v, lo in (("batch", batch, 1), ("input", input, 1), ("output", output, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise SpecError("<arguments>", name, f"must be an integer >= {lo}, got {v!r}", f"pass --{name} {max(lo, 1)}")
    if batch > MAX_BATCH:
        raise SpecError("<arguments>", "batch", f"{batch} > {MAX_BATCH}", f"use at most {MAX_BATCH} (or `mist bench`)")
    dp = m.default_precision
    prec = Precision(weight=dtype or dp.weight, kv=kv_cache_dtype or dp.kv, act=dp.act,
                     expert_weight=dtype or dp.expert_weight)
    rep = lower_replica(m, d, prec, tp=tp, pp=pp, ep=ep)
    plan = plan_memory(m, d, prec, tp=tp, pp=pp, ep=ep, max_num_batched_tokens=max(batch * input, 2048),
                       max_num_seqs=batch, memory_utilization=memory_utilization)
    if params is None:
        params, origin = load_params(d.name, d.kind)
    else:
        origin = "given"
    pre = {k: float(v) for k, v in _prefill_parts(params, rep, batch, input).items()}
    prefill_s = sum(pre.values())
    n_dec = output - 1
    if n_dec > 0 and m.kind == "decoder":
        steps = jnp.arange(n_dec, dtype=jnp.float32)
        dparts = _decode_steps(params, rep, batch, input * 1.0, steps)
        dtot = np.asarray(sum(dparts.values()))
        decode_per_tok = float(dtot.mean())
        decode_total = float(dtot.sum())
        dec_break = {k: float(np.asarray(v).mean()) * 1e3 for k, v in dparts.items()}
    else:
        decode_per_tok = decode_total = 0.0
        dec_break = {}
    e2e = prefill_s + decode_total
    kv_needed = batch * (input + output)
    return {
        "model": m.name, "hardware": d.name, "tp": tp, "pp": pp, "ep": ep,
        "dtype": prec.weight, "kv_cache_dtype": prec.kv, "batch": batch, "input": input, "output": output,
        "prefill_ms": prefill_s * 1e3,
        "decode_ms_per_token": decode_per_tok * 1e3,
        "e2e_ms": e2e * 1e3,
        "output_tokens_per_s": batch * output / e2e if e2e > 0 else 0.0,
        "kv_capacity_tokens": plan.kv_capacity_tokens,
        "kv_fits_batch": plan.kv_capacity_tokens >= kv_needed,
        "memory_gb": {"weights": plan.weights / 1e9, "activations": plan.activations / 1e9,
                      "runtime": plan.runtime / 1e9, "kv_cache": plan.kv_budget / 1e9,
                      "usable": plan.usable / 1e9, "capacity": plan.capacity / 1e9},
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "prefill_breakdown_ms": {k: v * 1e3 for k, v in pre.items()},
        "decode_breakdown_ms": dec_break,
        "cost_params": origin,
    }
