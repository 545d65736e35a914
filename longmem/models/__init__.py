import torch.nn as nn

from longmem.config import ModelConfig
from longmem.models.transformer import IGNORE_INDEX, LMOutput, MemoryLM


def build_model(config: ModelConfig) -> nn.Module:
    """The model named by ``config.arch`` (a ModelConfig): every place that builds a model from a config uses this.
    ``transformer`` gives a :class:`MemoryLM`; every one keeps its contract (``forward(tokens, state, targets,
    reset) -> LMOutput``, or ``QAOutput`` for memn2n)."""
    if config.arch == "transformer":
        return MemoryLM(config)
    if config.arch == "lstm":
        from longmem.models.lstm import LSTMLM
        return LSTMLM(config)
    if config.arch == "seq2seq":
        from longmem.models.seq2seq import Seq2Seq
        return Seq2Seq(config)
    if config.arch == "memn2n":
        from longmem.models.memn2n import MemN2N
        return MemN2N(config)
    raise ValueError(f"model.arch={config.arch!r}; accepted: transformer, lstm, seq2seq, memn2n")


__all__ = ["IGNORE_INDEX", "LMOutput", "MemoryLM", "build_model"]
