"""Task evaluation: bAbI accuracy per task (memn2n), text metrics of decoded
targets (seq2seq) and bit errors on the bit-vector tasks (lstm, ntm, dnc)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longmem.data.tasks.babi import EncodedBabi, babi_batch
from longmem.classic.pairs import Pair, pairs_batch
from longmem.evaluation.metrics import bleu, exact_match, rouge_l, token_f1, tokens
from longmem.classic.decoding import decode_seq2seq
from longmem.models import IGNORE_INDEX


@torch.no_grad()
def evaluate_babi(model, data: EncodedBabi, *, batch_size: int = 256, linear: bool = False) -> dict:
    """Loss, overall accuracy, accuracy and error (%) per task, and the mean error over tasks
    (the number bAbI papers report; a task with error > 5% counts as failed). ``linear`` reads the
    memory without the softmax, as in linear-start training."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(data), dtype=torch.bool)
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = babi_batch(data, idx, memory_size=model.config.memory_size)
        out = model(**batch, linear=linear)
        loss_sum += F.cross_entropy(out.logits.float(), batch["answer"], reduction="sum").item()
        correct[idx] = out.logits.argmax(-1) == batch["answer"]
    model.train(was_training)
    tasks = torch.from_numpy(data.tasks)
    per_task = {}
    for k in sorted(set(data.tasks.tolist())):
        acc = correct[tasks == k].float().mean().item()
        per_task[str(k)] = {"accuracy": acc, "error": 100 * (1 - acc), "n": int((tasks == k).sum())}
    errors = [v["error"] for v in per_task.values()]
    return {"loss": loss_sum / len(data), "accuracy": correct.float().mean().item(), "per_task": per_task,
            "mean_error": sum(errors) / len(errors), "failed_tasks": sum(e > 5.0 for e in errors),
            "n": len(data)}


@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs: list[Pair], *, batch_size: int = 64, max_new_tokens: int = 0,
                   chars: bool = True) -> dict:
    """Teacher-forced loss, and exact match, token F1, BLEU and ROUGE-L of greedy decodes.

    ``chars`` compares texts as characters (the generated tasks are character strings);
    ``max_new_tokens`` 0 allows each batch's longest target plus a few tokens."""
    was_training = model.training
    model.eval()
    loss_sum, n_tok = 0.0, 0
    preds, refs = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = pairs_batch(chunk, tokenizer)
        out = model(**{k: v.to(model.embed.weight.device) for k, v in batch.items()})
        targets = batch["targets"].to(out.logits.device)
        loss_sum += F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum").item()
        n_tok += int((targets != IGNORE_INDEX).sum())
        limit = max_new_tokens or batch["targets"].shape[1] + 8
        preds += decode_seq2seq(model, tokenizer, [p.source for p in chunk], max_new_tokens=limit)
        refs += [p.target for p in chunk]
    model.train(was_training)
    pt = [tokens(p, chars=chars) for p in preds]
    rt = [tokens(r, chars=chars) for r in refs]
    loss = loss_sum / max(1, n_tok)
    return {"loss": loss, "ppl": math.exp(loss),
            "exact_match": sum(map(exact_match, preds, refs)) / len(refs),
            "token_f1": sum(map(token_f1, pt, rt)) / len(refs),
            "bleu": bleu(pt, rt), "rouge_l": sum(map(rouge_l, pt, rt)) / len(refs),
            "n": len(refs), "examples": [{"source": s.source, "prediction": p, "target": r}
                         for s, p, r in zip(pairs[:3], preds[:3], refs[:3])]}


@torch.no_grad()
def evaluate_sequences(model, examples: list, *, pad: int, batch_size: int = 64) -> dict:
    """Bitwise cross-entropy per target vector (``loss``, nats), wrong bits per sequence (``bit_errors``, the
    NTM paper's measure, Graves et al. 2014 Figure 4), their rate over every target bit, and the fraction of
    sequences without a wrong bit, of ``examples`` (``algorithmic.SeqExample``), each read from a new state."""
    from longmem.classic.bits import bit_errors, bit_loss
    from longmem.data.tasks.algorithmic import pad_examples
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    loss_sum, n_vectors, n_bits, perfect = 0.0, 0, 0, 0
    errors: list[float] = []
    for start in range(0, len(examples), batch_size):
        inputs, targets = (torch.from_numpy(a).to(device)
                           for a in pad_examples(examples[start:start + batch_size], pad=pad))
        logits = model(inputs).logits
        bits, mask = model.embed.target_bits(targets)
        loss_sum += bit_loss(logits, bits, mask, reduction="sum").item()
        wrong = bit_errors(logits, bits, mask)
        errors += wrong.tolist()
        perfect += int((wrong == 0).sum())
        n_vectors += int(mask.sum())
        n_bits += int(mask.sum()) * bits.shape[-1]
    model.train(was_training)
    return {"loss": loss_sum / max(1, n_vectors), "bit_errors": sum(errors) / len(errors),
            "bit_error_rate": sum(errors) / max(1, n_bits), "perfect": perfect / len(errors), "n": len(errors)}


SEQUENCE_EVALS = {"copy": "copy", "repeat_copy": "repeat_copy", "recall": "associative_recall"}


def eval_sequences(run, task: str, *, lengths: list[int] | None = None, n: int = 100, seed: int = 0,
                   batch_size: int = 64) -> dict:
    """``longmem eval DIR --task copy|repeat_copy|recall``: bit errors of a run trained on bit vectors, per
    sequence length (copy: vectors; recall: items), on ``n`` test examples each (default lengths: the
    training range's longest and twice that, the NTM paper's generalisation test)."""
    from longmem.data.tasks.algorithmic import sequence_maker
    from longmem.data.tokenizer import BitsTokenizer
    tok = run.tokenizer
    if not isinstance(tok, BitsTokenizer):
        raise ValueError(f"--task {task} scores a run trained on bit vectors (task.name copy, repeat_copy or "
                         f"associative_recall); {run.path} has a {tok.kind} tokenizer")
    if task not in SEQUENCE_EVALS:
        raise ValueError(f"--task {task}; a bit-vector run is scored with: {', '.join(SEQUENCE_EVALS)}")
    name, t = SEQUENCE_EVALS[task], run.config.task
    lengths = lengths or [t.max_len, 2 * t.max_len]
    results = []
    for length in lengths:
        make = sequence_maker(name, tok, split="test", seed=seed, min_len=length, max_len=length,
                              max_repeats=t.max_repeats)
        res = evaluate_sequences(run.model, [make(i) for i in range(n)], pad=tok.ids[tok.BLANK],
                                 batch_size=batch_size)
        results.append({"length": length, **res})
    return {"task": name, "trained_on": [t.min_len, t.max_len], "results": results}


def format_sequence_result(res: dict) -> str:
    lines = [f"{res['task']} (trained on lengths {res['trained_on'][0]}..{res['trained_on'][1]})"]
    lines += [f"length {r['length']:>4}: bit errors/sequence {r['bit_errors']:8.3f}  bit error rate "
              f"{r['bit_error_rate']:.4f}  perfect {r['perfect']:.3f}  loss {r['loss']:.4f}  (n={r['n']})"
              for r in res["results"]]
    return "\n".join(lines)


def eval_babi(run, *, split: str = "test") -> dict:
    """``longmem eval DIR --task babi``: accuracy per task and mean error of a memn2n run on its bAbI
    data (the test files of ``data.path``, or generated test stories)."""
    from longmem.data.tasks.babi import encode_babi
    from longmem.data.tasks.sources import babi_examples
    if run.config.model.arch != "memn2n":
        raise ValueError(f"--task babi needs a memn2n run; {run.path} is model.arch={run.config.model.arch}")
    data = encode_babi(babi_examples(run.config, split), run.tokenizer)
    return {"task": "babi", "split": split, **evaluate_babi(run.model, data)}


def eval_text(run, *, split: str = "test") -> dict:
    """``longmem eval DIR --task text``: exact match, token F1, BLEU and ROUGE-L of greedy decodes
    of a seq2seq run on its pairs (generated test pairs, or the held-out part of a .jsonl)."""
    from longmem.classic.pairs import pair_examples
    from longmem.data.tasks.sources import task_name
    if run.config.model.arch != "seq2seq":
        raise ValueError(f"--task text needs a seq2seq run; {run.path} is model.arch={run.config.model.arch}")
    chars = task_name(run.config) != "pairs"
    res = evaluate_pairs(run.model, run.tokenizer, pair_examples(run.config, split), chars=chars)
    return {"task": "text", "split": split, "units": "chars" if chars else "words", **res}


def format_task_result(res: dict) -> str:
    """A few human-readable lines of an eval_babi / eval_text result."""
    if res["task"] == "babi":
        lines = [f"task {k:>2}: accuracy {v['accuracy']:.3f}  error {v['error']:5.1f}%  (n={v['n']})"
                 for k, v in res["per_task"].items()]
        return "\n".join(lines + [f"{res['split']}: mean error {res['mean_error']:.2f}% over {len(lines)} task(s), "
                                  f"{res['failed_tasks']} failed (> 5%), accuracy {res['accuracy']:.4f}"])
    return (f"{res['split']}: exact match {res['exact_match']:.3f}  token F1 {res['token_f1']:.3f}  "
            f"BLEU {res['bleu']:.3f}  ROUGE-L {res['rouge_l']:.3f}  loss {res['loss']:.4f}  n {res['n']}")
