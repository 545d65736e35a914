"""Evaluation tasks on a run directory (``longmem eval``)."""
from __future__ import annotations

import random

import numpy as np

from longmem.data.tasks import probes as P
from longmem.evaluation.probes import n_segments, score_probes, summarize

from longmem.data.cache import cache_dir_for
from longmem.data.corpus import load_corpus, split_documents
from longmem.data.stream import encode_documents, n_eval_batches
from longmem.evaluation.perplexity import evaluate_ppl, predicted_chars
from longmem.runs import Run
from longmem.utils import check_memory_fits, progress


def eval_ppl(run: Run, *, split: str = "val", max_segments: int = 0, show_progress: bool = True) -> dict:
    """Perplexity of a run on its own train/val split (the split is rebuilt from the run's data config)."""
    d = run.config.data
    check_memory_fits(run.model.config, batch_size=d.batch_size, device=run.model.embed.weight.device,
                      training=False)
    train_texts, val_texts = split_documents(load_corpus(d), val_fraction=d.val_fraction, seed=d.seed)
    texts = val_texts if split == "val" else train_texts
    docs = encode_documents(texts, run.tokenizer, cache_dir=cache_dir_for(d.path) if d.cache and d.path else None)
    n = n_eval_batches(docs, batch_size=d.batch_size, seg_len=run.model.config.segment_len)
    bar = progress(total=min(n, max_segments) if max_segments else n, desc=f"eval {split}", enabled=show_progress)
    res = evaluate_ppl(run.model, docs, batch_size=d.batch_size, n_chars=predicted_chars(texts),
                       max_segments=max_segments, progress_bar=bar)
    bar.close()
    return {"task": "ppl", "split": split, **res}


# -- long-range probes ----------------------------------------------------------
PROBE_CHANCE = {"passkey": 1 / 90_000, "recall": 1 / 100}       # 5-digit keys; 2-digit values


def _probe_stories(run: Run, babi_path: str | None) -> list:
    """bAbI test stories for babi/haystack: ``babi_path`` if given, else the run's own bAbI data when it
    trained on bAbI, else generated stories of tasks 1-3."""
    from longmem.data.tasks.sources import babi_examples, task_name
    cfg = run.config
    if babi_path is None and task_name(cfg) in ("babi", "haystack"):
        return babi_examples(cfg, "test")
    return babi_examples(cfg.override({"data.path": babi_path or "", "data.hf_dataset": ""}),   # task.babi_tasks kept
                         "test")


def _demos(run: Run, babi_path: str | None, shots: int, *, tasks: set[int]) -> dict[int, list]:
    """``shots`` solved training stories per bAbI task (the first ones of the training split), for few-shot
    prompts; never test stories."""
    if shots < 0:
        raise ValueError(f"--shots must be >= 0, got {shots}")
    if not shots:
        return {}
    from longmem.data.tasks.sources import babi_examples
    cfg = run.config.override({"data.path": babi_path or "", "data.hf_dataset": ""}) if babi_path else run.config
    out: dict[int, list] = {}
    for ex in babi_examples(cfg, "train"):
        if ex.task in tasks and len(out.setdefault(ex.task, [])) < shots:
            out[ex.task].append(ex)
    return out


def _distractor(run: Run, path: str | None) -> str:
    """Haystack text: ``path``, else the run's task.distractor (a haystack run), else the run's own
    validation text (a corpus run), else the embedded corpus."""
    from longmem.data.tasks.sources import distractor_text, task_name
    cfg = run.config
    if path is not None:
        return distractor_text(path)
    if task_name(cfg) != "lm":                              # a probe run
        return distractor_text(cfg.task.distractor)
    _, val = split_documents(load_corpus(cfg.data), val_fraction=cfg.data.val_fraction, seed=cfg.data.seed)
    return "\n\n".join(val)


def eval_probe(run: Run, task: str, *, lengths: list[int], depths: list[float], n: int, seed: int = 0,
               batch_size: int = 8, babi_path: str | None = None, distractor: str | None = None, shots: int = 0,
               cloze: bool = False, show_progress: bool = True) -> dict:
    """Answer accuracy of a language-model run on a probe, per cell of the sweep:
    passkey and recall per (length, depth); haystack per (length, bAbI task); babi per bAbI task.
    ``n`` examples per cell (babi: per task, 0 = all). ``shots``: babi and haystack examples start with this many
    solved training stories of their task (few-shot demonstrations, as BABILong prompts pretrained models).
    ``cloze``: babi and haystack answers follow the question's subject restated ("Answer: Mary is in the
    kitchen", :func:`longmem.data.tasks.probes.answer_lead`); questions of other forms are asked plainly."""
    if run.config.model.arch not in ("transformer", "lstm", "ntm", "dnc"):
        raise ValueError(f"--task {task} scores a language model (transformer, lstm, ntm or dnc); this is a "
                         f"{run.config.model.arch} run")
    tok, cells = run.tokenizer, []
    if task in ("passkey", "recall"):
        for length in lengths:
            for depth in depths:
                rngs = [random.Random(f"{task}/eval/{seed}/{length}/{depth}/{i}") for i in range(n)]
                probes = [P.passkey(tok, length=length, depth=depth, rng=r) if task == "passkey"
                          else P.recall(tok, length=length, depth=depth, rng=r, n_pairs=run.config.task.n_pairs)
                          for r in rngs]
                cells.append(({"length": length, "depth": depth}, probes))
    elif task in ("babi", "haystack"):
        stories = _probe_stories(run, babi_path)
        demos = _demos(run, babi_path, shots, tasks={ex.task for ex in stories})
        by_task: dict[int, list] = {}
        for ex in stories:
            by_task.setdefault(ex.task, []).append(ex)
        if task == "babi":
            for k, exs in sorted(by_task.items()):
                cells.append(({"babi_task": k}, [P.babi(tok, ex, demos=demos.get(k, ()), cloze=cloze) for ex in (exs[:n] if n else exs)]))
        else:
            source = np.asarray(tok.encode(_distractor(run, distractor)), dtype=np.int64)
            sizes = {id(ex): P.story_length(tok, ex, demos.get(ex.task, ()), cloze=cloze) for ex in stories}
            for length in lengths:
                for k, exs in sorted(by_task.items()):
                    fit = [ex for ex in exs if sizes[id(ex)] <= length]     # stories longer than the haystack
                    if not fit:                                              # cannot be hidden in it
                        continue
                    rng = random.Random(f"haystack/eval/{seed}/{length}/{k}")
                    picked = [fit[rng.randrange(len(fit))] for _ in range(n)]
                    cells.append(({"length": length, "babi_task": k, "stories_too_long": len(exs) - len(fit)},
                                  [P.haystack(tok, ex, length=length, rng=rng, source=source,
                                              demos=demos.get(k, ()), cloze=cloze) for ex in picked]))
            if not cells:
                raise ValueError(f"no bAbI story fits in {max(lengths)} tokens; use longer --lengths")
    else:
        raise ValueError(f"unknown probe {task!r}; accepted: {', '.join(P.PROBES)}")
    total = sum(n_segments(probes, run.model, batch_size=batch_size) for _, probes in cells)
    bar = progress(total=total, desc=f"eval {task}", enabled=show_progress, unit="seg")
    results = []
    for key, probes in cells:
        scores = score_probes(run.model, probes, batch_size=batch_size, progress_bar=bar)
        dist = [a.get("distance") for p in probes for a in p.answers if a.get("distance") is not None]
        results.append({**key, **summarize(scores),
                        **({"mean_distance": sum(dist) / len(dist)} if dist else {})})
    bar.close()
    answers = sum(r["answers"] for r in results)
    out = {"task": task, "run": str(run.path), "split": "test", "seed": seed, "n": n, "shots": shots,
           "arch": run.config.model.arch, "memory": run.config.model.memory.kind,
           "mem_len": run.config.model.memory.mem_len, "segment_len": run.config.model.segment_len,
           "accuracy": sum(r["accuracy"] * r["answers"] for r in results) / max(answers, 1),
           "chance": PROBE_CHANCE.get(task), "results": results}
    if task in ("babi", "haystack"):
        out["cloze"] = cloze
    if task == "babi":
        out["mean_error"] = 100 * sum(1 - r["accuracy"] for r in results) / max(len(results), 1)
    return out


def eval_ppl_sweep(path, *, mem_lens: list[int], split: str = "val", max_segments: int = 0,
                   overrides: dict[str, str] | None = None, show_progress: bool = True) -> dict:
    """Perplexity against the evaluation memory length (Transformer-XL's effective context): the run
    reloaded with each ``memory.mem_len``."""
    from longmem.runs import load_run
    results, run = [], None
    for m in mem_lens:
        run = load_run(path, overrides={**(overrides or {}), "memory.mem_len": str(m)})
        res = eval_ppl(run, split=split, max_segments=max_segments, show_progress=show_progress)
        results.append({k: res[k] for k in ("mem_len", "loss", "ppl", "bpc", "tokens")})
    return {"task": "ppl", "run": str(path), "split": split, "memory": run.config.model.memory.kind,
            "segment_len": run.config.model.segment_len, "results": results}
