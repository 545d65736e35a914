"""Evaluation tasks on a run directory (``longmem eval``)."""
from __future__ import annotations

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
