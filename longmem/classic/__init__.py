"""The classic memory baselines, each with its own config, data, training task and scoring: the LSTM
language model, the Transformer encoder-decoder (seq2seq), end-to-end memory networks (MemN2N), the Neural
Turing Machine (NTM) and the Differentiable Neural Computer (DNC). Importing this package registers their
architectures (``model.arch``), training tasks and state parts (``states.py``)."""
from longmem.classic import states  # noqa: F401  (registers the ntm and dnc state parts)
from longmem.classic.config import DNCConfig, LSTMConfig, MemN2NConfig, NTMConfig, Seq2SeqConfig
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


def _ntm(config):
    from longmem.classic.ntm import NTM
    return NTM(config)


def _dnc(config):
    from longmem.classic.dnc import DNC
    return DNC(config)


def _babi_task(*args, **kw):
    from longmem.classic.tasks import BabiTask
    return BabiTask(*args, **kw)


def _pairs_task(*args, **kw):
    from longmem.classic.tasks import PairsTask
    return PairsTask(*args, **kw)


def _recurrent_task(cfg, *args, **kw):
    """lstm, ntm, dnc: the bit-vector tasks (``SequenceTask``), else a language model's stream."""
    from longmem.data.tasks.algorithmic import SEQUENCE_TASKS
    from longmem.data.tasks.sources import task_name
    if task_name(cfg) in SEQUENCE_TASKS:
        from longmem.classic.tasks import SequenceTask
        return SequenceTask(cfg, *args, **kw)
    if cfg.model.bits:
        raise ValueError(f"model.bits={cfg.model.bits} is for the bit-vector tasks (task.name copy, repeat_copy, "
                         f"associative_recall); a language model's task reads tokens: set model.bits 0")
    from longmem.training.task import StreamTask
    return StreamTask(cfg, *args, **kw)


register_arch("lstm", LSTMConfig, _lstm)                       # a language model, or the bit-vector tasks
register_arch("seq2seq", Seq2SeqConfig, _seq2seq)
register_arch("memn2n", MemN2NConfig, _memn2n)
register_arch("ntm", NTMConfig, _ntm)
register_arch("dnc", DNCConfig, _dnc)
register_task("seq2seq", _pairs_task)
register_task("memn2n", _babi_task)
for _arch in ("lstm", "ntm", "dnc"):
    register_task(_arch, _recurrent_task)

__all__ = ["DNCConfig", "LSTMConfig", "MemN2NConfig", "NTMConfig", "Seq2SeqConfig"]
