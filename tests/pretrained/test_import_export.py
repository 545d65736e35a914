"""longmem import / export end to end through the CLI (tier 4) on tiny offline checkpoints: an imported
run gives the checkpoint's logits and tokens, evaluates and generates like any run, and exports back to a
folder transformers loads with equal logits; bad input is one paragraph and exit 2, nothing written."""
from __future__ import annotations

import json

import pytest
import torch

from longmem.cli import main
from longmem.runs import load_run

from tiny_pretrained import TEXTS, hf_tokenizer, save_hf, tiny_model, tiny_tokenizer, write_gguf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(300)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tok):
    model = tiny_model("llama", vocab_size=tok.get_vocab_size(), tied=False)
    return model, save_hf(model, tok, tmp_path_factory.mktemp("hf") / "tiny")


def ids(tok, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, tok.get_vocab_size(), (1, n), generator=torch.Generator().manual_seed(seed))


def test_import_a_hf_folder_then_eval_generate_and_export_round_trip(tmp_path, hf_folder, tok, capsys):
    model, folder = hf_folder
    run_dir = tmp_path / "run"
    assert main(["import", str(folder), "--out", str(run_dir), "--model.segment_len", "32", "--memory.kind", "xl",
                 "--memory.mem_len", "128"]) == 0
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_config.json"}
    run = load_run(run_dir)
    x = ids(tok, 120)
    with torch.no_grad():
        torch.testing.assert_close(run.model(x).logits, model(x).logits, atol=1e-4, rtol=0)   # 4 segments + XL
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert run.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert run.tokenizer.chat_template == hf_tok.chat_template
    assert main(["generate", str(run_dir), "--prompt", "The lazy fox", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    # the run's tokenizer.json is a plain Hugging Face file, and the whole run exports back
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, atol=1e-5, rtol=0)
    again_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert again_tok(TEXTS[0], add_special_tokens=False)["input_ids"] == run.tokenizer.encode(TEXTS[0])
    assert again_tok.chat_template == hf_tok.chat_template and again_tok.eos_token == "<|im_end|>"


def test_import_a_gguf_file_gives_its_dequantized_logits(tmp_path, tok):
    model = tiny_model("llama", vocab_size=tok.get_vocab_size(), tied=True)
    path = tmp_path / "tiny.Q8_0.gguf"
    write_gguf(path, model, tok, qtype="Q8_0")
    from longmem.pretrained.checkpoint import read_gguf
    ref = tiny_model("llama", vocab_size=tok.get_vocab_size(), tied=True)
    ref.load_state_dict(read_gguf(path).tensors, strict=False)             # the dequantized weights
    assert main(["import", str(path), "--out", str(tmp_path / "run"), "--model.segment_len", "64",
                 "--memory.kind", "none", "--memory.mem_len", "0"]) == 0
    run = load_run(tmp_path / "run")
    x = ids(tok, 60, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(run.model(x).logits, ref(x).logits, atol=1e-4, rtol=0)
        assert (run.model(x).logits - model(x).logits).abs().max() > 1e-4    # Q8_0 is not exact


def test_bad_imports_and_exports_exit_2_and_write_nothing(tmp_path, hf_folder, capsys):
    _, folder = hf_folder
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases = [(["import", str(folder), "--out", str(tmp_path / "busy")], "not empty"),
             (["import", str(folder), "--out", str(tmp_path / "busy"), "--overwrite"], "does not look like"),
             (["import", str(empty), "--out", str(tmp_path / "a")], "config"),
             (["import", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "neither a file"),
             (["import", str(folder), "--out", str(tmp_path / "c"), "--model.d_model", "64"], "not used by `longmem import`")]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temporary folder left
    from conftest import make_tiny_run
    gelu = make_tiny_run(tmp_path / "gelu", kind="xl", mem_len=8, segment_len=8)
    assert main(["export", str(gelu.path), "--out", str(tmp_path / "hf")]) == 2
    assert "no Hugging Face equivalent: its MLP is gelu" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
