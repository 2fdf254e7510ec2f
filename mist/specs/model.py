"""Model specs built from a Hugging Face `config.json` (a local file; never a hub download).

Covers dense decoders (MHA/GQA), mixture-of-experts (routed + shared experts, dense leading
layers), multi-head latent attention (DeepSeek MLA), sliding-window layers, tied embeddings and
bidirectional encoders (embedders and cross-encoder rerankers). Numeric formats for weights, KV
cache and activations are separate settings (see `Precision`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .dtypes import canonical, nbytes
from .errors import SpecError

MODEL_KINDS = ("decoder", "embedder", "reranker")
_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra",
                  "nomic_bert", "new", "modernbert")


@dataclass(frozen=True)
class Precision:
    """Numeric formats of weights, KV cache and activations (canonical names, see dtypes)."""

    weight: str = "bf16"
    kv: str = "bf16"
    act: str = "bf16"
    #: format of routed-expert weights (MoE), defaults to `weight` when empty
    expert_weight: str = ""

    def __post_init__(self):
        object.__setattr__(self, "weight", canonical(self.weight, field="weight dtype (--dtype)"))
        object.__setattr__(self, "kv", canonical(self.kv, field="kv dtype (--kv-cache-dtype)"))
        object.__setattr__(self, "act", canonical(self.act, field="activation dtype"))
        ew = self.expert_weight or self.weight
        object.__setattr__(self, "expert_weight", canonical(ew, field="expert weight dtype"))


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one model, in the quantities the cost model needs."""

    name: str
    hf_id: str
    kind: str  # decoder | embedder | reranker
    architecture: str
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width
    vocab: int
    max_context: int
    tied_embeddings: bool
    gated_mlp: bool  # SwiGLU-style (gate, up, down) vs two-matrix MLP
    causal: bool
    # mixture of experts (num_experts == 0 means dense)
    num_experts: int = 0
    top_k: int = 0
    num_shared_experts: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    num_dense_layers: int = 0  # leading layers with a dense MLP (DeepSeek first_k_dense_replace)
    # multi-head latent attention (kv_lora_rank == 0 means none)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # sliding window attention
    sliding_window: int = 0  # tokens; 0 = none
    num_sliding_layers: int = 0
    default_precision: Precision = Precision()
    aliases: tuple[str, ...] = ()
    source: str = ""
    path: str = ""

    # ---------------- structure
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    # ---------------- parameter counts (elements)
    @property
    def attn_params_per_layer(self) -> int:
        h = self.hidden
        if self.is_mla:
            qk = self.qk_nope_dim + self.qk_rope_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk) if self.q_lora_rank \
                else h * self.num_heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_dim) + \
                self.kv_lora_rank * self.num_heads * (self.qk_nope_dim + self.v_head_dim)
            o = self.num_heads * self.v_head_dim * h
            return q + kv + o
        return h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + \
            self.num_heads * self.head_dim * h

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    @property
    def dense_mlp_params(self) -> int:
        return self.mlp_matrices * self.hidden * self.intermediate

    @property
    def expert_params(self) -> int:
        """Elements of one routed expert."""
        return self.mlp_matrices * self.hidden * self.moe_intermediate

    @property
    def shared_expert_params(self) -> int:
        return self.num_shared_experts * self.mlp_matrices * self.hidden * self.shared_intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        """LM head elements stored separately (0 when tied to the embedding or for encoders)."""
        if self.kind != "decoder" or self.tied_embeddings:
            return 0
        return self.vocab * self.hidden

    def param_counts(self) -> dict[str, int]:
        """Element counts: non-expert weights, routed-expert weights, total, active per token."""
        attn = self.attn_params_per_layer * self.num_layers
        dense = self.dense_mlp_params * (self.num_dense_layers if self.is_moe else self.num_layers)
        router = self.hidden * self.num_experts * self.num_moe_layers
        shared = self.shared_expert_params * self.num_moe_layers
        experts = self.expert_params * self.num_experts * self.num_moe_layers
        norms = 2 * self.hidden * self.num_layers + self.hidden
        embed = self.embedding_params + self.lm_head_params
        non_expert = attn + dense + router + shared + norms + embed
        active = non_expert + self.expert_params * self.top_k * self.num_moe_layers
        return {"non_expert": non_expert, "experts": experts, "total": non_expert + experts,
                "active": active}

    # ---------------- KV cache
    @property
    def kv_elements_per_token_per_layer(self) -> int:
        """KV-cache elements one token adds in one layer (K and V, or MLA's latent + rope key)."""
        if self.kind != "decoder":
            return 0
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_dtype: str | None = None) -> float:
        """KV-cache bytes per token summed over all layers."""
        d = kv_dtype or self.default_precision.kv
        return self.kv_elements_per_token_per_layer * self.num_layers * nbytes(d)

    def with_precision(self, precision: Precision) -> "ModelSpec":
        return replace(self, default_precision=precision)

    def summary(self) -> dict[str, Any]:
        pc = self.param_counts()
        return {
            "name": self.name,
            "vendor": self.hf_id.split("/")[0] if "/" in self.hf_id else "",
            "hf_id": self.hf_id,
            "kind": self.kind,
            "params_b": pc["total"] / 1e9,
            "active_params_b": pc["active"] / 1e9,
            "layers": self.num_layers,
            "hidden": self.hidden,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "mla": self.is_mla,
            "sliding_window": self.sliding_window,
            "max_context": self.max_context,
            "weight_dtype": self.default_precision.weight,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
        }


def _get(cfg: dict, where: str, *keys: str, default: Any = ..., integer: bool = True) -> Any:
    for k in keys:
        if k in cfg and cfg[k] is not None:
            v = cfg[k]
            if integer:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 0:
                    raise SpecError(where, k, f"expected a non-negative integer, got {v!r}",
                                    "fix the value in config.json")
                return int(v)
            return v
    if default is ...:
        raise SpecError(where, keys[0], "missing", f"config.json needs '{keys[0]}'")
    return default


def _quant_dtype(cfg: dict) -> tuple[str, str]:
    """Default (weight, expert weight) formats from torch_dtype and quantization_config."""
    base = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    try:
        base = canonical(base)
    except SpecError:
        base = "bf16"
    if base == "fp32":
        base = "bf16"  # serving runs fp32 checkpoints in half precision
    q = cfg.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8", "compressed-tensors") and "fp8" in json.dumps(q).lower() \
            or method == "fp8":
        return "fp8", "fp8"
    if method == "mxfp4":
        return base, "mxfp4"  # gpt-oss: MoE expert weights in MXFP4, the rest bf16
    if method in ("awq", "gptq"):
        return "int4", "int4"
    return base, base


def parse_hf_config(cfg: dict, where: str = "<config.json>", name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from the contents of a Hugging Face config.json."""
    meta = cfg.get("_mist", {})
    model_type = str(cfg.get("model_type", "")).lower()
    archs = cfg.get("architectures") or [model_type or "unknown"]
    arch = str(archs[0])
    # some multimodal / wrapper configs nest the language model
    if "text_config" in cfg and "hidden_size" not in cfg:
        inner = dict(cfg["text_config"])
        inner.setdefault("architectures", archs)
        inner["_mist"] = meta
        return parse_hf_config(inner, where, name)

    kind = meta.get("kind")
    if kind is None:
        if "SequenceClassification" in arch and model_type in _ENCODER_TYPES:
            kind = "reranker"
        elif model_type in _ENCODER_TYPES:
            kind = "embedder"
        else:
            kind = "decoder"
    if kind not in MODEL_KINDS:
        raise SpecError(where, "_mist.kind", f"unknown kind '{kind}'", f"use one of {', '.join(MODEL_KINDS)}")

    hidden = _get(cfg, where, "hidden_size", "d_model", "n_embd")
    layers = _get(cfg, where, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, where, "num_attention_heads", "n_head")
    kv_heads = _get(cfg, where, "num_key_value_heads", "num_kv_heads", default=heads)
    if heads == 0 or hidden == 0 or layers == 0:
        raise SpecError(where, "hidden_size/num_hidden_layers/num_attention_heads", "must be > 0",
                        "fix config.json")
    if kv_heads == 0 or heads % kv_heads:
        raise SpecError(where, "num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}",
                        "set num_key_value_heads to a divisor of num_attention_heads")
    head_dim = _get(cfg, where, "head_dim", default=hidden // heads)
    inter = _get(cfg, where, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    vocab = _get(cfg, where, "vocab_size")
    max_ctx = _get(cfg, where, "max_position_embeddings", "n_positions", "seq_length", default=4096)
    act = str(cfg.get("hidden_act", cfg.get("activation_function", "silu"))).lower()
    gated = kind == "decoder" and (
        act in ("silu", "swiglu", "swish", "gelu_pytorch_tanh")
        or model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe",
                          "deepseek_v3", "deepseek_v2", "gpt_oss", "gemma", "gemma2", "gemma3"))
    tied = bool(cfg.get("tie_word_embeddings", kind != "decoder"))

    # --- MoE
    n_exp = _get(cfg, where, "n_routed_experts", "num_local_experts", "num_experts", default=0)
    top_k = _get(cfg, where, "num_experts_per_tok", "num_experts_per_token", "moe_top_k", default=0)
    if n_exp and not top_k:
        raise SpecError(where, "num_experts_per_tok", "MoE model without top-k", "add num_experts_per_tok")
    if top_k > n_exp > 0:
        raise SpecError(where, "num_experts_per_tok", f"top-k {top_k} > experts {n_exp}", "fix the MoE fields")
    moe_inter = _get(cfg, where, "moe_intermediate_size", default=inter) if n_exp else 0
    n_shared = _get(cfg, where, "n_shared_experts", default=0)
    if n_shared == 0 and cfg.get("shared_expert_intermediate_size"):
        n_shared = 1
    shared_inter = _get(cfg, where, "shared_expert_intermediate_size", default=moe_inter) if n_shared else 0
    n_dense = _get(cfg, where, "first_k_dense_replace", default=0) if n_exp else 0
    if n_exp and cfg.get("mlp_only_layers"):
        n_dense = len(cfg["mlp_only_layers"])

    # --- MLA
    kv_lora = _get(cfg, where, "kv_lora_rank", default=0)
    q_lora = _get(cfg, where, "q_lora_rank", default=0) if kv_lora else 0
    nope = _get(cfg, where, "qk_nope_head_dim", default=0) if kv_lora else 0
    rope = _get(cfg, where, "qk_rope_head_dim", default=0) if kv_lora else 0
    vdim = _get(cfg, where, "v_head_dim", default=head_dim) if kv_lora else 0
    if kv_lora:
        head_dim = nope + rope

    # --- sliding window
    sw = cfg.get("sliding_window") or 0
    use_sw = cfg.get("use_sliding_window", True)
    n_sw = 0
    if sw and use_sw is not False:
        lt = cfg.get("layer_types")
        if isinstance(lt, list) and lt:
            n_sw = sum(1 for t in lt if "sliding" in str(t))
        else:
            max_window_layers = cfg.get("max_window_layers")
            n_sw = layers if max_window_layers is None else max(0, layers - int(max_window_layers)) \
                if model_type.startswith("qwen") else layers
        if n_sw == 0:
            sw = 0
    elif sw and use_sw is False:
        sw = 0

    wd, ewd = _quant_dtype(cfg)
    spec = ModelSpec(
        name=name or meta.get("name") or cfg.get("_name_or_path") or arch,
        hf_id=meta.get("hf_id", cfg.get("_name_or_path", "")),
        kind=kind,
        architecture=arch,
        hidden=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads if not kv_lora else heads,
        head_dim=head_dim, intermediate=inter, vocab=vocab, max_context=max_ctx,
        tied_embeddings=tied, gated_mlp=gated, causal=kind == "decoder",
        num_experts=n_exp, top_k=top_k, num_shared_experts=n_shared, moe_intermediate=moe_inter,
        shared_intermediate=shared_inter, num_dense_layers=n_dense,
        q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_dim=nope, qk_rope_dim=rope, v_head_dim=vdim,
        sliding_window=int(sw), num_sliding_layers=n_sw if sw else 0,
        default_precision=Precision(weight=wd, kv="bf16" if wd in ("int4", "fp4") else "bf16", act="bf16",
                                    expert_weight=ewd),
        aliases=tuple(a.lower() for a in meta.get("aliases", [])),
        source=meta.get("source", ""),
        path=where,
    )
    return spec


def load_model_file(path: str | Path, name: str | None = None) -> ModelSpec:
    """Load a model spec from a Hugging Face config.json on disk."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise SpecError(str(p), "<file>", "file does not exist", "give the path of a config.json")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(str(p), "<syntax>", f"not valid JSON: {e}", "fix the file") from None
    if not isinstance(cfg, dict):
        raise SpecError(str(p), "<file>", "top level is not an object", "use a Hugging Face config.json")
    return parse_hf_config(cfg, str(p), name)
