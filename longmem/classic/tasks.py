"""The training tasks of the baselines that learn from examples rather than a stream (``model.arch`` memn2n,
seq2seq), for the one training loop (``training/task.py``): shuffled mini-batches each epoch, the data
position (epoch, batch) saved for exact resume. lstm, ntm and dnc on the bit-vector tasks of the Neural Turing
Machine paper: ``SequenceTask``, fresh random examples every step.

memn2n on bAbI (Sukhbaatar et al. 2015 §4.2): ``task.linear_start_steps`` first steps without the
softmax in memory (linear start, at ``task.linear_start_lr``; it ends earlier when the validation loss
read without the softmax stops falling, and the learning-rate schedule starts when it ends),
``task.time_noise`` random empty memories while training (random noise).

Both keep the best validation's weights in ``model.safetensors`` (lowest mean error for bAbI, lowest
loss for seq2seq); ``metrics.jsonl`` names its step.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from longmem.classic.bits import bit_loss
from longmem.classic.pairs import BOS, EOS, pair_examples, pairs_batch
from longmem.classic.qa import evaluate_babi, evaluate_pairs, evaluate_sequences
from longmem.config import RunConfig
from longmem.data.tasks.algorithmic import pad_examples, sequence_maker
from longmem.data.tasks.babi import babi_batch, babi_texts, encode_babi
from longmem.data.tasks.sources import babi_examples, task_name
from longmem.data.tokenizer import BitsTokenizer, WordTokenizer, build_tokenizer, load_tokenizer
from longmem.models import IGNORE_INDEX
from longmem.training.optim import lr_at
from longmem.training.task import Task

VAL_PAIRS = 256          # decoding is slow: periodic seq2seq validation reads at most this many pairs


class Epochs:
    """Endless index batches: every example once per epoch, in a new seeded order each epoch; ``lanes``
    picks this rank's part of each batch (DDP). ``state_dict`` is the position (epoch, batch)."""

    def __init__(self, n: int, *, batch_size: int, seed: int, lanes: range):
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed, self.lanes = n, batch_size, seed, lanes
        self.epoch, self.batch = 0, 0

    def __next__(self) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        start = self.batch * self.batch_size
        idx = order[start:start + self.batch_size]
        self.batch += 1
        if self.batch * self.batch_size >= self.n:
            self.epoch, self.batch = self.epoch + 1, 0
        return idx[self.lanes.start:self.lanes.stop]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batch = int(d["epoch"]), int(d["batch"])


class _ExampleTask(Task):
    keep_best = True
    units = "examples"

    def counts(self, window: list) -> tuple[int, int]:
        return sum(b["_targets"] for b in window), sum(b["_examples"] for b in window)

    def data_state(self) -> dict:
        return {"epochs": self.batches.state_dict()}

    def load_data(self, saved: dict, lanes: range) -> None:
        self.batches.load_state_dict(saved["epochs"])


class BabiTask(_ExampleTask):
    """MemN2N answering bAbI questions, with linear start and random noise (see the module docstring)."""
    logged = ("loss", "ppl", "accuracy", "mean_error")

    def __init__(self, cfg: RunConfig, out_dir: Path, *, resume: bool, lanes: range, tokenizer=None):
        super().__init__(cfg)
        train_ex, val_ex = babi_examples(cfg, "train"), babi_examples(cfg, "val")
        self.tokenizer = (load_tokenizer(out_dir / "tokenizer.json") if resume
                          else tokenizer or WordTokenizer.fit(babi_texts(train_ex)))
        self.train_data, self.val_data = encode_babi(train_ex, self.tokenizer), encode_babi(val_ex, self.tokenizer)
        self.batches = Epochs(len(self.train_data), batch_size=cfg.data.batch_size, seed=cfg.data.seed, lanes=lanes)
        self.noise = random.Random(cfg.train.seed)
        t = cfg.task
        # linear start: steps [0, ls_end) without the softmax; the schedule counts from ls_end
        self.ls_end = min(t.linear_start_steps, cfg.train.max_steps)
        self.ls_val_loss: float | None = None
        self.ls_bad = 0

    def lr(self, step: int) -> float:
        t = self.cfg.train
        if step < self.ls_end:
            ls_lr = self.cfg.task.linear_start_lr or t.lr
            return lr_at(step, lr=ls_lr, min_lr=ls_lr, warmup=t.warmup_steps, total=self.ls_end)
        return lr_at(step - self.ls_end, lr=t.lr, min_lr=t.min_lr, warmup=0 if self.ls_end else t.warmup_steps,
                     total=t.max_steps - self.ls_end, halve_every=t.lr_halve_every)

    def window(self, step: int) -> list:
        idx = next(self.batches)
        batch = babi_batch(self.train_data, idx, memory_size=self.cfg.model.memory_size,
                           noise=self.cfg.task.time_noise, rng=self.noise)
        return [{**batch, "_linear": step < self.ls_end, "_targets": len(idx), "_examples": len(idx)}]

    def loss(self, model, window: list, state, *, step: int, device, amp_dtype):
        total = torch.zeros((), device=device)
        for b in window:
            inputs = {k: v.to(device) for k, v in b.items() if not k.startswith("_")}
            answer = inputs.pop("answer")
            out = model(**inputs, linear=b["_linear"])
            total = total + F.cross_entropy(out.logits.float(), answer, reduction="sum")
        return total, None

    def validate(self, model, *, full: bool) -> dict:
        res = evaluate_babi(model, self.val_data)
        return {"loss": res["loss"], "ppl": math.exp(res["loss"]), "accuracy": res["accuracy"],
                "mean_error": res["mean_error"]}

    def score(self, val: dict) -> tuple:
        return val["mean_error"], val["loss"]

    def after_validation(self, step: int, val: dict, model, log) -> None:
        """During linear start: the validation loss read without the softmax, and the end of linear start
        when it stops falling for ``task.linear_start_patience`` validations (0: never early)."""
        if step - 1 >= self.ls_end:                                   # the step just done was not linear
            return
        loss = evaluate_babi(model, self.val_data, linear=True)["loss"]
        model.train()
        log({"step": step, "val_linear_loss": loss})
        self.ls_bad = self.ls_bad + 1 if self.ls_val_loss is not None and loss >= self.ls_val_loss else 0
        patience = self.cfg.task.linear_start_patience
        if patience and self.ls_bad >= patience:                     # stopped falling: the softmax back
            self.ls_end = step
            log({"step": step, "event": "linear_start_end"})
        self.ls_val_loss = loss if self.ls_val_loss is None else min(self.ls_val_loss, loss)

    def data_state(self) -> dict:
        noise = self.noise.getstate()
        return {**super().data_state(), "noise": [noise[0], list(noise[1]), noise[2]], "ls_end": self.ls_end,
                "ls_val_loss": self.ls_val_loss, "ls_bad": self.ls_bad}

    def load_data(self, saved: dict, lanes: range) -> None:
        super().load_data(saved, lanes)
        version, internal, gauss = saved["noise"]
        self.noise.setstate((version, tuple(internal), gauss))
        self.ls_end, self.ls_val_loss, self.ls_bad = saved["ls_end"], saved["ls_val_loss"], saved["ls_bad"]


class PairsTask(_ExampleTask):
    """The encoder-decoder on source -> target pairs (a .jsonl file, or generated copy / passage)."""
    logged = ("loss", "ppl", "exact_match", "token_f1", "bleu", "rouge_l")

    def __init__(self, cfg: RunConfig, out_dir: Path, *, resume: bool, lanes: range, tokenizer=None):
        super().__init__(cfg)
        self.train_pairs, self.val_pairs = pair_examples(cfg, "train"), pair_examples(cfg, "val")
        if resume:
            self.tokenizer = load_tokenizer(out_dir / "tokenizer.json")
        else:
            self.tokenizer = tokenizer or build_tokenizer(
                cfg.data.tokenizer, [p.source + p.target for p in self.train_pairs] + [BOS + EOS],
                vocab_size=cfg.data.vocab_size)
        self.batches = Epochs(len(self.train_pairs), batch_size=cfg.data.batch_size, seed=cfg.data.seed, lanes=lanes)

    def window(self, step: int) -> list:
        idx = next(self.batches)
        batch = pairs_batch([self.train_pairs[i] for i in idx], self.tokenizer)
        return [{**batch, "_targets": int((batch["targets"] != IGNORE_INDEX).sum()), "_examples": len(idx)}]

    def loss(self, model, window: list, state, *, step: int, device, amp_dtype):
        total = torch.zeros((), device=device)
        for b in window:
            inputs = {k: v.to(device) for k, v in b.items() if not k.startswith("_")}
            targets = inputs.pop("targets")
            out = model(**inputs)
            total = total + F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
        return total, None

    def validate(self, model, *, full: bool) -> dict:
        res = evaluate_pairs(model, self.tokenizer, self.val_pairs[:VAL_PAIRS])
        return {k: res[k] for k in self.logged}


class SequenceTask(Task):
    """The recurrent baselines (lstm, ntm, dnc) on the bit-vector tasks of Graves et al. 2014 §4 (copy,
    repeat_copy, associative_recall; ``data/tasks/algorithmic.py``): every step a fresh batch of random
    examples (``task.min_len``..``task.max_len`` vectors or items), each read from a new state (the memory
    is reset per example), the loss bitwise cross-entropy on the output phase only. The data position is
    the number of examples drawn; validation reads ``task.n_test`` examples of the validation seed."""
    logged = ("loss", "bit_errors", "bit_error_rate")
    keep_best = True
    units = "examples"

    def __init__(self, cfg: RunConfig, out_dir: Path, *, resume: bool, lanes: range, tokenizer=None):
        super().__init__(cfg)
        t = cfg.task
        self.name = task_name(cfg)
        if self.name == "associative_recall" and t.min_len < 2:
            raise ValueError(f"associative_recall needs at least 2 items: set task.min_len >= 2 (the paper: 2..6), "
                             f"got {t.min_len}")
        self.tokenizer = load_tokenizer(out_dir / "tokenizer.json") if resume else BitsTokenizer(t.bits)
        if not isinstance(self.tokenizer, BitsTokenizer):
            raise ValueError(f"task.name={self.name} reads bit vectors; {out_dir} has a {self.tokenizer.kind} "
                             f"tokenizer")
        cfg.model.bits = self.tokenizer.width                          # the model reads and writes bits
        self.make = sequence_maker(self.name, self.tokenizer, split="train", seed=cfg.data.seed, min_len=t.min_len,
                                   max_len=t.max_len, max_repeats=t.max_repeats)
        make_val = sequence_maker(self.name, self.tokenizer, split="val", seed=cfg.data.seed, min_len=t.min_len,
                                  max_len=t.max_len, max_repeats=t.max_repeats)
        self.val = [make_val(i) for i in range(t.n_test)]
        self.lanes, self.drawn = lanes, 0

    def window(self, step: int) -> list:
        B = self.cfg.data.batch_size
        idx = range(self.drawn + self.lanes.start, self.drawn + self.lanes.stop)
        self.drawn += B
        inputs, targets = pad_examples([self.make(i) for i in idx], pad=self.tokenizer.ids[self.tokenizer.BLANK])
        return [{"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
                 "_targets": int((targets != IGNORE_INDEX).sum()), "_examples": len(idx)}]

    def counts(self, window: list) -> tuple[int, int]:
        return sum(b["_targets"] for b in window), sum(b["_examples"] for b in window)

    def loss(self, model, window: list, state, *, step: int, device, amp_dtype):
        total = torch.zeros((), device=device)
        for b in window:
            out = model(b["inputs"].to(device))                       # a new state per example
            total = total + bit_loss(out.logits, *model_embed(model).target_bits(b["targets"].to(device)),
                                     reduction="sum")
        return total, None

    def validate(self, model, *, full: bool) -> dict:
        res = evaluate_sequences(model, self.val, pad=self.tokenizer.ids[self.tokenizer.BLANK])
        return {k: res[k] for k in self.logged}

    def score(self, val: dict) -> tuple:
        return val["bit_errors"], val["loss"]

    def data_state(self) -> dict:
        return {"drawn": self.drawn}

    def load_data(self, saved: dict, lanes: range) -> None:
        self.drawn = int(saved["drawn"])


def model_embed(model):
    """The bit embedding of ``model`` (unwrapping DistributedDataParallel)."""
    return getattr(model, "module", model).embed
