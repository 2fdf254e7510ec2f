"""Memory check of a replica: weights + activations + runtime reserve + KV cache per device.

Plain Python (no JAX): it runs once per deployment, at lowering time. A deployment that cannot
fit raises `DoesNotFit`, whose message names what does not fit and the knobs that would help.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..specs.dtypes import nbytes
from ..specs.errors import SpecError
from ..specs.hardware import Device
from ..specs.model import ModelSpec, Precision

#: bytes reserved per device for the runtime (CUDA/HIP context, graphs, allocator slack)
RUNTIME_RESERVE = {"gpu": 1.5e9, "tpu": 1.0e9, "accelerator": 1.0e9, "asic": 0.0, "cpu": 2.0e9}


class DoesNotFit(SpecError):
    """A deployment whose weights, activations and minimum KV cache exceed device memory."""


@dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory use of one replica (bytes) and the resulting KV capacity."""

    capacity: float
    usable: float  # capacity x memory utilisation
    weights: float
    activations: float
    runtime: float
    kv_budget: float
    kv_bytes_per_token: float  # per device
    kv_capacity_tokens: int  # tokens of KV the replica can hold
    devices: int

    def as_gb(self) -> dict:
        d = {k: v / 1e9 for k, v in asdict(self).items()
             if k not in ("kv_bytes_per_token", "kv_capacity_tokens", "devices")}
        return {**d, "kv_bytes_per_token": self.kv_bytes_per_token, "kv_capacity_tokens": self.kv_capacity_tokens,
                "devices": self.devices}


def weight_bytes_per_device(model: ModelSpec, prec: Precision, tp: int, pp: int) -> float:
    pc = model.param_counts()
    return (pc["non_expert"] * nbytes(prec.weight) + pc["experts"] * nbytes(prec.expert_weight)) / (tp * pp)


def kv_bytes_per_token_per_device(model: ModelSpec, prec: Precision, tp: int, pp: int) -> float:
    if model.kind != "decoder":
        return 0.0
    layers = model.num_layers / pp
    if model.is_mla:
        per_layer = model.kv_elements_per_token_per_layer  # the latent is replicated on every TP rank
    else:
        per_layer = 2 * max(model.num_kv_heads / tp, 1.0) * model.head_dim
    return per_layer * layers * nbytes(prec.kv)


def plan_memory(model: ModelSpec, device: Device, precision: Precision | None = None, tp: int = 1, pp: int = 1,
                ep: int = 1, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                memory_utilization: float = 0.9, min_kv_tokens: int = 0) -> MemoryPlan:
    """Plan device memory; raise DoesNotFit when weights and activations leave no room for KV
    (or less than `min_kv_tokens`, e.g. one request of the longest context served)."""
    prec = precision or model.default_precision
    if not 0 < memory_utilization <= 1:
        raise SpecError("<deployment>", "memory_utilization", f"{memory_utilization} is not in (0, 1]",
                        "use e.g. 0.9 (vLLM's --gpu-memory-utilization)")
    cap = device.mem_capacity
    usable = cap * memory_utilization
    w = weight_bytes_per_device(model, prec, tp, pp)
    ab = nbytes(prec.act)
    widest = max(model.intermediate * (2 if model.gated_mlp else 1),
                 model.moe_intermediate * (2 if model.gated_mlp else 1) * max(model.top_k, 1),
                 (model.num_heads + 2 * model.num_kv_heads) * model.head_dim)
    act = max_num_batched_tokens * (4 * model.hidden + widest / tp) * ab
    if model.kind == "decoder":
        act += max_num_seqs * model.vocab / tp * 4.0  # fp32 logits of one step
    runtime = RUNTIME_RESERVE.get(device.kind, 1e9)
    budget = usable - w - act - runtime
    kv_tok = kv_bytes_per_token_per_device(model, prec, tp, pp)
    kv_cap = int(budget // kv_tok) if kv_tok > 0 and budget > 0 else (0 if kv_tok > 0 else 1 << 40)
    plan = MemoryPlan(capacity=cap, usable=usable, weights=w, activations=act, runtime=runtime,
                      kv_budget=max(budget, 0.0), kv_bytes_per_token=kv_tok, kv_capacity_tokens=kv_cap,
                      devices=tp * pp)
    where = f"{model.name} on {device.name} (tp={tp}, pp={pp})"
    if budget <= 0:
        raise DoesNotFit(where, "memory",
                         f"weights {w / 1e9:.1f} GB + activations {act / 1e9:.1f} GB + runtime {runtime / 1e9:.1f} GB "
                         f"per device exceed {usable / 1e9:.1f} GB usable of {cap / 1e9:.1f} GB",
                         "raise tp or pp, use a smaller weight dtype (--dtype fp8), lower "
                         "--max-num-batched-tokens, or pick a device with more memory")
    if kv_tok > 0 and kv_cap < min_kv_tokens:
        raise DoesNotFit(where, "kv_cache",
                         f"room for {kv_cap} KV tokens, fewer than the {min_kv_tokens} one request needs",
                         "raise tp or pp, use --kv-cache-dtype fp8, or shorten the maximum context")
    return plan
