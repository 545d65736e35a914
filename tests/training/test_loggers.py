"""Metric loggers (metrics.jsonl always, tensorboard and wandb by train.loggers) and the library's logging (one
``longmem`` logger; the CLI prints it on stderr)."""
from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from longmem.cli import cli_logging, main
from longmem.config import PRESETS, RunConfig, TrainConfig
from longmem.data.corpus import load_documents
from longmem.training.loggers import JsonlLogger, MetricLoggers, TensorBoardLogger, WandbLogger, check_loggers
from longmem.training.trainer import train

EVENTS = [{"step": 5, "loss": 2.5, "lr": 0.001, "tokens": 640, "tokens_per_s": 1234.5, "grad_norm": 0.75},
          {"step": 5, "val_loss": 2.25, "val_ppl": 9.4877, "val_tokens": 300},
          {"step": 5, "event": "best", "best_step": 5},
          {"step": 10, "loss": 2.0, "lr": 0.002, "tokens": 1280, "tokens_per_s": 1500.0}]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files in ``folder``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_loggers_names_jsonl_always_and_refuses_a_typo():
    assert TrainConfig().logger_names() == ["jsonl"]
    assert TrainConfig(loggers="jsonl,tensorboard").logger_names() == ["jsonl", "tensorboard"]
    assert TrainConfig(loggers=" tensorboard , wandb").logger_names() == ["jsonl", "tensorboard", "wandb"]
    with pytest.raises(ValueError, match=r"unknown logger 'tensorbord' \(accepted, comma-separated: jsonl, "
                                         r"tensorboard, wandb\); did you mean tensorboard\?"):
        RunConfig().override({"train.loggers": "jsonl,tensorbord"})


def test_a_bad_logger_name_on_the_command_line_is_one_error_line_before_any_work(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "RUN"), "--train.loggers", "jsonl,wandbb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longmem train: error: train.loggers: unknown logger 'wandbb'") and err.count("\n") == 1
    assert "did you mean wandb?" in err and not (tmp_path / "RUN").exists()


def test_jsonl_logger_writes_each_event_as_one_line_and_resume_drops_the_later_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricLoggers([JsonlLogger(path)]) as loggers:
        for event in EVENTS:
            loggers.log(event)
    assert path.read_text() == "".join(json.dumps(e) + "\n" for e in EVENTS)      # the file contract of before
    with MetricLoggers([JsonlLogger(path, resume_step=5)]) as loggers:            # resumed from step 5
        loggers.log({"step": 6, "loss": 1.0})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [*EVENTS[:3], {"step": 6, "loss": 1.0}]


def test_tensorboard_logger_event_file_holds_the_scalars_and_resume_hides_the_later_ones(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    for event in EVENTS:
        logger.log(event["step"], {k: v for k, v in event.items() if k != "step"})
    logger.close()
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(got) == ["grad_norm", "loss", "lr", "tokens", "tokens_per_s", "val_loss", "val_ppl", "val_tokens"]
    assert got["loss"] == [(5, 2.5), (10, 2.0)] and got["val_loss"] == [(5, 2.25)]       # no marker event
    resumed = TensorBoardLogger(tmp_path, resume_step=5)       # a resume from step 5: step 10 is logged again
    resumed.log(10, {"loss": 1.5})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(5, 2.5), (10, 1.5)]


@pytest.mark.invariant
def test_a_run_with_tensorboard_logs_the_numbers_of_metrics_jsonl(tmp_path):
    (tmp_path / "corpus.txt").write_text("memory lanes carry the past state across segments. " * 40)
    cfg = RunConfig.load(PRESETS / "tiny.yaml").override({
        "data.path": str(tmp_path / "corpus.txt"), "data.cache": "false", "train.max_steps": "4",
        "train.log_every": "2", "train.eval_every": "2", "train.progress": "false", "train.threads": "1",
        "train.loggers": "jsonl,tensorboard"})
    train(cfg, tmp_path / "RUN")
    rows = [json.loads(line) for line in (tmp_path / "RUN" / "metrics.jsonl").read_text().splitlines()]
    got = tensorboard_scalars(tmp_path / "RUN" / "tensorboard")
    for key in ("loss", "val_loss", "lr"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert len(want) == 2 and [s for s, _ in got[key]] == [s for s, _ in want]
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want], rel=1e-6)     # stored as float32


def test_a_chosen_logger_without_its_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)        # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[tensorboard\]' in the longmem checkout"):
        check_loggers(["jsonl", "tensorboard"])
    with pytest.raises(ValueError, match=r"pip install -e '\.\[wandb\]' in the longmem checkout"):
        check_loggers(["jsonl", "wandb"])
    cfg = RunConfig.load(PRESETS / "tiny.yaml").override({"train.loggers": "jsonl,wandb"})
    with pytest.raises(ValueError, match="wandb"):
        train(cfg, tmp_path / "RUN")                                          # refused before any work
    assert not (tmp_path / "RUN").exists()


def test_wandb_logger_runs_offline_in_the_run_directory_with_the_scalars(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class FakeRun:
        def log(self, values, *, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = RunConfig()
    with MetricLoggers([WandbLogger(tmp_path, config=cfg)]) as loggers:
        for event in EVENTS:
            loggers.log(event)
    (_, kw), *logged, finish = calls
    assert kw["mode"] == "offline" and kw["dir"] == str(tmp_path) and kw["config"] == cfg.to_dict()
    assert logged == [("log", 5, {k: float(v) for k, v in EVENTS[0].items() if k != "step"}),
                      ("log", 5, {k: float(v) for k, v in EVENTS[1].items() if k != "step"}),
                      ("log", 10, {k: float(v) for k, v in EVENTS[3].items() if k != "step"})]
    assert finish == ("finish",)


def test_library_messages_go_through_the_longmem_logger(tmp_path, caplog):
    (tmp_path / "bin.txt").write_bytes(b"text\x00with a NUL byte")
    with caplog.at_level(logging.INFO, logger="longmem"):
        load_documents(tmp_path / "bin.txt")
    assert [(r.name, r.levelname) for r in caplog.records] == [("longmem.data.corpus", "WARNING")]
    assert "binary file" in caplog.records[0].getMessage()


def test_the_cli_shows_library_messages_on_stderr_with_quiet_and_env_controls(monkeypatch, capsys):
    log = logging.getLogger("longmem.data.corpus")
    monkeypatch.delenv("LONGMEM_LOG_LEVEL", raising=False)
    with cli_logging("train"):
        log.info("reading corpus")
        log.warning("odd file")
        log.debug("details")
    assert capsys.readouterr().err == "longmem train: reading corpus\nlongmem train: warning: odd file\n"
    with cli_logging("train", quiet=True):
        log.info("reading corpus")
        log.warning("odd file")
    assert capsys.readouterr().err == "longmem train: warning: odd file\n"
    monkeypatch.setenv("LONGMEM_LOG_LEVEL", "DEBUG")
    with cli_logging("eval"):
        log.debug("details")
    assert capsys.readouterr().err == "longmem eval: debug: details\n"
    monkeypatch.setenv("LONGMEM_LOG_LEVEL", "warn")
    with pytest.raises(ValueError, match="LONGMEM_LOG_LEVEL='warn' .accepted: debug, info, warning, error.; did "
                                         "you mean warning"):
        with cli_logging("eval"):
            pass
    log.warning("after the command")                   # nothing of the CLI's is left on the logger
    assert capsys.readouterr().err == ""


def test_an_old_config_key_warns_once_on_stderr(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "RUN"), "--model.rope_base", "5000", "--train.loggers",
                 "nope"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("longmem train: warning: model.rope_base is the old name of model.rope_theta; use the new one "
                      "(old names will be removed)")
    assert err[1].startswith("longmem train: error: train.loggers") and len(err) == 2
