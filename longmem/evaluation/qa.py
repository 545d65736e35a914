"""Task evaluation: bAbI accuracy per task (memn2n) and text metrics of decoded
targets (seq2seq)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longmem.data.tasks.babi import EncodedBabi, babi_batch
from longmem.data.tasks.pairs import Pair, pairs_batch
from longmem.evaluation.metrics import bleu, exact_match, rouge_l, token_f1, tokens
from longmem.generation.tasks import decode_seq2seq
from longmem.models import IGNORE_INDEX


@torch.no_grad()
def evaluate_babi(model, data: EncodedBabi, *, batch_size: int = 256) -> dict:
    """Loss, overall accuracy, accuracy and error (%) per task, and the mean error over tasks
    (the number bAbI papers report; a task with error > 5% counts as failed)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(data), dtype=torch.bool)
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = babi_batch(data, idx, memory_size=model.config.memory_size)
        out = model(**batch)
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
            "n": len(refs), "examples": [{"prediction": p, "target": r} for p, r in zip(preds[:3], refs[:3])]}
