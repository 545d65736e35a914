"""The training loop of the task models (``model.arch`` seq2seq and memn2n), which
learn from examples rather than a stream: shuffled mini-batches each epoch, the
same optimizer, schedule, clipping, metrics and run files as the LM trainer.

memn2n on bAbI (Sukhbaatar et al. 2015 §4.2): ``task.linear_start_steps`` first
steps without the softmax in memory (linear start, at ``task.linear_start_lr``;
it ends earlier when the validation loss stops falling, and the learning-rate
schedule starts when it ends), ``task.time_noise`` random empty memories while
training (random noise).

``model.safetensors`` holds the weights of the best validation (lowest mean
error for bAbI, lowest loss for seq2seq), not necessarily the last ones; the
result's ``val`` is that validation and ``metrics.jsonl`` names its step.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from longmem.config import RunConfig
from longmem.data.tasks.babi import babi_batch, babi_texts, encode_babi
from longmem.data.tasks.pairs import BOS, EOS, pairs_batch
from longmem.data.tasks.sources import babi_examples, pair_examples, task_name
from longmem.data.tokenizer import WordTokenizer, build_tokenizer, save_tokenizer
from longmem.evaluation.qa import evaluate_babi, evaluate_pairs
from longmem.models import build_model
from longmem.runs import CONFIG, METRICS, TOKENIZER, WEIGHTS
from longmem.training.checkpoint import save_weights
from longmem.training.optim import build_optimizer, lr_at
from longmem.training.trainer import TrainResult
from longmem.utils import check_memory_fits, progress

VAL_PAIRS = 256          # decoding is slow: periodic seq2seq validation reads at most this many pairs


def _epochs(n: int, *, batch_size: int, seed: int):
    """Endless index batches: every example once per epoch, in a new seeded order each epoch."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]
        epoch += 1


def train_task(cfg: RunConfig, out_dir: str | Path, *, desc: str = "train") -> TrainResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t, d = cfg.train, cfg.data
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    noise_rng = random.Random(t.seed)
    name = task_name(cfg)

    if name == "babi":
        train_ex, val_ex = babi_examples(cfg, "train"), babi_examples(cfg, "val")
        tokenizer = WordTokenizer.fit(babi_texts(train_ex))
        train_data, val_data = encode_babi(train_ex, tokenizer), encode_babi(val_ex, tokenizer)
        n_train = len(train_data)

        def make_batch(idx):
            return babi_batch(train_data, idx, memory_size=cfg.model.memory_size, noise=cfg.task.time_noise,
                              rng=noise_rng)

        def loss_of(model, batch, linear):
            return model(**batch, linear=linear).loss

        def validate(model) -> dict:
            res = evaluate_babi(model, val_data)
            return {"loss": res["loss"], "ppl": math.exp(res["loss"]), "accuracy": res["accuracy"],
                    "mean_error": res["mean_error"]}

        def linear_val_loss(model) -> float:               # the loss linear start is judged by
            return evaluate_babi(model, val_data, linear=True)["loss"]

        def score(val: dict) -> tuple:                  # lower is better
            return val["mean_error"], val["loss"]
    else:
        train_pairs, val_pairs = pair_examples(cfg, "train"), pair_examples(cfg, "val")
        tokenizer = build_tokenizer(d.tokenizer, [p.source + p.target for p in train_pairs] + [BOS + EOS])
        n_train = len(train_pairs)

        def make_batch(idx):
            return pairs_batch([train_pairs[i] for i in idx], tokenizer)

        def loss_of(model, batch, linear):
            return model(**batch).loss

        def validate(model) -> dict:
            res = evaluate_pairs(model, tokenizer, val_pairs[:VAL_PAIRS])
            return {k: res[k] for k in ("loss", "ppl", "exact_match", "token_f1", "bleu", "rouge_l")}

        def score(val: dict) -> tuple:
            return (val["loss"],)

    cfg.model.vocab_size = tokenizer.vocab_size
    check_memory_fits(cfg.model, batch_size=d.batch_size, device=torch.device("cpu"), training=True)
    model = build_model(cfg.model)
    cfg.save(out_dir / CONFIG)
    save_tokenizer(tokenizer, out_dir / TOKENIZER)
    opt = build_optimizer(model, t)
    batches = _epochs(n_train, batch_size=d.batch_size, seed=d.seed)
    metrics = (out_dir / METRICS).open("a", encoding="utf-8")

    def log(event: dict) -> None:
        metrics.write(json.dumps(event) + "\n")
        metrics.flush()

    model.train()
    first_loss, loss_sum, n_loss, seen, t_log = None, 0.0, 0, 0, time.perf_counter()
    start, val, best, avg = t_log, {}, None, float("nan")
    # linear start (memn2n): steps [0, ls_end) without the softmax; the schedule counts from ls_end
    ls_end = min(cfg.task.linear_start_steps, t.max_steps) if name == "babi" else 0
    ls_lr, ls_val_loss, ls_bad = cfg.task.linear_start_lr or t.lr, None, 0
    bar = progress(total=t.max_steps, desc=desc, enabled=t.progress)
    for step in range(t.max_steps):
        idx = next(batches)
        batch = make_batch(idx)
        linear = step < ls_end
        if linear:
            lr = lr_at(step, lr=ls_lr, min_lr=ls_lr, warmup=t.warmup_steps, total=ls_end)
        else:
            lr = lr_at(step - ls_end, lr=t.lr, min_lr=t.min_lr, warmup=0 if ls_end else t.warmup_steps,
                       total=t.max_steps - ls_end, halve_every=t.lr_halve_every)
        for g in opt.param_groups:
            g["lr"] = lr
        out_loss = loss_of(model, batch, linear)
        opt.zero_grad(set_to_none=True)
        out_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip else None
        opt.step()
        loss = out_loss.item()
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step + 1}; lower train.lr or check the data")
        loss_sum, n_loss, seen = loss_sum + loss, n_loss + 1, seen + len(idx)
        bar.update(1)
        if (step + 1) % max(1, t.log_every) == 0 or step + 1 == t.max_steps:
            now = time.perf_counter()
            avg = loss_sum / n_loss
            first_loss = avg if first_loss is None else first_loss
            log({"step": step + 1, "loss": avg, "lr": opt.param_groups[0]["lr"], "examples": seen,
                 "examples_per_s": n_loss * d.batch_size / max(now - t_log, 1e-9),
                 **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})})
            bar.set_postfix(loss=f"{avg:.3f}")
            loss_sum, n_loss, t_log = 0.0, 0, now
        if (t.eval_every and (step + 1) % t.eval_every == 0) or step + 1 == t.max_steps:
            res = validate(model)
            model.train()
            log({"step": step + 1, **{f"val_{k}": v for k, v in res.items()}})
            if best is None or score(res) < score(best):
                best, val = {"step": step + 1, **res}, res
                save_weights(model, out_dir / WEIGHTS)
                log({"step": step + 1, "event": "best", "best_step": step + 1})
            if linear:
                ls_loss = linear_val_loss(model)
                model.train()
                log({"step": step + 1, "val_linear_loss": ls_loss})
                ls_bad = ls_bad + 1 if ls_val_loss is not None and ls_loss >= ls_val_loss else 0
                patience = cfg.task.linear_start_patience
                if patience and ls_bad >= patience:                          # stopped falling: softmax back
                    ls_end = step + 1
                    log({"step": step + 1, "event": "linear_start_end"})
                ls_val_loss = ls_loss if ls_val_loss is None else min(ls_val_loss, ls_loss)
    bar.close()
    metrics.close()
    return TrainResult(out_dir=out_dir, steps=t.max_steps, first_loss=first_loss, last_loss=avg, val=val,
                       seconds=time.perf_counter() - start)
