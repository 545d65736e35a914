"""Training you can trust: exact resume after SIGKILL, SIGTERM checkpoints, DDP vs one
process, precision, early stopping, a diverged loss, checkpoint files refused when foreign."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longmem.config import PRESETS, RunConfig
from longmem.training import state as S
from longmem.training.precision import resolve_precision
from longmem.training.trainer import TrainingStopped, train

pytestmark = pytest.mark.e2e

TINY = PRESETS / "tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small folder corpus: 12 documents of varied text (fast validation)."""
    root = tmp_path_factory.mktemp("corpus")
    words = "memory lanes carry the past state across segments while the window slides on".split()
    for i in range(12):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60 + 13 * i))
        (root / f"doc{i:02d}.txt").write_text(text.capitalize() + ".\n")
    return root


def base_args(corpus: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--data.path", str(corpus), "--train.progress", "false",
            "--train.log_every", "1", "--model.dropout", "0.1", "--train.threads", "1", *extra]


def run_cli(*args: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longmem", *args], cwd=cwd, capture_output=True,
                          encoding="utf-8", timeout=300, env=env)


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ref")
    res = run_cli("train", *base_args(corpus, "--train.max_steps", "24"), "--out", "REF", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return cwd / "REF"


def test_sigkill_then_resume_gives_the_same_losses(corpus, reference, tmp_path):
    """A run killed with SIGKILL mid-training and resumed logs the losses of the uninterrupted run."""
    proc = subprocess.Popen([sys.executable, "-m", "longmem", "train",
                             *base_args(corpus, "--train.max_steps", "24", "--train.checkpoint_every", "5"),
                             "--out", "RUN"], cwd=tmp_path, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "RUN" / "checkpoints" / "step-00000010"
    deadline = time.time() + 240
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert ckpt.is_dir(), "the run never reached its second checkpoint"
    killed_at = max(step_losses(tmp_path / "RUN"), default=0)
    assert killed_at < 24, "the run finished before it was killed"
    res = run_cli("train", "--resume", "RUN", "--train.progress", "false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ref, got = step_losses(reference), step_losses(tmp_path / "RUN")
    assert sorted(got) == list(range(1, 25))
    for step in ref:
        assert abs(ref[step] - got[step]) <= 1e-6, (step, ref[step], got[step])
    meta, _ = S.load_checkpoint(tmp_path / "RUN" / "checkpoints" / "step-00000024")
    assert meta["step"] == 24
    assert sorted(p.name for p in (tmp_path / "RUN" / "checkpoints").iterdir() if p.name.startswith("step-")) \
        == ["step-00000020", "step-00000024"]                          # keep_last = 2


def interrupt(corpus: Path, cwd: Path, sig: int, *extra: str) -> tuple[int, str]:
    """Start a training run in ``cwd``/RUN, send ``sig`` once it has logged 3 lines; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "longmem", "train",
                             *base_args(corpus, "--train.max_steps", "24", *extra), "--out", "RUN"],
                            cwd=cwd, stderr=subprocess.PIPE, encoding="utf-8")
    metrics = cwd / "RUN" / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_saves_a_checkpoint_and_resume_finishes_identically(corpus, reference, tmp_path):
    code, err = interrupt(corpus, tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM == 143, err                     # the shell's code for SIGTERM
    assert "interrupted at step" in err and "--resume" in err
    saved = S.latest_checkpoint(tmp_path / "RUN")
    assert saved is not None
    res = run_cli("train", "--resume", "RUN", "--train.progress", "false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ref, got = step_losses(reference), step_losses(tmp_path / "RUN")
    assert all(abs(ref[s] - got[s]) <= 1e-6 for s in ref)


def test_sigint_exits_130_after_saving_a_checkpoint(corpus, tmp_path):
    code, err = interrupt(corpus, tmp_path, signal.SIGINT)
    assert code == 128 + signal.SIGINT == 130, err
    assert "interrupted at step" in err
    assert S.latest_checkpoint(tmp_path / "RUN") is not None


def test_first_log_after_resume_equals_the_uninterrupted_run(corpus, tmp_path):
    """The logged loss is the mean over train.log_every steps; a run resumed inside such a window (here at
    step 8 of the window 6-10) logs the mean of the whole window, as the uninterrupted run did."""
    cfg = _cfg(corpus, max_steps=12, checkpoint_every=4, keep_last=3, log_every=5)
    run = tmp_path / "run"
    train(cfg, run)
    ref = step_losses(run)
    assert sorted(ref) == [5, 10, 12]
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    train(cfg, run, resume=True)
    got = step_losses(run)
    assert sorted(got) == [5, 10, 12]
    assert all(abs(ref[s] - got[s]) <= 1e-6 for s in ref), (ref, got)


def test_a_validation_of_the_whole_split_shows_progress(corpus, tmp_path, capsys):
    train(_cfg(corpus, max_steps=2, progress="true"), tmp_path / "run")
    assert "validate" in capsys.readouterr().err
    train(_cfg(corpus, max_steps=2, progress="false"), tmp_path / "quiet")
    assert capsys.readouterr().err == ""


def test_two_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path):
    """torchrun with 2 processes (gloo), each training half of the lanes, logs the losses of
    one process training all lanes (dropout off: the two runs draw different masks)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists(), "torchrun ships with torch"
    args = base_args(corpus, "--train.max_steps", "12", "--model.dropout", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "longmem", "train", *args, "--out", "DDP"],
                         cwd=tmp_path, capture_output=True, encoding="utf-8", timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("trained to step 12") == 1                     # the summary is rank 0's only
    cfg = RunConfig.load(TINY).override(dict(zip([a[2:] for a in args[2::2]], args[3::2])))
    train(cfg, tmp_path / "ONE")
    ref, got = step_losses(tmp_path / "ONE"), step_losses(tmp_path / "DDP")
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    assert max(abs(ref[s] - got[s]) for s in ref) < 1e-4
    assert sorted(p.name for p in (tmp_path / "DDP").iterdir()) == sorted(p.name for p in (tmp_path / "ONE").iterdir())


def test_resume_refuses_a_different_number_of_processes(corpus, reference, tmp_path):
    run = tmp_path / "RUN"
    shutil.copytree(reference, run)
    meta_path = S.latest_checkpoint(run) / S.STATE_J
    meta = json.loads(meta_path.read_text())
    meta["world_size"] = 2
    meta_path.write_text(json.dumps(meta))
    cfg = RunConfig.load(run / "config.yaml").override({"train.max_steps": "30"})
    with pytest.raises(ValueError, match="2 process"):
        train(cfg, run, resume=True)


def test_trainer_state_files_are_checked(reference, tmp_path):
    ckpt = tmp_path / "ck"
    shutil.copytree(S.latest_checkpoint(reference), ckpt)
    (ckpt / S.STATE_J).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a longmem trainer state"):
        S.load_checkpoint(ckpt)
    shutil.copy(S.latest_checkpoint(reference) / S.STATE_J, ckpt / S.STATE_J)
    (ckpt / S.STATE_T).write_bytes(b"\x80\x04\x95 not safetensors")
    with pytest.raises(ValueError, match="pickle"):
        S.load_checkpoint(ckpt)


def test_resume_cli_only_accepts_train_overrides(reference, tmp_path):
    res = run_cli("train", "--resume", str(reference), "--model.d_model", "64", cwd=tmp_path)
    assert res.returncode == 2 and "only train.* settings" in res.stderr


def _cfg(corpus: Path, **train_kw) -> RunConfig:
    over = {"data.path": str(corpus), "train.progress": "false", "train.threads": "1", **
            {f"train.{k}": str(v) for k, v in train_kw.items()}}
    return RunConfig.load(TINY).override(over)


def test_bf16_on_cpu_trains(corpus, tmp_path):
    res = train(_cfg(corpus, precision="bf16", max_steps=20, lr=0.01), tmp_path / "run")
    assert res.last_loss < res.first_loss - 0.5
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cpu")) is None


def test_gradient_accumulation_reads_consecutive_micro_batches(corpus, tmp_path):
    one = train(_cfg(corpus, max_steps=4), tmp_path / "a")
    two = train(_cfg(corpus, max_steps=4, grad_accum=2), tmp_path / "b")
    tok = lambda r: [x["tokens"] for x in map(json.loads, (r.out_dir / "metrics.jsonl").read_text().splitlines())
                     if "tokens" in x]
    assert tok(two)[0] > 1.5 * tok(one)[0]                              # two micro-batches per step
    assert one.first_loss == pytest.approx(two.first_loss, abs=0.2)


def test_early_stopping_on_validation_loss(corpus, tmp_path, monkeypatch):
    import longmem.training.task as T
    losses = iter([3.0, 3.1, 3.2, 3.3, 3.4, 3.5])
    monkeypatch.setattr(T, "evaluate_ppl", lambda *a, **k: {"loss": next(losses), "ppl": 1.0, "bpc": 1.0,
                                                            "tokens": 1})
    res = train(_cfg(corpus, max_steps=50, eval_every=2, patience=2), tmp_path / "run")
    assert res.stopped_early and res.steps == 6                          # best at 2, worse at 4 and 6
    assert (tmp_path / "run" / "checkpoints" / "best").is_dir()
    meta, _ = S.load_checkpoint(tmp_path / "run" / "checkpoints" / "best")
    assert meta["step"] == 2


def test_a_nan_loss_stops_with_the_step_and_last_checkpoint(corpus, tmp_path, monkeypatch):
    from longmem.models import MemoryLM
    real = MemoryLM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if self.training and calls["n"] == 7:
            out.logits = out.logits * float("nan")
        return out
    monkeypatch.setattr(MemoryLM, "forward", poisoned)
    with pytest.raises(TrainingStopped, match=r"at step 7; the last good checkpoint is .*step-00000005"):
        train(_cfg(corpus, max_steps=20, checkpoint_every=5), tmp_path / "run")


def test_memory_tokens_with_bptt_resume_exactly(corpus, tmp_path):
    """kind tokens, a bptt window growing 1 -> 2 segments (curriculum) with activation checkpointing:
    resuming from the step-8 checkpoint (which holds every lane's memory tokens) logs the losses of
    the uninterrupted run."""
    cfg = _cfg(corpus, max_steps=12, checkpoint_every=4, keep_last=3, bptt_segments=2, curriculum="1,2",
               bptt_checkpoint="true").override({"memory.kind": "tokens", "memory.tokens.n_tokens": "2",
                                                 "memory.mem_len": "16", "train.log_every": "1"})
    run = tmp_path / "run"
    train(cfg, run)
    ref = step_losses(run)
    assert sorted(ref) == list(range(1, 13))
    _, tensors = S.load_checkpoint(run / "checkpoints" / "step-00000008")
    assert tensors["memory.tokens.mem"].shape == (cfg.data.batch_size, 2, cfg.model.d_model)
    assert tensors["memory.tokens.fresh"].dtype == torch.bool
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    train(cfg, run, resume=True)
    got = step_losses(run)
    assert sorted(got) == list(range(1, 13))
    assert all(abs(ref[s] - got[s]) <= 1e-6 for s in ref), (ref, got)
    # the second stage reads two segments per step
    tok = {r["step"]: r["tokens"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if "tokens" in r}
    assert tok[7] - tok[6] > 1.5 * (tok[2] - tok[1])


def test_a_checkpoint_written_before_longmem_io_resumes_exactly(corpus, tmp_path):
    """Checkpoints of longmem 0.1 kept the step flat in the safetensors headers and no version on the trainer
    state tensors: a run resumed from one logs the losses of the uninterrupted run."""
    from safetensors.torch import load_file, save_file
    cfg = _cfg(corpus, max_steps=8, checkpoint_every=4, log_every=1)
    run = tmp_path / "run"
    train(cfg, run)
    ref = step_losses(run)
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    old = run / "checkpoints" / "step-00000004"
    save_file(load_file(old / S.WEIGHTS), old / S.WEIGHTS,
              metadata={"format": "longmem-weights", "version": "1", "step": "4"})
    save_file(load_file(old / S.STATE_T), old / S.STATE_T, metadata={"format": "longmem-trainer-state", "step": "4"})
    train(cfg, run, resume=True)
    got = step_losses(run)
    assert sorted(got) == list(range(1, 9)) and all(abs(ref[s] - got[s]) <= 1e-6 for s in ref), (ref, got)
    save_file(load_file(old / S.STATE_T), old / S.STATE_T, metadata={"format": "longmem-trainer-state", "step": "3"})
    with pytest.raises(ValueError, match="trainer_state.safetensors is for step 3"):
        S.load_checkpoint(old)


def test_randomized_memory_lengths_read_up_to_the_longer_memory(corpus, tmp_path, monkeypatch):
    # train.mem_len_max: the XL memory keeps mem_len_max slots, each step reads between mem_len and that many
    from longmem.models.memory.xl import XLMemory
    read = []
    real = XLMemory.begin

    def begin(self, seg, part):
        out = real(self, seg, part)
        if self.training and torch.is_grad_enabled():
            read.append((self.mem_len, seg.memory_len))
        return out
    monkeypatch.setattr(XLMemory, "begin", begin)
    cfg = _cfg(corpus, max_steps=12, mem_len_max=48).override({"memory.kind": "xl", "memory.mem_len": "8"})
    train(cfg, tmp_path / "run")
    assert {kept for kept, _ in read} == {48}
    assert max(n for _, n in read) > 8 and all(n <= 48 for _, n in read)
    assert RunConfig.read(tmp_path / "run" / "config.yaml")["memory"]["mem_len"] == 8


def test_a_logged_window_without_targets_logs_no_loss_rather_than_nan(tmp_path, capsys):
    """The passkey preset's first steps read only filler segments (the answer comes in the last one): such a
    window is logged without a loss, and the summary says no loss was logged instead of 'nan -> nan'."""
    from longmem.cli import main
    assert main(["train", "--config", "passkey", "--out", str(tmp_path / "RUN"), "--train.max_steps", "2",
                 "--train.threads", "1", "--train.progress", "false", "--train.log_every", "1",
                 "--task.n_test", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "RUN" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "lr" in r]
    assert [r["step"] for r in logged] == [1, 2] and all("loss" not in r for r in logged)
    assert all(not isinstance(v, float) or v == v for r in rows for v in r.values())      # no NaN anywhere
    assert "no train loss logged" in capsys.readouterr().err
