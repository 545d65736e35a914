"""Reading GGUF files: tiny models written as llama.cpp's converter writes them (names, q/k row
permutation for "llama", quantized 2-D weights, tokenizer metadata, chat template) must come back as
the original HF tensors, the original tokenizer and the template."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tiny_pretrained import CHATML, TEXTS, gguf_name, permute, tiny_model, tiny_tokenizer, write_gguf  # noqa: E402

from longmem.pretrained import read_checkpoint, read_gguf  # noqa: E402
from longmem.pretrained.gguf_reader import unpermute_rows  # noqa: E402

pytestmark = pytest.mark.parity

# max |dequantized - original| per type for weights of std 0.3 (about 4 std): a loose bound that
# still fails if a row is permuted or a block is misread (those change values by O(1)).
QUANT_ERROR = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q5_0": 0.1, "Q5_1": 0.1, "Q4_0": 0.2, "Q4_1": 0.2}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_unpermute_inverts_llamacpp_permute():
    w = torch.randn(4 * 8, 5)
    for heads in (1, 2, 4):
        p = torch.from_numpy(permute(w.numpy(), heads))
        assert not torch.equal(p, w)
        assert torch.equal(unpermute_rows(p, heads), w)
    b = torch.randn(16)                                           # biases are permuted the same way
    assert torch.equal(unpermute_rows(torch.from_numpy(permute(b.numpy(), 2)), 2), b)


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)])
def test_f32_gguf_gives_the_hf_tensors(tmp_path, tok, kind, tied):
    """F32 round trip is exact: names, shapes (ggml's reversed dims), un-permuted q/k for llama only."""
    model = tiny_model(kind, vocab_size=tok.get_vocab_size(), tied=tied)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, tok)
    ck = read_checkpoint(path)
    want = model.state_dict()
    if tied:
        want.pop("lm_head.weight")
    assert set(ck.tensors) == set(want)
    for k, v in want.items():
        assert ck.tensors[k].dtype == torch.float32 and torch.equal(ck.tensors[k], v), k
    c = model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert ck.config[key] == getattr(c, key), key
    assert ck.config["model_type"] == kind
    assert ck.config["rope_theta"] == 50000.0
    assert ck.config["rms_norm_eps"] == pytest.approx(1e-5, rel=1e-6)       # stored as float32
    assert ck.config["attention_bias"] is (kind == "qwen2") and ck.config["qk_norm"] is (kind == "qwen3")


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_gguf_equals_gguf_dequantize(tmp_path, tok, qtype):
    """Each 2-D weight equals gguf.quants.dequantize of the data written (then un-permuted), and lies
    within the type's quantization error of the original."""
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    path = tmp_path / "m.gguf"
    originals = write_gguf(path, model, tok, qtype=qtype)
    ck = read_gguf(path)
    T = gguf.GGMLQuantizationType[qtype]
    c = model.config
    for hf, v in model.state_dict().items():
        g = gguf_name(hf)
        got = ck.tensors[hf]
        if v.dim() == 1:
            assert torch.equal(got, v), hf
            continue
        a = originals[g]
        n = c.num_attention_heads if ".attn_q." in g else c.num_key_value_heads
        stored = permute(a, n) if (".attn_q." in g or ".attn_k." in g) else a
        ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(stored, T), T).astype(np.float32))
        if ".attn_q." in g or ".attn_k." in g:
            ref = unpermute_rows(ref, n)
        assert torch.equal(got, ref), hf
        assert (got - v).abs().max() <= QUANT_ERROR[qtype], hf
        assert (got - v).abs().max() > 0, hf                         # it really was quantized


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_read_like_gguf_dequantize(tmp_path, tok, qtype):
    """gguf's Python package cannot quantize K-quants, so random blocks are written as raw data: the
    reader must give gguf.quants.dequantize of those bytes, reshaped to torch order and un-permuted.
    K-quant blocks hold 256 values, so the model's rows are 256 wide."""
    model = tiny_model("llama", vocab_size=tok.get_vocab_size(), hidden=256, layers=1, heads=4, kv_heads=2,
                       head_dim=64, intermediate=256)
    T = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[T]
    rng = np.random.default_rng(0)
    state = model.state_dict()
    names = {g: hf for hf in state if (g := gguf_name(hf)) in
             ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "token_embd.weight")}
    # bytes below 0x3c keep every float16 scale finite and below 1
    raw = {g: (rng.integers(0, 0x3C, size=(state[hf].shape[0], 256 // block * nbytes), dtype=np.uint8), qtype)
           for g, hf in names.items()}
    write_gguf(tmp_path / "k.gguf", model, tok, raw=raw)
    ck = read_gguf(tmp_path / "k.gguf")
    c = model.config
    for g, hf in names.items():
        ref = torch.from_numpy(gguf.quants.dequantize(raw[g][0], T).astype(np.float32))
        if ".attn_q." in g or ".attn_k." in g:
            ref = unpermute_rows(ref, c.num_attention_heads if ".attn_q." in g else c.num_key_value_heads)
        assert torch.isfinite(ref).all() and ref.abs().max() > 0
        assert torch.equal(ck.tensors[hf], ref), g


def test_gguf_tokenizer_chat_template_and_special_tokens(tmp_path, tok):
    """The rebuilt tokenizer encodes and decodes like the original (digits one by one, special tokens
    whole, bytes of any UTF-8), and the template, special tokens and stop ids come through."""
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", model, tok)
    ck = read_gguf(tmp_path / "m.gguf")
    for text in TEXTS:
        ids = ck.tokenizer.encode(text).ids
        assert ids == tok.encode(text).ids, text
        assert ck.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert ck.tokenizer.encode("<|im_start|>").ids == [1]
    assert ck.tokenizer.decode(ck.tokenizer.encode("<|im_start|>hi").ids) == "hi"       # control tokens are special
    assert ck.chat_template == CHATML
    tc = ck.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tc["add_bos_token"] is False and tc["tokenizer_model"] == "gpt2" and tc["pre_tokenizer"] == "smollm"
    assert ck.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_gguf_matches_transformers_gguf_loader(tmp_path, tok):
    """transformers' own GGUF loading of the same file gives the same tensors (F32 exactly, Q8_0 too:
    both dequantize with gguf and un-permute)."""
    from transformers import AutoModelForCausalLM
    model = tiny_model("llama", vocab_size=tok.get_vocab_size())
    for qtype in ("F32", "Q8_0"):
        name = f"m-{qtype}.gguf"
        write_gguf(tmp_path / name, model, tok, qtype=qtype)
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name).state_dict()
        ck = read_gguf(tmp_path / name)
        assert set(ck.tensors) == set(ref)
        for k, v in ref.items():
            assert torch.equal(ck.tensors[k], v.float()), (qtype, k)


def test_sentencepiece_style_vocabulary(tmp_path, tok):
    """tokenizer.ggml.model "llama": ▁ for spaces, a ▁ in front, <0xNN> byte fallback, merges derived
    from the token scores when the file has none, BOS added by default."""
    from gguf import GGUFWriter
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
             ["▁", "h", "i", "e", "l", "o", "▁h", "▁hi", "ll", "he", "▁he", "▁hell", "hell", "▁hello"]
    scores = [0.0] * 259 + [-1.0 * i for i in range(len(pieces) - 259)]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)
    w = GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    V, H, I = len(pieces), 8, 16
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "blk.0.attn_norm.weight": (H,),
              "blk.0.ffn_norm.weight": (H,), "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (H, H),
              "blk.0.attn_v.weight": (H, H), "blk.0.attn_output.weight": (H, H), "blk.0.ffn_gate.weight": (I, H),
              "blk.0.ffn_up.weight": (I, H), "blk.0.ffn_down.weight": (H, I)}
    for name, shape in shapes.items():
        w.add_tensor(name, np.ones(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = read_gguf(tmp_path / "spm.gguf")
    enc = ck.tokenizer.encode("hello hi")
    assert enc.tokens == ["<s>", "▁hello", "▁hi"]
    assert ck.tokenizer.encode("hé").tokens == ["<s>", "▁h", "<0xC3>", "<0xA9>"]           # é by bytes
    assert ck.tokenizer.decode(ck.tokenizer.encode("hé hello").ids) == "hé hello"
    assert ck.tokenizer_config["add_bos_token"] is True and ck.config["tie_word_embeddings"] is True
