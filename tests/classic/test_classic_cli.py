"""The three baselines through the same commands as the Transformer: train writes a run,
eval reads it back (ppl / babi / text), generate decodes from it. In-process and tiny."""
from __future__ import annotations

import json

import pytest

from longmem.cli import main
from longmem.config import PRESETS
from longmem.classic.lstm import LSTMLM
from longmem.classic.memn2n import MemN2N
from longmem.classic.seq2seq import Seq2Seq
from longmem.runs import load_run

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]

TINY = str(PRESETS / "tiny.yaml")
RUN_FILES = {"config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"}


def train(tmp_path, *args: str):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--train.progress", "false", *args]) == 0
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert losses[-1] < losses[0]
    return out


def json_out(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_lstm_trains_evaluates_and_generates(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 60)
    out = train(tmp_path, "--config", TINY, "--data.path", str(text), "--model.arch", "lstm", "--memory.kind", "none", "--memory.mem_len", "0",
                "--train.max_steps", "20")
    assert isinstance(load_run(out).model, LSTMLM)
    res = json_out(capsys, "eval", str(out), "--json", "--max-segments", "3")
    assert res["task"] == "ppl" and res["loss"] < 5.545                   # below uniform over 256 bytes
    assert main(["generate", str(out), "--prompt", "The", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    res = json_out(capsys, "eval", str(out), "--task", "babi", "--n", "2", "--json")   # the story read as text
    assert res["task"] == "babi" and [r["examples"] for r in res["results"]] == [2, 2, 2]
    assert main(["eval", str(out), "--task", "text"]) == 2                 # not a seq2seq run: a clear error
    assert "seq2seq run" in capsys.readouterr().err


def test_memn2n_trains_on_generated_stories_and_reports_babi_accuracy(tmp_path, capsys):
    out = train(tmp_path, "--model.arch", "memn2n", "--model.d_model", "16", "--model.memory_size", "20",
                "--task.babi_tasks", "1", "--task.n_train", "300", "--task.n_test", "100", "--data.batch_size", "32",
                "--train.max_steps", "120", "--train.lr", "0.01", "--train.weight_decay", "0", "--train.warmup_steps", "5",
                "--task.linear_start_steps", "10")
    run = load_run(out)
    assert isinstance(run.model, MemN2N) and run.tokenizer.kind == "word"
    res = json_out(capsys, "eval", str(out), "--task", "babi", "--json")
    assert res["task"] == "babi" and res["split"] == "test" and set(res["per_task"]) == {"1"}
    assert res["per_task"]["1"]["n"] == 100
    assert res["accuracy"] > 0.4                                          # chance is 1/6
    assert res["mean_error"] == pytest.approx(res["per_task"]["1"]["error"])
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "John went to the office. Where is John?"]) == 0
    assert capsys.readouterr().out.strip() in {"bathroom", "bedroom", "kitchen", "hallway", "garden", "office"}
    assert main(["generate", str(out), "--prompt", "John went to the office."]) == 2
    assert "question ending with '?'" in capsys.readouterr().err
    assert main(["eval", str(out)]) == 2                                   # ppl is for language models
    assert "--task babi" in capsys.readouterr().err


def test_seq2seq_trains_on_copy_and_reports_text_metrics(tmp_path, capsys):
    out = train(tmp_path, "--model.arch", "seq2seq", "--model.d_model", "32", "--model.n_heads", "2",
                "--model.n_layers", "1", "--task.name", "copy", "--task.n_train", "64", "--task.n_test", "8",
                "--task.source_len", "4", "--data.batch_size", "16", "--train.max_steps", "30", "--train.lr", "0.01",
                "--train.warmup_steps", "3")
    assert isinstance(load_run(out).model, Seq2Seq)
    res = json_out(capsys, "eval", str(out), "--task", "text", "--json")
    assert res["task"] == "text" and res["n"] == 8
    assert {"exact_match", "token_f1", "bleu", "rouge_l"} <= set(res)
    assert all(0.0 <= res[k] <= 1.0 for k in ("exact_match", "token_f1", "bleu", "rouge_l"))
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.rstrip("\n")) <= 6


def test_seq2seq_reads_a_jsonl_of_pairs(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": f"{w} {i}", "target": w}) + "\n"
                            for i, w in enumerate(["red", "blue", "green", "gold"] * 4)))
    out = train(tmp_path, "--model.arch", "seq2seq", "--model.d_model", "16", "--model.n_heads", "2",
                "--model.n_layers", "1", "--data.path", str(data), "--data.tokenizer", "char",
                "--data.batch_size", "8", "--train.max_steps", "8", "--train.warmup_steps", "1",
                "--train.log_every", "2")
    res = json_out(capsys, "eval", str(out), "--task", "text", "--json")
    assert res["units"] == "words" and res["n"] == 2                       # 10% of 16 pairs held out
    assert main(["train", "--out", str(tmp_path / "bad"), "--model.arch", "seq2seq", "--data.path",
                 str(tmp_path / "x.txt")]) == 2
    assert ".jsonl" in capsys.readouterr().err


def test_memn2n_linear_start_ends_when_validation_stops_falling_and_keeps_best_weights(tmp_path, capsys):
    out = train(tmp_path, "--model.arch", "memn2n", "--model.d_model", "16", "--model.memory_size", "20",
                "--task.babi_tasks", "1", "--task.n_train", "300", "--data.batch_size", "32",
                "--train.max_steps", "80", "--train.lr", "0.01", "--train.weight_decay", "0", "--train.warmup_steps", "0",
                "--train.eval_every", "8", "--train.log_every", "1", "--task.linear_start_steps", "64",
                "--task.linear_start_lr", "0.05")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    linear = [(e["step"], e["val_linear_loss"]) for e in events if "val_linear_loss" in e]
    # linear start ends at the first validation whose (linear) loss is not below every earlier one
    expected = next((s for i, (s, v) in enumerate(linear) if i and v >= min(x for _, x in linear[:i])), 64)
    ended = [e["step"] for e in events if e.get("event") == "linear_start_end"]
    assert ended == [expected] and expected < 64 and linear[-1][0] == expected
    lrs = {e["step"]: e["lr"] for e in events if "lr" in e}
    assert all(lrs[s] == pytest.approx(0.05) for s in range(1, expected + 1))      # linear start lr
    assert lrs[expected + 1] == pytest.approx(0.01, rel=1e-3)                      # the schedule starts afresh
    # model.safetensors holds the best validation's weights, not the last ones
    vals = [(e["val_mean_error"], e["val_loss"], e["step"]) for e in events if "val_mean_error" in e]
    best = min(vals)
    assert [e["best_step"] for e in events if e.get("event") == "best"][-1] == best[2]
    res = json_out(capsys, "eval", str(out), "--task", "babi", "--json", "--split", "val")
    assert res["mean_error"] == pytest.approx(best[0], abs=1e-4) and res["loss"] == pytest.approx(best[1], rel=1e-4)


def test_memn2n_linear_start_patience_zero_runs_every_linear_step(tmp_path):
    # the authors' code: a fixed number of linear-start epochs, whatever the validation loss does
    out = train(tmp_path, "--model.arch", "memn2n", "--model.d_model", "16", "--model.memory_size", "20",
                "--task.babi_tasks", "1", "--task.n_train", "300", "--data.batch_size", "32",
                "--train.max_steps", "40", "--train.lr", "0.01", "--train.weight_decay", "0", "--train.warmup_steps", "0",
                "--train.eval_every", "4", "--train.log_every", "1", "--task.linear_start_steps", "32",
                "--task.linear_start_lr", "0.05", "--task.linear_start_patience", "0")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    linear = [e["val_linear_loss"] for e in events if "val_linear_loss" in e]
    assert len(linear) == 8 and not any(e.get("event") == "linear_start_end" for e in events)
    lrs = {e["step"]: e["lr"] for e in events if "lr" in e}
    assert all(lrs[s] == pytest.approx(0.05) for s in range(1, 33)) and lrs[33] == pytest.approx(0.01, rel=1e-3)
    # a run written before model.pe_formula / model.attend_empty existed loads as it was trained
    assert (load_run(out).config.model.pe_formula, load_run(out).config.model.attend_empty) == ("code", True)
    import yaml
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["model"]["pe_formula"], cfg["model"]["attend_empty"]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    old = load_run(out)
    assert (old.config.model.pe_formula, old.config.model.attend_empty) == ("paper", False)
    assert (old.model.config.pe_formula, old.model.config.attend_empty) == ("paper", False)
