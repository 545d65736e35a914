"""Where the trainer's metrics go: ``metrics.jsonl`` always, and the trackers named by ``train.loggers``.

- ``jsonl`` (always on): ``RUN/metrics.jsonl``, one JSON object per event, ``step`` first. It is the run-file
  contract: resume truncates it to the checkpoint's step, ``report.md`` and the summary line read it.
- ``tensorboard``: ``RUN/tensorboard/``, one scalar per numeric key at the event's step, through
  ``torch.utils.tensorboard.SummaryWriter`` (extra ``tensorboard``). A resume hides the events logged after
  the checkpoint's step (``purge_step``), as metrics.jsonl drops them.
- ``wandb``: a Weights & Biases run under ``RUN/wandb/`` with the run config (extra ``wandb``), offline unless
  ``WANDB_MODE`` says otherwise (``wandb sync RUN/wandb/offline-run-*`` uploads it). Each start or resume is
  one run.

An event is ``{"step": N, ...}``: a training window (loss, lr, tokens, ...), a validation (``val_*``), or a
marker such as ``{"event": "best", "best_step": N}``, which only jsonl keeps. Only rank 0 of a distributed run
logs (the trainer gives the other ranks no loggers).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from longmem.config import RunConfig
from longmem.runs import METRICS, TENSORBOARD_DIR
from longmem.training.state import truncate_metrics
from longmem.utils import install_hint


class MetricLogger(Protocol):
    """One destination of the trainer's events."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of an event (not booleans) for a tracker of time series; none for a marker event."""
    if "event" in metrics:
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlLogger:
    """``metrics.jsonl``: each event as one JSON line, flushed at once; ``resume_step`` first drops the lines
    logged after that step (the resumed run logs them again)."""

    def __init__(self, path: Path, *, resume_step: int | None = None):
        if resume_step is not None:
            truncate_metrics(path, resume_step)
        self._file = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:                       # torch raises it when the tensorboard package is missing
        raise ValueError(f"train.loggers tensorboard needs the tensorboard package: {install_hint('tensorboard')} "
                         "(or drop tensorboard from train.loggers)") from None
    return SummaryWriter


def _wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise ValueError(f"train.loggers wandb needs the wandb package: {install_hint('wandb')} (or drop "
                         "wandb from train.loggers)") from None
    return wandb


class TensorBoardLogger:
    """The scalars of every event under ``out_dir/tensorboard``, each tagged with its key (``loss``,
    ``val_loss``, ...)."""

    def __init__(self, out_dir: Path, *, resume_step: int | None = None):
        purge = resume_step + 1 if resume_step is not None else None     # events after the checkpoint are hidden
        self._writer = _summary_writer()(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in scalars(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A Weights & Biases run under ``out_dir/wandb`` holding the run config and the scalars of every event;
    offline unless ``WANDB_MODE`` is set, in project ``WANDB_PROJECT`` (default ``longmem``)."""

    def __init__(self, out_dir: Path, *, config: RunConfig):
        # wandb writes into dir/wandb (runs.WANDB_DIR, which a run directory may hold)
        self._run = _wandb().init(dir=str(out_dir), mode=os.environ.get("WANDB_MODE") or "offline",
                                  project=os.environ.get("WANDB_PROJECT") or "longmem", name=out_dir.name,
                                  config=config.to_dict())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = scalars(metrics)
        if values:
            self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


def check_loggers(names: list[str]) -> None:
    """A ValueError naming the pip command for a chosen logger whose package is missing (before any work)."""
    if "tensorboard" in names:
        _summary_writer()
    if "wandb" in names:
        _wandb()


class MetricLoggers:
    """The chosen loggers as one: ``log`` sends an event to each; a context manager that closes them."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    @classmethod
    def open(cls, out_dir: Path, config: RunConfig, *, resume_step: int | None = None) -> MetricLoggers:
        """The loggers of ``config.train.loggers`` writing into the run directory ``out_dir``; ``resume_step``:
        the checkpoint step a resumed run continues from (None: a new run)."""
        loggers: list[MetricLogger] = []
        try:
            for name in config.train.logger_names():
                if name == "jsonl":
                    loggers.append(JsonlLogger(out_dir / METRICS, resume_step=resume_step))
                elif name == "tensorboard":
                    loggers.append(TensorBoardLogger(out_dir, resume_step=resume_step))
                elif name == "wandb":
                    loggers.append(WandbLogger(out_dir, config=config))
        except BaseException:
            cls(loggers).close()
            raise
        return cls(loggers)

    def log(self, event: dict[str, Any]) -> None:
        """Send ``{"step": N, ...}`` to every logger."""
        metrics = {k: v for k, v in event.items() if k != "step"}
        for logger in self.loggers:
            logger.log(event["step"], metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def __enter__(self) -> MetricLoggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
