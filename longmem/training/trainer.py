"""The one training loop, for every model and task.

AdamW (decay on matrices only) or SGD (``optim.py``), the task's learning-rate schedule, gradient
clipping and accumulation, mixed precision (autocast in the loop only), the model's memory carried
across steps (ordered lanes), validation, the best validation kept, early stopping, checkpoints for
exact resume, SIGINT/SIGTERM handling, and DistributedDataParallel under ``torchrun``. What a run
learns from (its data, loss, validation and data position) is its task (``task.py``): a language
model's corpus or probes, or a baseline's examples (``longmem.classic.tasks``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longmem.config import MAX_PER_STEP, RunConfig
from longmem.data.tokenizer import save_tokenizer
from longmem.models import build_model
from longmem.models.memory import State
from longmem.runs import CONFIG, METRICS, TOKENIZER, load_run
from longmem.training import distributed as D
from longmem.training import state as S
from longmem.training.checkpoint import load_weights
from longmem.training.loggers import MetricLoggers, check_loggers
from longmem.training.optim import build_optimizer
from longmem.training.precision import resolve_device, resolve_precision
from longmem.training.task import make_task
from longmem.utils import check_memory_fits, check_model_fits, progress

log = logging.getLogger(__name__)


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
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its newest checkpoint. The task (what the
    run learns from, its loss and validation) is ``task.make_task(cfg)``; this loop is the same for all."""
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
    check_loggers(t.logger_names())

    lanes = D.lane_slice(d.batch_size, dist)
    init = load_run(t.init_from) if t.init_from and not resume else None
    task = make_task(cfg, out_dir, resume=resume, lanes=lanes, tokenizer=init.tokenizer if init else None)
    tokenizer = task.tokenizer
    if init is None or tokenizer.vocab_size > cfg.model.vocab_size:
        cfg.model.vocab_size = tokenizer.vocab_size

    check_model_fits(cfg.model, device=device, training=True)
    check_memory_fits(cfg.model, batch_size=len(lanes), device=device, training=True)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    if init is not None:
        _init_from(model, init)
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
        start_step, state, info = _resume(ckpt, model=model, opt=opt, scaler=scaler, task=task, lanes=lanes,
                                          dist=dist, device=device)
        if dist.main:
            log.info("resuming %s at step %d (%s)", out_dir, start_step, ckpt)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    loggers = (MetricLoggers.open(out_dir, cfg, resume_step=start_step if ckpt is not None else None)
               if dist.main else MetricLoggers([]))           # metrics.jsonl (+ train.loggers); rank 0 only

    def validate(step: int, *, full: bool) -> dict:
        res = {}
        if dist.main:
            res = task.validate(model, full=full)
            loggers.log({"step": step, **{f"val_{k}": res[k] for k in task.logged}})
        model.train()
        return D.broadcast_object(res, dist)

    def checkpoint(step: int, *, best: bool) -> Path:
        info["loss_window"] = [loss_sum, n_loss]
        mem = state.state_dict() if state is not None else {}
        gathered = D.all_gather_objects({"data": task.data_state(), "rng": S.capture_rng(),
                                         "memory": {k: v.cpu() for k, v in mem.items()}}, dist)
        path = S.latest_checkpoint(out_dir)
        if dist.main:
            path = S.save_checkpoint(
                out_dir, step=step, model=model, optimizer=opt,
                scaler_state=scaler.state_dict() if scaler is not None else None, info=info,
                data=task.join_data([g["data"] for g in gathered]),
                memory=S.concat_lane_states([g["memory"] for g in gathered]) if mem else {},
                rng=[g["rng"] for g in gathered], keep_last=t.keep_last, best=best)
        D.barrier(dist)
        return out_dir / S.CKPT_DIR / f"step-{step:08d}"

    model.train()
    loss_sum, n_loss = info["loss_window"]
    inputs_since = 0
    val, best_val = {}, info.get("best_val") or {}
    stopped_early = False
    done = start_step
    start = t_log = time.perf_counter()
    bar = progress(total=t.max_steps, desc=desc, enabled=t.progress and dist.main)
    bar.update(start_step)
    with _StopSignal() as stop, loggers:
        for step in range(start_step, t.max_steps):
            lr = task.lr(step)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [task.window(step) for _ in range(t.grad_accum)]
            counts = [task.counts(w) for w in micro]
            n_global = D.all_sum(sum(c[0] for c in counts), dist, device)      # normalize by the global target count
            n_inputs = D.all_sum(sum(c[1] for c in counts), dist, device)
            step_loss = 0.0
            for i, window in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = ddp.no_sync() if dist.enabled and not sync else contextlib.nullcontext()
                with ctx, _random_memory(model, cfg, step=step, micro=i):
                    loss_sum_micro, state = task.loss(ddp, window, state, step=step, device=device,
                                                      amp_dtype=amp_dtype)
                    loss = loss_sum_micro * dist.world / max(n_global, 1.0)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                if state is not None:
                    state = state.detach()                      # truncated: nothing flows beyond the window
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
            inputs_since += n_inputs
            bar.update(1)
            done = step + 1
            if done % max(1, t.log_every) == 0 or done == t.max_steps:
                now = time.perf_counter()
                rate = inputs_since / max(now - t_log, 1e-9)
                u = task.units
                # per target; a window without targets (a probe's steps before any answer) logs no loss, not NaN
                seen = {"loss": loss_sum / n_loss} if n_loss else {}
                loggers.log({"step": done, **seen, "lr": lr, u: info["tokens_seen"], f"{u}_per_s": rate,
                             **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})})
                bar.set_postfix(loss=f"{seen['loss']:.3f}" if seen else "-", **{f"{u[:3]}_s": f"{rate:,.0f}"})
                loss_sum, n_loss, t_log, inputs_since = 0.0, 0, now, 0
            last = done == t.max_steps
            is_best = False
            if (t.eval_every and done % t.eval_every == 0) or last:
                val = validate(done, full=last)
                best = info["best_val_loss"]
                if best is None or task.score(val) < tuple(best):
                    info.update(best_val_loss=list(task.score(val)), best_step=done, bad_evals=0)
                    is_best, best_val = True, val
                    if task.keep_best:
                        loggers.log({"step": done, "event": "best", "best_step": done})
                else:
                    info["bad_evals"] += 1
                task.after_validation(done, val, model, loggers.log)
                model.train()
                stopped_early = bool(t.patience) and info["bad_evals"] >= t.patience
            interrupted = D.all_sum(float(stop.signum is not None), dist, device) > 0
            if (is_best or last or stopped_early or interrupted
                    or (t.checkpoint_every and done % t.checkpoint_every == 0)
                    or (t.eval_every and done % t.eval_every == 0)):
                info["best_val"] = best_val
                path = checkpoint(done, best=is_best)
            if interrupted:
                bar.close()
                raise TrainingStopped(f"interrupted at step {done}; saved {path}. "
                                      f"Continue with: longmem train --resume {out_dir}", signum=stop.signum)
            if stopped_early:
                loggers.log({"step": done, "event": "early_stop", "best_step": info["best_step"],
                             "best_val_loss": info["best_val_loss"][0]})
                break
    bar.close()
    logged = []
    if dist.main:
        if task.keep_best and (out_dir / S.CKPT_DIR / "best" / S.WEIGHTS).is_file():
            shutil.copyfile(out_dir / S.CKPT_DIR / "best" / S.WEIGHTS, out_dir / S.WEIGHTS)   # the best weights
        from longmem.training.report import read_metrics, write_run_report
        write_run_report(out_dir, cfg)
        logged = [r["loss"] for r in read_metrics(out_dir / METRICS) if "loss" in r]
    result = TrainResult(out_dir=out_dir, steps=done,
                         first_loss=logged[0] if logged else float("nan"),
                         last_loss=logged[-1] if logged else float("nan"),
                         val=best_val if task.keep_best and best_val else val,
                         seconds=time.perf_counter() - start, stopped_early=stopped_early)
    return result


@contextlib.contextmanager
def _random_memory(model, cfg: RunConfig, *, step: int, micro: int):
    """Randomized memory lengths (``train.mem_len_max``): the XL memory keeps mem_len_max slots and this
    micro-batch reads a random number of them, from memory.mem_len up (drawn from the step, so a resume draws
    the same); outside the micro-batch (validation, checkpoints) the memory is memory.mem_len again."""
    top = cfg.train.mem_len_max
    xl = getattr(model, "xl", None)
    if not top:
        yield
        return
    low = cfg.model.memory.mem_len
    if xl is None or top < low or xl.n_sinks:
        raise ValueError(f"train.mem_len_max={top} needs a Transformer-XL memory (memory.kind xl) "
                         f"without attention sinks and memory.mem_len <= it (memory.mem_len={low})")
    xl.mem_len = top
    xl.read_len = random.Random(step * MAX_PER_STEP + micro).randint(low, top)
    try:
        yield
    finally:
        xl.mem_len, xl.read_len = low, None


def _init_from(model, init) -> None:
    """Start from ``init``'s weights (a run: an imported pretrained model, or any run of this architecture);
    parameters it lacks (a memory's: kNN gates, memory tokens) keep their fresh initialisation."""
    theirs = init.model.state_dict()
    mine = model.state_dict()
    fresh = [k for k in mine if k not in theirs]
    memory_names = {m.name for m in getattr(model, "memories", [])}
    strange = [k for k in fresh if k.split(".")[0] not in memory_names]
    wrong = [k for k in theirs if k in mine and theirs[k].shape != mine[k].shape]
    unexpected = [k for k in theirs if k not in mine]
    if strange or wrong or unexpected:
        raise ValueError(f"train.init_from={init.path}: its weights do not fit this model (missing "
                         f"{strange[:5]}, other shapes {wrong[:5]}, unexpected {unexpected[:5]}); the model section "
                         f"must be the init run's (only memory.*, model.segment_len and model.dropout may differ)")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in theirs.items() if k in mine}, strict=False)


def _resume(ckpt: Path, *, model, opt, scaler, task, lanes: range, dist: D.Dist, device):
    meta, tensors = S.load_checkpoint(ckpt)
    if meta["world_size"] != dist.world:
        raise ValueError(f"{ckpt} was saved by {meta['world_size']} process(es) but this run has {dist.world}; "
                         f"resume with the same number of processes")
    load_weights(model, ckpt / S.WEIGHTS)
    opt.load_state_dict(S.optimizer_state(meta, tensors))
    if scaler is not None and (sc := S.scaler_state(meta, tensors)):
        scaler.load_state_dict(sc)
    task.load_data(meta["data"], lanes)
    mem = S.memory_state(tensors)
    state = None
    if mem:
        state = State.from_state_dict({k: v.to(device) for k, v in S.slice_lane_state(mem, lanes).items()})
    S.restore_rng(S.rng_states(meta, tensors)[dist.rank])
    info = {k: meta[k] for k in ("tokens_seen", "best_val_loss", "best_step", "bad_evals")}
    if isinstance(info["best_val_loss"], (int, float)):               # checkpoints of longmem 0.1: a loss
        info["best_val_loss"] = [info["best_val_loss"]]
    info["loss_window"] = meta.get("loss_window", [0.0, 0])          # absent in checkpoints of older versions
    info["best_val"] = meta.get("best_val") or {}
    return meta["step"], state, info
