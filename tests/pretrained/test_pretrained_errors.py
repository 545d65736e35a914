"""Bad input to the checkpoint readers: each case is one ValueError / FileNotFoundError whose message
names what was found and what is accepted; nothing is returned half-read."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tiny_pretrained import save_hf, tiny_model, tiny_tokenizer, write_gguf  # noqa: E402

from longmem.pretrained import read_checkpoint, read_gguf, read_hf_folder  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("hf")
    return save_hf(tiny_model("llama", vocab_size=tok.get_vocab_size()), tok, path)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(path, tiny_model("llama", vocab_size=tok.get_vocab_size()), tok, qtype="Q8_0")
    return path


def _copy(hf_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(hf_dir, dst)
    return dst


def test_missing_path_and_unknown_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; give a Hugging Face model folder or a .gguf"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "model.bin").write_bytes(b"\x80\x04 not gguf")
    with pytest.raises(ValueError, match=r"neither a folder nor a GGUF file \(it starts with b'\\x80\\x04 n'"):
        read_checkpoint(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="is not a GGUF file: it starts with"):
        read_gguf(tmp_path / "model.bin")


def test_folder_without_weights_or_config(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no weights: expected model.safetensors.*found \['chat_template"):
        read_hf_folder(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        read_hf_folder(d)


def test_pickle_weights_are_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")           # a pickle: never opened
    with pytest.raises(ValueError, match=r"\['pytorch_model.bin'\], a pickle format.*Convert the folder to safetensors"):
        read_hf_folder(d)


def test_unsupported_model_type_and_activation(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model type 'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        read_hf_folder(d)
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match=r"hidden_act 'gelu' is not supported.*SwiGLU"):
        read_hf_folder(d)


def test_weights_that_do_not_fit_the_config(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"do not fit a llama model.*missing model.layers.2.*"
                                         r"model.layers.0.mlp.down_proj.weight is \(32, 64\), expected \(32, 48\)"):
        read_hf_folder(d)


def test_truncated_safetensors_and_missing_shard(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_hf_folder(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight":
                                                                               "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"the index names shards that are not there: \['model-00001"):
        read_hf_folder(d)


def test_tokenizer_larger_than_embedding(hf_dir, tmp_path, tok):
    d = _copy(hf_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        read_hf_folder(d)
    big = tiny_tokenizer(vocab_size=320)
    big.save(str(d / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"the tokenizer has 3\d\d tokens but the embedding has 300 rows"):
        read_hf_folder(d)


def test_gguf_truncated(gguf_file, tmp_path):
    data = gguf_file.read_bytes()
    for cut in (len(data) - 100, 2000, 30):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="could not be read as GGUF: the file is truncated or corrupt"):
            read_gguf(bad)


def test_gguf_unknown_architecture(tmp_path, tok):
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", model, tok, arch="gpt2")
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not supported.*llama, qwen2, qwen3"):
        read_gguf(tmp_path / "m.gguf")


def test_gguf_unknown_tensor_name_and_type(tmp_path, tok):
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    write_gguf(tmp_path / "moe.gguf", model, tok, extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((4, 32, 64),
                                                                                                        np.float32)})
    with pytest.raises(ValueError, match=r"tensors \['blk.0.ffn_gate_exps.weight'\] are not part of a Llama-style"):
        read_gguf(tmp_path / "moe.gguf")
    norm = np.arange(32, dtype=np.int32)
    write_gguf(tmp_path / "int.gguf", model, tok, raw={"blk.0.attn_norm.weight": (norm, "I32")})
    with pytest.raises(ValueError, match=r"blk.0.attn_norm.weight has type I32.*supported: F32, F16, BF16, Q8_0"):
        read_gguf(tmp_path / "int.gguf")


def test_gguf_vocabulary_larger_than_embedding(tmp_path, tok):
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + [f"extra{i}" for i in range(5)]
    write_gguf(tmp_path / "m.gguf", model, tok, tokens=tokens)
    with pytest.raises(ValueError, match="the tokenizer has 305 tokens but the embedding has 300 rows"):
        read_gguf(tmp_path / "m.gguf")


def test_gguf_unknown_pre_tokenizer(tmp_path, tok):
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", model, tok, pre="made-up")
    with pytest.raises(ValueError, match=r"pre-tokenizer 'made-up' \(tokenizer.ggml.pre\) is not supported; "
                                         r"supported: .*llama-bpe.*qwen2.*smollm"):
        read_gguf(tmp_path / "m.gguf")


def test_gguf_llama3_rope_freqs_refused(tmp_path, tok):
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", model, tok, extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs tensor, Llama 3.1\\+ 'llama3' rope scaling"):
        read_gguf(tmp_path / "m.gguf")
