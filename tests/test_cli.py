"""The ``longmem`` command: one tiny end-to-end run through the real entry point,
then the files it wrote are read back by the library; argument errors in-process."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import yaml
import torch

from longmem.cli import main, parse_overrides
from longmem.config import PRESETS, RunConfig
from longmem.data.tokenizer import ByteTokenizer, load_tokenizer
from longmem.models import MemoryLM
from longmem.runs import load_run
from longmem.training.checkpoint import load_weights

pytestmark = pytest.mark.e2e

TINY = PRESETS / "tiny.yaml"


def longmem(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longmem", *args], cwd=cwd, capture_output=True,
                          encoding="utf-8", timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    res = longmem("train", "--config", str(TINY), "--out", "RUN", "--train.progress", "false", cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""                                          # messages go to stderr
    return cwd / "RUN"


def eval_json(run_dir, *extra: str) -> dict:
    res = longmem("eval", "RUN", "--json", *extra, cwd=run_dir.parent)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    assert {"loss", "ppl", "bpc", "tokens", "mem_len"} <= set(out)
    assert math.isfinite(out["loss"]) and out["ppl"] == pytest.approx(math.exp(out["loss"]))
    return out


def test_train_writes_a_run_whose_loss_fell(run_dir):
    assert {"config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= {
        p.name for p in run_dir.iterdir()}
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 8                                          # 40 steps, a line every 5
    assert losses[0] > losses[-1]
    assert all(math.isfinite(x) for x in losses)


def test_eval_json_and_longer_memory(run_dir):
    default = eval_json(run_dir)
    assert default["mem_len"] == 32
    assert default["tokens"] > 0
    # the files round-trip: eval of the saved run equals the validation the trainer logged
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert val["val_loss"] == pytest.approx(default["loss"], rel=1e-6)
    assert val["val_tokens"] == default["tokens"]
    longer = eval_json(run_dir, "--memory.mem_len", "64")
    assert longer["mem_len"] == 64
    assert longer["tokens"] == default["tokens"]
    assert longer["loss"] != default["loss"]
    # the sweep: one row per memory length, equal to the single evaluations, a curve beside the JSON
    res = longmem("eval", "RUN", "--task", "ppl", "--mem-lens", "32,64", "--json", "--out", "sweep.json",
                  cwd=run_dir.parent)
    assert res.returncode == 0, res.stderr
    sweep = json.loads(res.stdout)
    assert [r["mem_len"] for r in sweep["results"]] == [32, 64]
    assert [r["loss"] for r in sweep["results"]] == pytest.approx([default["loss"], longer["loss"]], rel=1e-6)
    assert sweep["plot"] and (run_dir.parent / "sweep.png").is_file()


def test_generate_is_reproducible(run_dir):
    args = ("generate", "RUN", "--prompt", "The ", "--max-new-tokens", "20", "--seed", "3")
    a = longmem(*args, cwd=run_dir.parent)
    b = longmem(*args, cwd=run_dir.parent)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    assert len(a.stdout) > 1 and a.stdout.endswith("\n")


def test_run_files_round_trip(run_dir):
    cfg = RunConfig.load(run_dir / "config.yaml")
    assert cfg.memory.kind == "xl" and cfg.memory.mem_len == 32 and cfg.train.progress is False
    tok = load_tokenizer(run_dir / "tokenizer.json")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == cfg.model.vocab_size
    model = MemoryLM(cfg.model).eval()
    load_weights(model, run_dir / "model.safetensors")
    run = load_run(run_dir)
    x = torch.tensor([tok.encode("The with statement is used to wrap")] * 2)
    with torch.no_grad():
        assert torch.equal(model(x).logits, run.model(x).logits)
    assert run.config.to_dict() == cfg.to_dict()


def test_unknown_override_key_exits_2_naming_valid_keys(tmp_path, capsys):
    code = main(["train", "--config", str(TINY), "--out", str(tmp_path / "RUN"), "--train.foo", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.foo" in err and "train.max_steps" in err
    assert "Traceback" not in err
    assert not (tmp_path / "RUN").exists()                          # nothing ran


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--memory.kind", "tokenz"]) == 2
    assert "accepted: none, xl, knn, tokens" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "stray"]) == 2
    assert "stray" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_input_gets_one_paragraph_and_exit_2(tmp_path, capsys):
    """Empty corpus, wrong type, missing path, a memory that cannot fit: exit 2, no traceback."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    cases = [(["--data.path", str(tmp_path / "empty")], "empty"),
             (["--train.max_steps", "abc"], "train.max_steps must be an integer"),
             (["--data.path", str(tmp_path / "nowhere.txt")], "not found"),
             (["--memory.mem_len", "2000000000"], "does not fit"),
             (["--memory.kind", "knn", "--memory.knn.capacity", "2000000000"], "Lower memory.knn.capacity"),
             (["--model.d_ff", "2000000000"], "this model does not fit")]
    for extra, message in cases:
        code = main(["train", "--config", str(TINY), "--out", str(tmp_path / "r"), "--train.progress", "false",
                     *extra])
        err = capsys.readouterr().err
        assert code == 2, extra
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_path_override_that_is_not_yaml_exits_2(tmp_path, monkeypatch, capsys):
    """A data path starting with '[' is still a path: the missing file is reported
    (exit 2), not a YAML traceback."""
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--out", "RUN", "--data.path", "[draft].txt", "--train.max_steps", "1"])
    assert code == 2
    assert "[draft].txt" in capsys.readouterr().err


def test_parse_overrides():
    assert parse_overrides(["--train.lr", "3e-4", "--memory.mem_len=64"]) == {
        "train.lr": "3e-4", "memory.mem_len": "64"}
    assert parse_overrides([]) == {}
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ValueError, match="unrecognized argument '--verbose'"):
        parse_overrides(["--verbose"])


def test_commands_reading_a_run_use_its_thread_count(run_dir):
    import argparse

    from longmem.cli import _load_run
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        run = _load_run(argparse.Namespace(run=str(run_dir)), {"train.threads": str(want)})
        assert run.config.train.threads == want
        assert torch.get_num_threads() == want
        torch.set_num_threads(before)
        _load_run(argparse.Namespace(run=str(run_dir)), {"train.threads": "0"})    # 0: torch's default kept
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def tiny_train(out, *extra: str) -> int:
    return main(["train", "--config", str(TINY), "--out", str(out), "--train.progress", "false",
                 "--train.threads", "1", "--train.max_steps", "4", *extra])


def test_train_refuses_a_directory_holding_a_run_and_overwrite_clears_only_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tiny_train("RUN") == 0
    capsys.readouterr()
    metrics = (tmp_path / "RUN" / "metrics.jsonl").read_text()
    assert tiny_train("RUN", "--train.max_steps", "2") == 2                # not mixed into the old run
    err = capsys.readouterr().err
    assert "--resume RUN" in err and "--overwrite" in err and "--out" in err and err.count("\n") == 1
    assert (tmp_path / "RUN" / "metrics.jsonl").read_text() == metrics
    assert tiny_train("RUN", "--train.max_steps", "2", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "RUN" / "checkpoints").iterdir()) == ["best", "step-00000002"]
    assert max(json.loads(line)["step"] for line in (tmp_path / "RUN" / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    # --overwrite clears nothing but a run directory: not other files, a file, the cwd, home or root
    (tmp_path / "OTHER").mkdir()
    (tmp_path / "OTHER" / "notes.txt").write_text("mine")
    (tmp_path / "FILE").write_text("mine")
    shutil.copytree(tmp_path / "RUN", tmp_path / "HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "HOME"))
    for out in ("OTHER", "FILE", "HOME", "/"):
        assert tiny_train(out, "--overwrite") == 2, out
        assert "Traceback" not in capsys.readouterr().err
    assert tiny_train("OTHER") == 2                                      # not empty: refused without --overwrite
    assert (tmp_path / "OTHER" / "notes.txt").read_text() == (tmp_path / "FILE").read_text() == "mine"
    assert (tmp_path / "HOME" / "config.yaml").is_file()
    monkeypatch.chdir(tmp_path / "RUN")
    assert tiny_train(".", "--overwrite") == 2 and tiny_train(tmp_path, "--overwrite") == 2
    assert "current directory" in capsys.readouterr().err
    assert (tmp_path / "RUN" / "config.yaml").is_file()


def test_resume_of_a_finished_run_says_so_and_how_to_go_further(tmp_path, capsys):
    assert tiny_train(tmp_path / "RUN") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "RUN")]) == 0
    err = capsys.readouterr().err
    assert "already at step 4" in err and "--train.max_steps" in err
    assert main(["train", "--resume", str(tmp_path / "RUN"), "--train.max_steps", "6", "--train.progress",
                 "false"]) == 0
    assert "trained to step 6" in capsys.readouterr().err


def test_summary_line_and_report_give_the_same_train_loss(tmp_path, capsys):
    assert tiny_train(tmp_path / "RUN", "--train.max_steps", "12") == 0               # logs at 5, 10, 12
    err = capsys.readouterr().err
    first, last = (float(x) for x in re.search(r"train loss ([\d.]+) -> ([\d.]+)", err).groups())
    logged = [r["loss"] for r in map(json.loads, (tmp_path / "RUN" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert (first, last) == (round(logged[0], 4), round(logged[-1], 4))
    report = (tmp_path / "RUN" / "report.md").read_text()
    assert f"{first:.4f} (steps 1-5) -> {last:.4f} (steps 11-12)" in report


def test_eval_out_must_be_a_json_file_refused_before_any_work(run_dir, tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    for out in (folder, tmp_path / "result.txt"):
        assert main(["eval", str(run_dir), "--mem-lens", "0,16", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "FILE.json" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]       # no existing.png beside it
    assert not any(folder.iterdir())
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "ppl.json")]) == 2     # plain ppl only prints
    assert "--out is for sweeps" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--task", "passkey", "--cloze"], ["--task", "recall", "--shots", "3"],
                                   ["--task", "babi", "--distractor", "x.txt"], ["--task", "passkey", "--mem-lens", "0"]])
def test_eval_options_of_other_tasks_are_refused_not_ignored(run_dir, capsys, flags):
    assert main(["eval", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert "applies to --task" in err and "Traceback" not in err


def test_fine_tuning_without_a_config_takes_the_model_of_the_init_run(run_dir, tmp_path):
    res = longmem("train", "--train.init_from", str(run_dir), "--out", "FT", "--train.max_steps", "2",
                  "--memory.kind", "sinks", "--memory.mem_len", "16", "--train.progress", "false",
                  "--data.batch_size", "2", "--train.lr", "1e-30", "--train.min_lr", "0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file                                  # lr ~0: the init run's weights
    ft_w, our_w = load_file(tmp_path / "FT" / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert ft_w.keys() == our_w.keys() and all(torch.equal(ft_w[k], our_w[k]) for k in ft_w)
    ft = yaml.safe_load((tmp_path / "FT" / "config.yaml").read_text())
    ours = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert ft["model"] == ours["model"] and ft["data"]["tokenizer"] == ours["data"]["tokenizer"]
    assert (ft["memory"]["kind"], ft["memory"]["mem_len"]) == ("sinks", 16)       # the overrides on top
    res = longmem("train", "--train.init_from", str(tmp_path / "nowhere"), "--out", "FT2", cwd=tmp_path)
    assert res.returncode == 2 and "run directory not found" in res.stderr and "Traceback" not in res.stderr


def test_a_file_given_as_run_directory_is_named_as_a_file(run_dir, capsys):
    assert main(["eval", str(run_dir / "config.yaml")]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("name,text,message", [
    ("config.yaml", "- model\n- train\n", "holds a YAML list"),
    ("config.yaml", "7\n", "holds a YAML int"),
    ("tokenizer.json", "[" * 100_000, "not valid JSON"),
])
def test_damaged_run_files_exit_2_with_one_paragraph(run_dir, tmp_path, capsys, name, text, message):
    run = tmp_path / "RUN"
    shutil.copytree(run_dir, run)
    (run / name).write_text(text)
    commands = [["eval", str(run)], ["generate", str(run), "--max-new-tokens", "1"]]
    if name == "config.yaml":
        commands.append(["train", "--resume", str(run)])
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_weights_holding_nan_are_refused_naming_the_tensor(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    run = tmp_path / "RUN"
    shutil.copytree(run_dir, run)
    tensors = load_file(run / "model.safetensors")
    name = sorted(tensors)[-1]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, run / "model.safetensors", metadata={"format": "longmem-weights", "version": "1"})
    assert main(["eval", str(run), "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and name in out.err and "NaN" in out.err


def test_each_command_shows_and_accepts_only_the_config_keys_it_uses(capsys):
    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return capsys.readouterr().out
    assert "--train.lr" in help_of("train") and "--model.d_model" in help_of("train")
    for command in ("eval", "generate", "chat", "serve"):
        text = help_of(command)
        assert "--memory.mem_len" in text and "--train.threads" in text
        assert "--train.lr" not in text and "--model.d_model" not in text and "--train.max_steps" not in text
    assert ("--data.path" in help_of("eval")) and ("--data.path" not in help_of("generate"))
    for argv in (["generate", "RUN", "--train.lr", "5"], ["generate", "RUN", "--data.path", "/nonexistent"],
                 ["serve", "RUN", "--model.d_model", "64"], ["eval", "RUN", "--train.max_steps", "3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"not used by `longmem {argv[0]}`" in err and "--memory.mem_len" in err


@pytest.mark.parametrize("argv,suggestion", [
    (["generate", "RUN", "--max_new_tokens", "5"], "--max-new-tokens"),
    (["generate", "RUN", "--temprature", "0.5"], "--temperature"),
    (["chat", "RUN", "--sesion", "a"], "--session"),
    (["train", "--out", "R", "--train.lrr", "1"], "--train.lr"),
    (["eval", "RUN", "--memory.mem_lenn=64"], "--memory.mem_len"),
    (["bench", "--quik"], "--quick"),
])
def test_a_mistyped_option_gets_the_closest_one_suggested(argv, suggestion, capsys):
    assert main(argv) == 2
    assert f"did you mean {suggestion}?" in capsys.readouterr().err
