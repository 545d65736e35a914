"""Perplexity with the memory carried across evaluation segments."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from longmem.data.stream import eval_batches
from longmem.models import IGNORE_INDEX, MemoryLM


def evaluation_view(model):
    """The model to evaluate with (no gradient, evaluation mode): ``model.for_decoding()`` where it has one, the
    same parameters with memories that compute less for the same numbers: Transformer-XL's hidden states
    become the key/value cache of the same positions (exact, since the memory is detached), so a segment
    projects its own T positions instead of re-projecting the M memory slots too."""
    view = getattr(model, "for_decoding", None)
    return view() if view is not None else model


@torch.no_grad()
def evaluate_ppl(model: MemoryLM, docs: list[np.ndarray], *, batch_size: int, n_chars: int | None = None,
                 max_segments: int = 0, progress_bar=None) -> dict:
    """Mean cross-entropy over every target of ``docs``, read in ordered lanes.

    Returns ``loss`` (nats/token), ``ppl``, ``bits_per_token``, ``bpc`` (bits per
    character: ``n_chars`` is the number of predicted characters, i.e. each
    document's length less its first character, see :func:`predicted_chars`;
    equals bits per token when ``n_chars`` is not given), ``tokens`` and ``mem_len``."""
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    total_tokens = sum(len(d) - 1 for d in docs)
    device = model.embed.weight.device
    run = evaluation_view(model)
    for batch in eval_batches(docs, batch_size=batch_size, seg_len=model.config.segment_len,
                              max_segments=max_segments):
        out = run(batch.inputs.to(device), state=state, reset=batch.reset.to(device))
        state = out.state
        targets = batch.targets.to(device)
        total += F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
        if progress_bar is not None:
            progress_bar.update(1)
    model.train(was_training)
    if count == 0:
        raise ValueError("nothing to evaluate: the documents have no targets")
    loss = total / count
    chars_per_token = (n_chars / total_tokens) if n_chars else 1.0
    return {"loss": loss, "ppl": math.exp(loss), "bits_per_token": loss / math.log(2),
            "bpc": loss / math.log(2) / chars_per_token, "tokens": count,
            "mem_len": model.config.memory.mem_len}



def predicted_chars(texts: list[str]) -> int:
    """Characters a language model predicts in these documents (all but each one's first)."""
    return sum(max(0, len(t) - 1) for t in texts)
