"""Settings of the classic baselines, one dataclass each (the ``model:`` section when ``model.arch`` names them).

The memory Transformer's settings are ``config.ModelConfig``; these hold only what each baseline reads.
Run directories of longmem 0.1 wrote every baseline with the Transformer's fields too: those are dropped on
load (``config.ARCH_CONFIGS`` names each class's fields).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from longmem.config import MemoryConfig, _check_numbers, _help


BITS_HELP = ("bits W of the bit-vector tasks (copy, repeat_copy, associative_recall; set from task.bits when "
             "training): a token is read as its W bits and marker channels and the output is W bit logits and an end "
             "bit, scored by bitwise cross-entropy (Graves et al. 2014 §4); 0: a token embedding and a softmax")


class _Classic:
    """What every baseline config shares: no pluggable memory (the model has its own)."""
    dropout: float

    @property
    def memory(self) -> MemoryConfig:
        return MemoryConfig()

    def _check(self, section: str = "model") -> None:
        _check_numbers(self, section)
        for name in ("vocab_size", "d_model", "n_layers", "hops", "memory_size", "segment_len", "n_heads",
                     "memory_slots", "memory_width", "read_heads"):
            if hasattr(self, name) and getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= getattr(self, "bits", 0) <= 16:
            raise ValueError(f"model.bits must be from 0 to 16, got {getattr(self, 'bits')}")


class _Recurrent(_Classic):
    """The recurrent baselines (lstm, ntm, dnc): language models (a corpus or a probe, as the Transformer) that
    also train on the bit-vector tasks of the Neural Turing Machine paper."""

    @staticmethod
    def task_name(cfg) -> str:
        """copy | repeat_copy | associative_recall (bit vectors), else a language model's task (lm or a probe)."""
        from longmem.data.tasks.algorithmic import SEQUENCE_TASKS
        from longmem.data.tasks.sources import lm_task_name
        return cfg.task.name if cfg.task.name in SEQUENCE_TASKS else lm_task_name(cfg)


@dataclass
class LSTMConfig(_Recurrent):
    """The LSTM language model (Hochreiter & Schmidhuber 1997), ``model.arch: lstm``."""
    arch: Literal["lstm"] = _help("lstm", default="lstm")
    vocab_size: int = _help("vocabulary size (set from the tokenizer when training)", default=256)
    d_model: int = _help("width of the embedding and of every LSTM layer", default=128)
    n_layers: int = _help("stacked LSTM layers", default=4)
    segment_len: int = _help("tokens per training segment (truncated backpropagation through time)", default=128)
    dropout: float = _help("dropout between layers and on the output", default=0.0)
    bits: int = _help(BITS_HELP, default=0)

    def __post_init__(self):
        self._check()


@dataclass
class Seq2SeqConfig(_Classic):
    """The Transformer encoder-decoder with attention (Vaswani et al. 2017), ``model.arch: seq2seq``."""
    arch: Literal["seq2seq"] = _help("seq2seq", default="seq2seq")
    vocab_size: int = _help("vocabulary size (set from the tokenizer when training)", default=256)
    d_model: int = _help("width of the residual stream", default=128)
    n_layers: int = _help("encoder and decoder blocks (each)", default=4)
    n_heads: int = _help("attention heads per block", default=4)
    d_ff: int = _help("hidden width of the MLP; 0 means 4 * d_model", default=0)
    dropout: float = _help("dropout on embeddings, attention weights and residual branches", default=0.0)
    rope_theta: float = _help("rotary embedding base (Su et al. 2021)", default=10000.0)

    def __post_init__(self):
        self._check()
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model.d_model={self.d_model} must be a multiple of model.n_heads={self.n_heads} with "
                             f"an even head size (rotary positions)")
        self.d_ff = self.d_ff or 4 * self.d_model

    @staticmethod
    def task_name(cfg) -> str:
        """pairs (a .jsonl data.path of source/target pairs) | copy | passage (generated; auto: passage)."""
        name = cfg.task.name
        if name not in ("auto", "copy", "passage"):
            raise ValueError(f"task.name={name} is not a seq2seq task; seq2seq takes copy, passage or a .jsonl "
                             f"data.path of source/target pairs")
        if cfg.data.path and Path(cfg.data.path).suffix == ".jsonl":
            return "pairs"
        if cfg.data.path:
            raise ValueError(f"seq2seq data.path must be a .jsonl file of source/target pairs, got {cfg.data.path}")
        return "passage" if name == "auto" else name


@dataclass
class MemN2NConfig(_Classic):
    """End-to-end memory networks (Sukhbaatar et al. 2015) on bAbI, ``model.arch: memn2n``."""
    arch: Literal["memn2n"] = _help("memn2n", default="memn2n")
    vocab_size: int = _help("vocabulary size (set from the tokenizer when training)", default=256)
    d_model: int = _help("embedding width", default=128)
    hops: int = _help("memory hops K (Sukhbaatar et al. 2015 §2.2)", default=3)
    memory_size: int = _help("most recent sentences kept in memory", default=50)
    pe_formula: Literal["code", "paper"] = _help(
        "position encoding: code: l_kj = 1 + 4 (k - (d+1)/2)(j - (J+1)/2) / (d J), the authors' released code "
        "(word weights average 1) | paper: (1 - j/J) - (k/d)(1 - 2j/J) as printed in §4.1 (about half the code's "
        "weights; bAbI task 16 stays at half its answers wrong with it, BENCHMARKS.md); J is each sentence's "
        "own length", default="code")
    attend_empty: bool = _help(
        "the attention softmax also counts the empty slots up to memory_size, at score 0 (the authors' code: an "
        "empty slot holds the zero nil embedding), so a hop can attend to nothing; off: softmax over the story's "
        "sentences only", default=True)
    dropout: float = _help("dropout on the answer's input", default=0.0)

    def __post_init__(self):
        self._check()
        if self.pe_formula not in ("code", "paper"):
            raise ValueError(f"model.pe_formula={self.pe_formula!r}; accepted: code, paper")

    @staticmethod
    def task_name(cfg) -> str:
        """babi: it answers bAbI questions (data.path a bAbI folder or file, empty: generated tasks)."""
        if cfg.task.name not in ("auto", "babi"):
            raise ValueError(f"model.arch=memn2n answers bAbI questions; task.name must be auto or babi, got "
                             f"{cfg.task.name!r}")
        return "babi"




@dataclass
class NTMConfig(_Recurrent):
    """The Neural Turing Machine (Graves et al. 2014, arXiv:1410.5401), ``model.arch: ntm``: an LSTM controller
    with ``read_heads`` read heads and one write head over a memory of ``memory_slots`` x ``memory_width``,
    addressed by content and location (§3.3)."""
    arch: Literal["ntm"] = _help("ntm", default="ntm")
    vocab_size: int = _help("vocabulary size (set from the tokenizer when training)", default=256)
    d_model: int = _help("width of the token embedding and of every controller LSTM layer (§4: 100)", default=100)
    n_layers: int = _help("stacked LSTM layers of the controller", default=1)
    memory_slots: int = _help("memory locations N (§4.1: 128)", default=128)
    memory_width: int = _help("width M of a memory location (§4.1: 20)", default=20)
    read_heads: int = _help("read heads (the write head is one more)", default=1)
    shift_range: int = _help("ntm: a head shifts its focus by -s..s locations per step (§3.3.2: s = 1)", default=1)
    segment_len: int = _help("tokens per training segment of a stream (truncated backpropagation through time)",
                             default=128)
    dropout: float = _help("dropout on the controller output", default=0.0)
    bits: int = _help(BITS_HELP, default=0)

    def __post_init__(self):
        self._check()
        if self.shift_range < 1 or 2 * self.shift_range + 1 > self.memory_slots:
            raise ValueError(f"model.shift_range must be at least 1 and 2 * shift_range + 1 at most "
                             f"model.memory_slots={self.memory_slots}, got {self.shift_range}")


@dataclass
class DNCConfig(_Recurrent):
    """The Differentiable Neural Computer (Graves et al. 2016, Nature 538, "Hybrid computing using neural
    networks"), ``model.arch: dnc``: an LSTM controller with ``read_heads`` read heads and one write head,
    content lookup, usage-based allocation and a temporal link matrix (Methods)."""
    arch: Literal["dnc"] = _help("dnc", default="dnc")
    vocab_size: int = _help("vocabulary size (set from the tokenizer when training)", default=256)
    d_model: int = _help("width of the token embedding and of every controller LSTM layer (bAbI: 256)",
                         default=128)
    n_layers: int = _help("stacked LSTM layers of the controller", default=1)
    memory_slots: int = _help("memory locations N (bAbI: 256)", default=64)
    memory_width: int = _help("width W of a memory location (bAbI: 64)", default=32)
    read_heads: int = _help("read heads R (bAbI: 4)", default=4)
    segment_len: int = _help("tokens per training segment of a stream (truncated backpropagation through time)",
                             default=128)
    dropout: float = _help("dropout on the controller output", default=0.0)
    bits: int = _help(BITS_HELP, default=0)

    def __post_init__(self):
        self._check()
