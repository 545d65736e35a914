"""The training loop: AdamW, warm-up + cosine decay, clipping, ordered lanes with
memory carried across steps, periodic validation, metrics and atomic files."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longmem.config import RunConfig
from longmem.data.corpus import load_documents, split_documents
from longmem.data.stream import TrainStream, encode_documents
from longmem.data.tokenizer import build_tokenizer, save_tokenizer
from longmem.evaluation.perplexity import evaluate_ppl, predicted_chars
from longmem.models import build_model
from longmem.runs import CONFIG, METRICS, TOKENIZER, WEIGHTS
from longmem.training.checkpoint import save_weights
from longmem.utils import progress


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    val: dict
    seconds: float


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress_))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or the (tied) embedding."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: RunConfig, out_dir: str | Path, *, desc: str = "train") -> TrainResult:
    if cfg.model.arch in ("seq2seq", "memn2n"):           # not language models over a stream
        from longmem.training.tasks import train_task
        return train_task(cfg, out_dir, desc=desc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t, d = cfg.train, cfg.data
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)

    train_texts, val_texts = split_documents(load_documents(d.path), val_fraction=d.val_fraction, seed=d.seed)
    tokenizer = build_tokenizer(d.tokenizer, train_texts)
    cfg.model.vocab_size = tokenizer.vocab_size
    train_docs = encode_documents(train_texts, tokenizer)
    val_docs = encode_documents(val_texts, tokenizer)
    val_chars = predicted_chars(val_texts)

    model = build_model(cfg.model)
    cfg.save(out_dir / CONFIG)
    save_tokenizer(tokenizer, out_dir / TOKENIZER)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    stream = TrainStream(train_docs, batch_size=d.batch_size, seg_len=cfg.model.segment_len, seed=d.seed)
    metrics = (out_dir / METRICS).open("a", encoding="utf-8")

    def log(event: dict) -> None:
        metrics.write(json.dumps(event) + "\n")
        metrics.flush()

    def validate(step: int, *, full: bool) -> dict:
        res = evaluate_ppl(model, val_docs, batch_size=d.batch_size, n_chars=val_chars,
                           max_segments=0 if full else t.eval_segments)
        model.train()
        log({"step": step, "val_loss": res["loss"], "val_ppl": res["ppl"], "val_bpc": res["bpc"],
             "val_tokens": res["tokens"]})
        return res

    model.train()
    state, first_loss, loss_sum, n_loss, tokens_seen = None, None, 0.0, 0, 0
    start = time.perf_counter()
    t_log = start
    tokens_since = 0
    val: dict = {}
    bar = progress(total=t.max_steps, desc=desc, enabled=t.progress)
    for step in range(t.max_steps):
        batch = next(stream)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.max_steps)
        out = model(batch.inputs, state=state, targets=batch.targets, reset=batch.reset)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip else None
        opt.step()
        state = out.state.detach()
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step + 1}; lower train.lr or check the data")
        first_loss = loss if first_loss is None else first_loss
        loss_sum, n_loss = loss_sum + loss, n_loss + 1
        n_tok = batch.n_targets
        tokens_seen += n_tok
        tokens_since += n_tok
        bar.update(1)
        if (step + 1) % max(1, t.log_every) == 0 or step + 1 == t.max_steps:
            now = time.perf_counter()
            tps = tokens_since / max(now - t_log, 1e-9)
            avg = loss_sum / n_loss
            log({"step": step + 1, "loss": avg, "lr": opt.param_groups[0]["lr"], "tokens": tokens_seen,
                 "tokens_per_s": tps, **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})})
            bar.set_postfix(loss=f"{avg:.3f}", tok_s=f"{tps:,.0f}")
            loss_sum, n_loss, t_log, tokens_since = 0.0, 0, now, 0
        last = step + 1 == t.max_steps
        if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
            val = validate(step + 1, full=last)
            save_weights(model, out_dir / WEIGHTS)
    bar.close()
    metrics.close()
    return TrainResult(out_dir=out_dir, steps=t.max_steps, first_loss=first_loss, last_loss=loss, val=val,
                       seconds=time.perf_counter() - start)
