"""The model catalog: every mist/catalog/models/*.json is a Hugging Face config.json plus a
`_mist` block; aliases are unique; the required models are present; spot checks of values."""

import json
import re
from pathlib import Path

import pytest

CATALOG = Path(__file__).resolve().parent.parent / "mist" / "catalog" / "models"
FILES = sorted(CATALOG.glob("*.json"))
KINDS = {"decoder", "embedder", "reranker"}

# Required models, looked up by name or alias (case-insensitive).
REQUIRED = [
    "Llama-2-7B", "Llama-2-70B", "Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.1-405B",
    "Mistral-7B", "Mixtral-8x7B", "Qwen2.5-7B", "Qwen2.5-72B", "Qwen3-32B", "Qwen3-235B-A22B",
    "DeepSeek-V3", "DeepSeek-R1", "gpt-oss-120b", "bge-large-en-v1.5", "bge-reranker-base",
]


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def catalog():
    return {p.stem: _load(p) for p in FILES}


def _by_key(catalog):
    index = {}
    for cfg in catalog.values():
        m = cfg["_mist"]
        for key in [m["name"].lower(), *m["aliases"]]:
            index[key] = cfg
    return index


def test_catalog_is_not_empty():
    assert len(FILES) >= 16


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_file_parses_and_has_mist_block(path):
    cfg = _load(path)
    assert isinstance(cfg, dict)
    m = cfg["_mist"]
    assert set(m) >= {"name", "hf_id", "kind", "aliases", "source"}
    assert isinstance(m["name"], str) and m["name"]
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", m["hf_id"])
    assert m["kind"] in KINDS
    assert isinstance(m["aliases"], list) and m["aliases"]
    assert all(isinstance(a, str) and a == a.lower() and a.strip() == a for a in m["aliases"])
    assert m["hf_id"].lower() in m["aliases"]
    assert m["source"] == f"https://huggingface.co/{m['hf_id']}/blob/main/config.json"
    # A config.json, not a summary of one.
    assert isinstance(cfg["architectures"], list) and cfg["architectures"]
    assert isinstance(cfg["model_type"], str)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                  "max_position_embeddings", "intermediate_size"):
        assert isinstance(cfg[field], int) and cfg[field] > 0, field
    # "_mist" is the only key added.
    assert [k for k in cfg if k.startswith("_") and k != "_name_or_path"] == ["_mist"]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_kind_matches_architecture(path):
    cfg = _load(path)
    arch, kind = cfg["architectures"][0], cfg["_mist"]["kind"]
    if kind == "decoder":
        assert arch.endswith("ForCausalLM")
    elif kind == "reranker":
        assert arch.endswith("ForSequenceClassification")
    else:
        assert arch.endswith("Model")


def test_aliases_and_names_unique(catalog):
    seen = {}
    for stem, cfg in catalog.items():
        m = cfg["_mist"]
        keys = set(m["aliases"]) | {m["name"].lower()}
        for key in keys:
            assert key not in seen, f"{key!r} in both {seen[key]} and {stem}"
            seen[key] = stem


def test_required_models_present(catalog):
    index = _by_key(catalog)
    missing = [r for r in REQUIRED if r.lower() not in index]
    assert not missing, missing


def test_llama_3_1_8b(catalog):
    c = _by_key(catalog)["llama-3.1-8b"]
    assert c["num_hidden_layers"] == 32 and c["hidden_size"] == 4096
    assert c["num_attention_heads"] == 32 and c["num_key_value_heads"] == 8
    assert c["vocab_size"] == 128256 and c["intermediate_size"] == 14336
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["rope_theta"] == 500000.0
    assert c["tie_word_embeddings"] is False


def test_deepseek_v3(catalog):
    for key in ("deepseek-v3", "deepseek-r1"):
        c = _by_key(catalog)[key]
        assert c["kv_lora_rank"] == 512 and c["q_lora_rank"] == 1536
        assert c["qk_nope_head_dim"] == 128 and c["qk_rope_head_dim"] == 64 and c["v_head_dim"] == 128
        assert c["n_routed_experts"] == 256 and c["n_shared_experts"] == 1
        assert c["num_experts_per_tok"] == 8 and c["moe_intermediate_size"] == 2048
        assert c["first_k_dense_replace"] == 3 and c["num_hidden_layers"] == 61
        assert c["quantization_config"]["quant_method"] == "fp8"
        assert c["quantization_config"]["weight_block_size"] == [128, 128]


def test_qwen3_235b(catalog):
    c = _by_key(catalog)["qwen3-235b-a22b"]
    assert c["num_experts"] == 128 and c["num_experts_per_tok"] == 8
    assert c["num_hidden_layers"] == 94 and c["moe_intermediate_size"] == 1536
    assert c["num_key_value_heads"] == 4 and c["head_dim"] == 128


def test_gpt_oss(catalog):
    for key, layers, experts in (("gpt-oss-120b", 36, 128), ("gpt-oss-20b", 24, 32)):
        c = _by_key(catalog)[key]
        assert c["num_hidden_layers"] == layers and c["num_local_experts"] == experts
        assert len(c["layer_types"]) == layers
        assert c["layer_types"][0::2] == ["sliding_attention"] * (layers // 2)
        assert c["layer_types"][1::2] == ["full_attention"] * (layers // 2)
        assert c["sliding_window"] == 128 and c["num_experts_per_tok"] == 4
        assert c["quantization_config"]["quant_method"] == "mxfp4"


def test_mistral_sliding_window(catalog):
    assert _by_key(catalog)["mistral-7b"]["sliding_window"] == 4096
    assert _by_key(catalog)["mixtral-8x7b"]["sliding_window"] is None


def test_encoders(catalog):
    idx = _by_key(catalog)
    bge = idx["bge-large-en-v1.5"]
    assert bge["_mist"]["kind"] == "embedder" and bge["architectures"] == ["BertModel"]
    assert bge["hidden_size"] == 1024 and bge["num_hidden_layers"] == 24
    rr = idx["bge-reranker-base"]
    assert rr["_mist"]["kind"] == "reranker"
    assert rr["architectures"] == ["XLMRobertaForSequenceClassification"]
    assert rr["vocab_size"] == 250002
