"""What the one training loop trains on: the task protocol, and the language-model task.

The trainer (``trainer.py``) owns the loop: optimizer and schedule, clipping and accumulation, mixed
precision, DDP, checkpoints and exact resume, validation cadence, early stopping, signals and logs. A
:class:`Task` owns everything about its data and its loss:

- ``tokenizer`` and ``logged`` (the validation keys written to ``metrics.jsonl`` as ``val_*``);
- ``window(step)``: the micro-batch of one step (a language model: ``train.bptt_at(step)`` consecutive
  batches of its ordered lanes, the graph kept through the memory), with ``counts`` (targets, inputs);
- ``loss(model, window, state, ...)``: the summed training loss of the window and the state after it
  (``carries_state``: the model's memory flows from step to step; the trainer detaches it);
- ``validate(model, full=...)`` (a dict with ``loss``), ``score`` (lower is better: which validation is
  the best) and ``after_validation`` (e.g. MemN2N's linear start ends here);
- ``lr(step)``: the learning rate (the trainer's schedule unless the task has phases of its own);
- ``data_state()`` / ``join_data`` / ``load_data``: the data position for exact resume (per lane for a
  language model, gathered from every rank).

``make_task`` builds the task of a run config: the language-model task here, or a baseline's
(``longmem.classic`` registers its example tasks with :func:`register_task`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from longmem.config import RunConfig
from longmem.data.cache import cache_dir_for
from longmem.data.corpus import load_corpus, split_documents
from longmem.data.stream import TaskStream, TrainStream, encode_documents, n_eval_batches
from longmem.data.tasks.sources import probe_fit_texts, probe_maker, task_name
from longmem.data.tokenizer import build_tokenizer, load_tokenizer
from longmem.evaluation.perplexity import evaluate_ppl, predicted_chars
from longmem.evaluation.probes import n_segments, score_probes, summarize
from longmem.models import IGNORE_INDEX
from longmem.models.memory import State
from longmem.training.optim import lr_at
from longmem.training.precision import autocast
from longmem.utils import progress


class Task:
    """The protocol (see the module docstring); defaults fit most tasks."""
    tokenizer: Any
    logged: tuple[str, ...] = ("loss",)
    carries_state: bool = False           # the model's memory flows from step to step (ordered lanes)
    keep_best: bool = False               # model.safetensors ends with the best validation's weights
    units: str = "tokens"                 # what metrics.jsonl counts: "tokens" or "examples"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def lr(self, step: int) -> float:
        t = self.cfg.train
        return lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.max_steps,
                     halve_every=t.lr_halve_every)

    def score(self, val: dict) -> tuple:
        return (val["loss"],)

    def after_validation(self, step: int, val: dict, model, log: Callable[[dict], None]) -> None:
        pass

    def window(self, step: int) -> list:
        raise NotImplementedError

    def counts(self, window: list) -> tuple[int, int]:
        raise NotImplementedError

    def loss(self, model, window: list, state, *, step: int, device, amp_dtype) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def validate(self, model, *, full: bool) -> dict:
        raise NotImplementedError

    def data_state(self) -> Any:
        raise NotImplementedError

    def join_data(self, per_rank: list) -> Any:
        return per_rank[0]

    def load_data(self, saved: Any, lanes: range) -> None:
        raise NotImplementedError


def forward_window(model, batches: list, state: State | None, *, device, amp_dtype,
                   checkpoint: bool = False, aux_weight: float = 0.0) -> tuple[torch.Tensor, State | None]:
    """Run consecutive segments of the lanes with the graph kept through the memory: backpropagation
    through segments (Bulatov et al. 2022 §3). Returns the summed cross-entropy over the targets of
    all ``batches`` (plus ``aux_weight`` times the memories' auxiliary loss, ``LMOutput.aux_loss``)
    and the state after the last one (not detached: the caller truncates).

    ``checkpoint`` recomputes each segment's activations in the backward pass (activation
    checkpointing), so the memory held grows with the window only by the segments' inputs and states.
    """
    total = torch.zeros((), device=device)
    for batch in batches:
        inputs, reset = batch.inputs.to(device), batch.reset.to(device)
        with autocast(device, amp_dtype):
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(model, inputs, state=state, reset=reset, use_reentrant=False)
            else:
                out = model(inputs, state=state, reset=reset)
        total = total + F.cross_entropy(out.logits.float().flatten(0, 1), batch.targets.to(device).flatten(),
                                        ignore_index=IGNORE_INDEX, reduction="sum")
        if aux_weight and getattr(out, "aux_loss", None) is not None:   # a regularizer of the memory (a sum too)
            total = total + aux_weight * out.aux_loss.float()
        state = out.state
    return total, state


def validation_bar(total: int, limit: int, *, enabled: bool):
    """A progress bar for a validation that reads the whole split (``limit`` 0); a capped one is short."""
    return progress(total=total, desc="validate", enabled=enabled and not limit, unit="seg")


class StreamTask(Task):
    """A language model over ordered lanes: its corpus split by document and seeded, or a probe task
    (passkey, recall, babi, haystack; the loss on answer tokens only). The memory is carried from step
    to step; a step reads ``train.bptt_at(step)`` consecutive batches (backpropagation through segments),
    with a curriculum growing the probes' examples. On resume the saved tokenizer is reused."""
    carries_state = True

    def __init__(self, cfg: RunConfig, out_dir: Path, *, resume: bool, lanes: range, tokenizer=None):
        super().__init__(cfg)
        d, t = cfg.data, cfg.train
        name = task_name(cfg)
        if name == "lm":
            train_texts, val_texts = split_documents(load_corpus(d), val_fraction=d.val_fraction, seed=d.seed)
        if tokenizer is not None:                                      # a pretrained model's (train.init_from)
            self.tokenizer = tokenizer
        elif resume:
            self.tokenizer = load_tokenizer(out_dir / "tokenizer.json")
        else:
            self.tokenizer = build_tokenizer(d.tokenizer, train_texts if name == "lm" else probe_fit_texts(cfg),
                                             vocab_size=d.vocab_size)
        seg_len = cfg.model.segment_len
        if name == "lm":
            cache = cache_dir_for(d.path) if d.cache and d.path else None
            self.stream: TrainStream | TaskStream = TrainStream(
                encode_documents(train_texts, self.tokenizer, cache_dir=cache), batch_size=d.batch_size,
                seg_len=seg_len, seed=d.seed, lanes=lanes)
            val_docs = encode_documents(val_texts, self.tokenizer, cache_dir=cache)
            n_chars = predicted_chars(val_texts)

            def validate(model, *, full: bool) -> dict:
                limit = 0 if full else t.eval_segments
                with validation_bar(n_eval_batches(val_docs, batch_size=d.batch_size, seg_len=seg_len), limit,
                                    enabled=t.progress) as bar:
                    return evaluate_ppl(model, val_docs, batch_size=d.batch_size, n_chars=n_chars,
                                        max_segments=limit, progress_bar=bar)
            self.logged = ("loss", "ppl", "bpc", "tokens")
        else:
            make_train, make_val = probe_maker(cfg, self.tokenizer, "train"), probe_maker(cfg, self.tokenizer, "val")
            val_probes = [make_val(i, cfg.task.length) for i in range(cfg.task.n_test)]

            def validate(model, *, full: bool) -> dict:
                with validation_bar(n_segments(val_probes, model, batch_size=d.batch_size), 0,
                                    enabled=t.progress) as bar:
                    res = summarize(score_probes(model, val_probes, batch_size=d.batch_size, progress_bar=bar))
                return {"loss": res["answer_loss"], "ppl": math.exp(min(res["answer_loss"], 50.0)), **res}
            self.stream = TaskStream(lambda index, length: make_train(index, length).as_doc(),
                                     batch_size=d.batch_size, seg_len=seg_len, length=cfg.task.length, lanes=lanes)
            self.logged = ("loss", "ppl", "accuracy", "answers")
        self._validate = validate

    def window(self, step: int) -> list:
        t = self.cfg.train
        if t.curriculum and isinstance(self.stream, TaskStream):         # examples grow stage by stage
            self.stream.length = t.segments_at(step) * self.cfg.model.segment_len
        return [next(self.stream) for _ in range(t.bptt_at(step))]      # segments whose graph is kept together

    def counts(self, window: list) -> tuple[int, int]:
        return sum(b.n_targets for b in window), sum(b.n_inputs for b in window)

    def loss(self, model, window: list, state, *, step: int, device, amp_dtype):
        t = self.cfg.train
        return forward_window(model, window, state, device=device, amp_dtype=amp_dtype, checkpoint=t.bptt_checkpoint,
                              aux_weight=t.aux_weight if step >= t.aux_start else 0.0)

    def validate(self, model, *, full: bool) -> dict:
        return self._validate(model, full=full)

    def data_state(self) -> list:
        return self.stream.state_dict()["positions"]

    def join_data(self, per_rank: list) -> list:
        return [p for positions in per_rank for p in positions]          # lanes in global order

    def load_data(self, saved: list, lanes: range) -> None:
        self.stream.load_positions(saved[lanes.start:lanes.stop])


# model.arch -> factory(cfg, out_dir, *, resume, lanes, tokenizer) of its task; language models: StreamTask
TASKS: dict[str, Callable[..., Task]] = {}


def register_task(arch: str, factory: Callable[..., Task]) -> None:
    """Make runs of ``model.arch: arch`` train on ``factory(cfg, out_dir, resume=..., lanes=..., tokenizer=...)``."""
    TASKS[arch] = factory


def make_task(cfg: RunConfig, out_dir: Path, *, resume: bool, lanes: range, tokenizer=None) -> Task:
    """The task a run config trains on (its architecture's, else the language-model task)."""
    factory = TASKS.get(cfg.model.arch, StreamTask)
    return factory(cfg, out_dir, resume=resume, lanes=lanes, tokenizer=tokenizer)
