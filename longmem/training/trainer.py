"""The training loop.

AdamW (decay on matrices only) or SGD, warm-up + cosine decay (or halving steps), gradient clipping and
accumulation, mixed precision (autocast in the loop only), ordered lanes with
the memory carried across steps, periodic validation with the memory carried
across validation segments, early stopping, checkpoints for exact resume,
SIGINT/SIGTERM handling, and DistributedDataParallel under ``torchrun``.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from longmem.config import RunConfig
from longmem.data.cache import cache_dir_for
from longmem.data.corpus import load_corpus, split_documents
from longmem.data.stream import TaskStream, TrainStream, encode_documents, n_eval_batches
from longmem.data.tasks.sources import probe_fit_texts, probe_maker, task_name
from longmem.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from longmem.evaluation.perplexity import evaluate_ppl, predicted_chars
from longmem.evaluation.probes import n_segments, score_probes, summarize
from longmem.models import IGNORE_INDEX, build_model
from longmem.models.memory import State
from longmem.runs import CONFIG, METRICS, TOKENIZER
from longmem.training import distributed as D
from longmem.training import state as S
from longmem.training.checkpoint import load_weights
from longmem.training.optim import build_optimizer, lr_at
from longmem.training.precision import autocast, resolve_device, resolve_precision
from longmem.utils import check_memory_fits, progress


class TrainingStopped(RuntimeError):
    """The run stopped before max_steps (a signal or a diverged loss); a checkpoint tells where. ``signum``:
    the signal that stopped it (None for a diverged loss)."""

    def __init__(self, message: str, *, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    first_loss: float           # the first and last training loss of metrics.jsonl (and report.md): the mean per
    last_loss: float            # target token over a train.log_every window
    val: dict
    seconds: float
    stopped_early: bool = False


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops at the end of the step."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:                      # a second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, desc: str = "train") -> TrainResult:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its newest checkpoint."""
    if cfg.model.arch in ("seq2seq", "memn2n"):           # not language models over a stream
        if resume:
            raise ValueError(f"--resume is not supported yet for model.arch={cfg.model.arch} (task training); "
                             f"train again instead")
        from longmem.training.tasks import train_task
        return train_task(cfg, out_dir, desc=desc)
    out_dir = Path(out_dir)
    t, d = cfg.train, cfg.data
    device = resolve_device(t.device)
    dist = D.init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    amp_dtype = resolve_precision(t.precision, device)
    if t.threads:
        torch.set_num_threads(t.threads)
    ckpt = S.latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"{out_dir} has no checkpoint to resume from (no {S.CKPT_DIR}/step-*)")

    lanes = D.lane_slice(d.batch_size, dist)
    data = _data(cfg, out_dir, resume=resume, lanes=lanes)
    tokenizer, stream = data.tokenizer, data.stream
    cfg.model.vocab_size = tokenizer.vocab_size

    check_memory_fits(cfg.model, batch_size=len(lanes), device=device, training=True)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    if dist.main and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / CONFIG)
        save_tokenizer(tokenizer, out_dir / TOKENIZER)
    torch.manual_seed(t.seed + 1 + dist.rank)            # dropout masks differ per rank
    opt = build_optimizer(model, t, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    state: State | None = None
    info = {"tokens_seen": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0,
            "loss_window": [0.0, 0]}          # the unlogged part of the running loss: a resume continues it
    start_step = 0
    if ckpt is not None:
        start_step, state, info = _resume(ckpt, model=model, opt=opt, scaler=scaler, stream=stream, lanes=lanes,
                                          dist=dist, device=device)
        if dist.main:
            S.truncate_metrics(out_dir / METRICS, start_step)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model

    metrics = (out_dir / METRICS).open("a", encoding="utf-8") if dist.main else None

    def log(event: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(event) + "\n")
            metrics.flush()

    def validate(step: int, *, full: bool) -> dict:
        res = {}
        if dist.main:
            res = data.validate(model, full=full)
            log({"step": step, **{f"val_{k}": res[k] for k in data.logged}})
        model.train()
        return D.broadcast_object(res, dist)

    def checkpoint(step: int, *, best: bool) -> Path:
        info["loss_window"] = [loss_sum, n_loss]
        mem = state.state_dict() if state is not None else {}
        gathered = D.all_gather_objects({"data": stream.state_dict()["positions"], "rng": S.capture_rng(),
                                         "memory": {k: v.cpu() for k, v in mem.items()}}, dist)
        path = S.latest_checkpoint(out_dir)
        if dist.main:
            path = S.save_checkpoint(
                out_dir, step=step, model=model, optimizer=opt,
                scaler_state=scaler.state_dict() if scaler is not None else None, info=info,
                data=[p for g in gathered for p in g["data"]],
                memory=S.concat_lane_states([g["memory"] for g in gathered]) if mem else {},
                rng=[g["rng"] for g in gathered], keep_last=t.keep_last, best=best)
        D.barrier(dist)
        return out_dir / S.CKPT_DIR / f"step-{step:08d}"

    model.train()
    loss_sum, n_loss = info["loss_window"]
    tokens_since = 0
    val: dict = {}
    stopped_early = False
    done = start_step
    start = t_log = time.perf_counter()
    bar = progress(total=t.max_steps, desc=desc, enabled=t.progress and dist.main)
    bar.update(start_step)
    with _StopSignal() as stop:
        for step in range(start_step, t.max_steps):
            lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.max_steps,
                       halve_every=t.lr_halve_every)
            for g in opt.param_groups:
                g["lr"] = lr
            if t.curriculum and isinstance(stream, TaskStream):  # examples grow stage by stage
                stream.length = t.segments_at(step) * cfg.model.segment_len
            window = t.bptt_at(step)                             # segments whose graph is kept together
            micro = [[next(stream) for _ in range(window)] for _ in range(t.grad_accum)]
            n_local = sum(b.n_targets for batches in micro for b in batches)
            n_global = D.all_sum(n_local, dist, device)         # normalize by the global target count
            n_inputs = D.all_sum(sum(b.n_inputs for batches in micro for b in batches), dist, device)
            step_loss = 0.0
            for i, batches in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = ddp.no_sync() if dist.enabled and not sync else contextlib.nullcontext()
                with ctx:
                    loss_sum_micro, state = forward_window(ddp, batches, state, device=device, amp_dtype=amp_dtype,
                                                           checkpoint=t.bptt_checkpoint,
                                                           aux_weight=t.aux_weight if step >= t.aux_start else 0.0)
                    loss = loss_sum_micro * dist.world / max(n_global, 1.0)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                state = state.detach()                          # truncated: nothing flows beyond the window
                step_loss += loss_sum_micro.item()
            if scaler is not None:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip else None
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            loss_value = D.all_sum(step_loss, dist, device) / max(n_global, 1.0)
            if not math.isfinite(loss_value):
                last_good = S.latest_checkpoint(out_dir)
                raise TrainingStopped(
                    f"the loss became {loss_value} at step {step + 1}; the last good checkpoint is "
                    f"{last_good or 'none (no checkpoint was saved yet)'}. Lower train.lr, raise "
                    f"train.warmup_steps or use train.precision fp32, then resume or restart.")
            loss_sum, n_loss = loss_sum + loss_value * n_global, n_loss + n_global
            info["tokens_seen"] += int(n_inputs)
            tokens_since += n_inputs
            bar.update(1)
            done = step + 1
            if done % max(1, t.log_every) == 0 or done == t.max_steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_log, 1e-9)
                avg = loss_sum / n_loss if n_loss else float("nan")       # per target token
                log({"step": done, "loss": avg, "lr": lr, "tokens": info["tokens_seen"], "tokens_per_s": tps,
                     **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})})
                bar.set_postfix(loss=f"{avg:.3f}", tok_s=f"{tps:,.0f}")
                loss_sum, n_loss, t_log, tokens_since = 0.0, 0, now, 0
            last = done == t.max_steps
            is_best = False
            if (t.eval_every and done % t.eval_every == 0) or last:
                val = validate(done, full=last)
                best = info["best_val_loss"]
                if best is None or val["loss"] < best:
                    info.update(best_val_loss=val["loss"], best_step=done, bad_evals=0)
                    is_best = True
                else:
                    info["bad_evals"] += 1
                stopped_early = bool(t.patience) and info["bad_evals"] >= t.patience
            interrupted = D.all_sum(float(stop.signum is not None), dist, device) > 0
            if (is_best or last or stopped_early or interrupted
                    or (t.checkpoint_every and done % t.checkpoint_every == 0)
                    or (t.eval_every and done % t.eval_every == 0)):
                path = checkpoint(done, best=is_best)
            if interrupted:
                bar.close()
                raise TrainingStopped(f"interrupted at step {done}; saved {path}. "
                                      f"Continue with: longmem train --resume {out_dir}", signum=stop.signum)
            if stopped_early:
                log({"step": done, "event": "early_stop", "best_step": info["best_step"],
                     "best_val_loss": info["best_val_loss"]})
                break
    bar.close()
    if metrics is not None:
        metrics.close()
    logged = []
    if dist.main:
        from longmem.training.report import read_metrics, write_run_report
        write_run_report(out_dir, cfg)
        logged = [r["loss"] for r in read_metrics(out_dir / METRICS) if "loss" in r]
    result = TrainResult(out_dir=out_dir, steps=done,
                         first_loss=logged[0] if logged else float("nan"),
                         last_loss=logged[-1] if logged else float("nan"), val=val,
                         seconds=time.perf_counter() - start, stopped_early=stopped_early)
    return result


def forward_window(model, batches: list, state: State | None, *, device, amp_dtype,
                   checkpoint: bool = False, aux_weight: float = 0.0) -> tuple[torch.Tensor, State]:
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
        if aux_weight and out.aux_loss is not None:                 # a regularizer of the memory (a sum too)
            total = total + aux_weight * out.aux_loss.float()
        state = out.state
    return total, state


def _resume(ckpt: Path, *, model, opt, scaler, stream: TrainStream | TaskStream, lanes: range, dist: D.Dist, device):
    meta, tensors = S.load_checkpoint(ckpt)
    if meta["world_size"] != dist.world:
        raise ValueError(f"{ckpt} was saved by {meta['world_size']} process(es) but this run has {dist.world}; "
                         f"resume with the same number of processes")
    load_weights(model, ckpt / S.WEIGHTS)
    opt.load_state_dict(S.optimizer_state(meta, tensors))
    if scaler is not None and (sc := S.scaler_state(meta, tensors)):
        scaler.load_state_dict(sc)
    stream.load_positions(meta["data"][lanes.start:lanes.stop])
    mem = S.memory_state(tensors)
    state = None
    if mem:
        state = State.from_state_dict({k: v.to(device) for k, v in S.slice_lane_state(mem, lanes).items()})
    S.restore_rng(S.rng_states(meta, tensors)[dist.rank])
    info = {k: meta[k] for k in ("tokens_seen", "best_val_loss", "best_step", "bad_evals")}
    info["loss_window"] = meta.get("loss_window", [0.0, 0])          # absent in checkpoints of older versions
    return meta["step"], state, info


@dataclass
class _Data:
    tokenizer: object
    stream: TrainStream | TaskStream
    validate: Callable[..., dict]          # (model, *, full) -> {"loss", "ppl", ...}
    logged: tuple[str, ...]                 # keys of validate's result written to metrics.jsonl (as val_*)


def _data(cfg: RunConfig, out_dir: Path, *, resume: bool, lanes: range) -> _Data:
    """Tokenizer, training stream and validation of a language-model run: its corpus, split by document
    and seeded, or a probe task (passkey, recall, babi, haystack; loss on answer tokens only). On resume
    the saved tokenizer is reused."""
    d, t = cfg.data, cfg.train
    name = task_name(cfg)
    if name == "lm":
        train_texts, val_texts = split_documents(load_corpus(d), val_fraction=d.val_fraction, seed=d.seed)
    fit = train_texts if name == "lm" else probe_fit_texts(cfg)
    tokenizer = (load_tokenizer(out_dir / TOKENIZER) if resume
                 else build_tokenizer(d.tokenizer, fit, vocab_size=d.vocab_size))
    seg_len = cfg.model.segment_len
    if name == "lm":
        cache = cache_dir_for(d.path) if d.cache and d.path else None
        train_docs = encode_documents(train_texts, tokenizer, cache_dir=cache)
        val_docs = encode_documents(val_texts, tokenizer, cache_dir=cache)
        n_chars = predicted_chars(val_texts)

        def validate_lm(model, *, full: bool) -> dict:
            limit = 0 if full else t.eval_segments
            with _validation_bar(n_eval_batches(val_docs, batch_size=d.batch_size, seg_len=seg_len), limit,
                                 enabled=t.progress) as bar:
                return evaluate_ppl(model, val_docs, batch_size=d.batch_size, n_chars=n_chars, max_segments=limit,
                                    progress_bar=bar)
        return _Data(tokenizer, TrainStream(train_docs, batch_size=d.batch_size, seg_len=seg_len, seed=d.seed,
                                            lanes=lanes), validate_lm, ("loss", "ppl", "bpc", "tokens"))

    make_train = probe_maker(cfg, tokenizer, "train")
    make_val = probe_maker(cfg, tokenizer, "val")
    val_probes = [make_val(i, cfg.task.length) for i in range(cfg.task.n_test)]

    def validate_probe(model, *, full: bool) -> dict:
        with _validation_bar(n_segments(val_probes, model, batch_size=d.batch_size), 0, enabled=t.progress) as bar:
            res = summarize(score_probes(model, val_probes, batch_size=d.batch_size, progress_bar=bar))
        return {"loss": res["answer_loss"], "ppl": math.exp(min(res["answer_loss"], 50.0)), **res}
    stream = TaskStream(lambda index, length: make_train(index, length).as_doc(), batch_size=d.batch_size,
                        seg_len=seg_len, length=cfg.task.length, lanes=lanes)
    return _Data(tokenizer, stream, validate_probe, ("loss", "ppl", "accuracy", "answers"))


def _validation_bar(total: int, limit: int, *, enabled: bool):
    """A progress bar for a validation that reads the whole split (``limit`` 0); a capped one is short."""
    return progress(total=total, desc="validate", enabled=enabled and not limit, unit="seg")
