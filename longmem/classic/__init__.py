"""The classic memory baselines, each with its own config, data, training task and scoring: the LSTM
language model, the Transformer encoder-decoder (seq2seq) and end-to-end memory networks (MemN2N).
Importing this package registers their architectures (``model.arch``) and training tasks."""
from longmem.classic.config import LSTMConfig, MemN2NConfig, Seq2SeqConfig
from longmem.models import register_arch
from longmem.training.task import register_task


def _lstm(config):
    from longmem.classic.lstm import LSTMLM
    return LSTMLM(config)


def _seq2seq(config):
    from longmem.classic.seq2seq import Seq2Seq
    return Seq2Seq(config)


def _memn2n(config):
    from longmem.classic.memn2n import MemN2N
    return MemN2N(config)


def _babi_task(*args, **kw):
    from longmem.classic.tasks import BabiTask
    return BabiTask(*args, **kw)


def _pairs_task(*args, **kw):
    from longmem.classic.tasks import PairsTask
    return PairsTask(*args, **kw)


register_arch("lstm", LSTMConfig, _lstm)                       # a language model: the trainer's stream task
register_arch("seq2seq", Seq2SeqConfig, _seq2seq)
register_arch("memn2n", MemN2NConfig, _memn2n)
register_task("seq2seq", _pairs_task)
register_task("memn2n", _babi_task)

__all__ = ["LSTMConfig", "MemN2NConfig", "Seq2SeqConfig"]
