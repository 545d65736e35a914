"""Reading Hugging Face folders: tiny random Llama / Qwen2 / Qwen3 models saved offline with
transformers' save_pretrained must come back as their own state_dict, config and tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tiny_pretrained import CHATML, TEXTS, hf_tokenizer, save_hf, tiny_model, tiny_tokenizer  # noqa: E402

from longmem.pretrained import read_checkpoint, read_hf_folder  # noqa: E402
from longmem.pretrained.checkpoint import CONFIG_KEYS, complete_config  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _assert_same_tensors(read: dict, model, *, dtype=torch.float32):
    want = {k: v.to(dtype).float() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        want.pop("lm_head.weight")
    assert set(read) == set(want)
    for k, v in want.items():
        assert read[k].dtype == torch.float32, k
        assert torch.equal(read[k], v), k


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_hf_folder_matches_state_dict_config_and_tokenizer(tmp_path, tok, kind, tied):
    model = tiny_model(kind, vocab_size=tok.get_vocab_size(), tied=tied)
    save_hf(model, tok, tmp_path)
    ck = read_checkpoint(tmp_path)
    _assert_same_tensors(ck.tensors, model)
    c = model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert ck.config[key] == getattr(c, key), key
    assert ck.config["model_type"] == kind and set(CONFIG_KEYS) <= set(ck.config)
    assert ck.config["rope_theta"] == c.rope_parameters["rope_theta"] == 50000.0
    assert ck.config["attention_bias"] is (kind == "qwen2")
    assert ck.config["qk_norm"] is (kind == "qwen3")
    assert ck.config["attention_out_bias"] is False
    # the q/k biases and norms exist exactly where the model type has them
    assert ("model.layers.0.self_attn.q_proj.bias" in ck.tensors) is (kind == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in ck.tensors) is (kind == "qwen3")
    hf = hf_tokenizer(tok)
    for text in TEXTS:
        assert ck.tokenizer.encode(text).ids == hf(text)["input_ids"]
    assert ck.chat_template == CHATML
    assert ck.tokenizer_config["eos_token"] == "<|im_end|>" and ck.tokenizer_config["bos_token"] == "<|im_start|>"
    assert ck.generation_config["eos_token_id"] == 2
    assert ck.source == str(tmp_path)


def test_sharded_bf16_folder(tmp_path, tok):
    """Shards + index from a small max_shard_size; bf16 weights come back as the same values in float32."""
    model = tiny_model("llama", vocab_size=tok.get_vocab_size()).to(torch.bfloat16)
    save_hf(model, tok, tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").is_file()
    ck = read_hf_folder(tmp_path)
    _assert_same_tensors(ck.tensors, model, dtype=torch.bfloat16)


def test_chat_template_file_precedence_and_legacy_forms(tmp_path, tok):
    """chat_template.jinja wins over tokenizer_config.json; a list of named templates gives 'default';
    special tokens written as AddedToken dicts become strings; special_tokens_map.json fills gaps."""
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    save_hf(model, tok, tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tc_path = tmp_path / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = [{"name": "default", "template": "DEFAULT {{ messages[0].content }}"},
                           {"name": "tool_use", "template": "TOOLS"}]
    tc["eos_token"] = {"content": "<|im_end|>", "special": True, "lstrip": False}
    tc.pop("bos_token", None)
    tc_path.write_text(json.dumps(tc))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    ck = read_hf_folder(tmp_path)
    assert ck.chat_template == "DEFAULT {{ messages[0].content }}"
    assert ck.tokenizer_config["chat_templates"]["tool_use"] == "TOOLS"
    assert ck.tokenizer_config["eos_token"] == "<|im_end|>" and ck.tokenizer_config["bos_token"] == "<|im_start|>"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "FROM JSON"}))
    assert read_hf_folder(tmp_path).chat_template == "FROM JSON"
    (tmp_path / "chat_template.jinja").write_text("FROM JINJA")
    assert read_hf_folder(tmp_path).chat_template == "FROM JINJA"


def test_complete_config_defaults_and_transformers4_keys():
    """A transformers-4 config (rope_theta at the top, rope_scaling) and one with sizes only."""
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    llama3 = complete_config({**base, "model_type": "llama", "rope_theta": 500000.0, "num_key_value_heads": 2,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert llama3["rope_theta"] == 500000.0 and llama3["rope_scaling"]["rope_type"] == "llama3"
    assert llama3["head_dim"] == 16 and llama3["num_key_value_heads"] == 2
    v5 = complete_config({**base, "model_type": "llama",
                          "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}})
    assert v5["rope_theta"] == 1e4 and v5["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    qwen3 = complete_config({**base, "model_type": "qwen3"})
    assert qwen3["head_dim"] == 128 and qwen3["num_key_value_heads"] == 4      # Qwen3Config's defaults
    mistral = complete_config({**base, "model_type": "mistral"})
    assert mistral["sliding_window"] == 4096 and mistral["attention_bias"] is False
    qwen2 = complete_config({**base, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert qwen2["sliding_window"] is None and qwen2["attention_bias"] and not qwen2["attention_out_bias"]
