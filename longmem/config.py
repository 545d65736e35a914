"""Typed configs, YAML load/save, dotted overrides and validation.

One dataclass per concern. Field ``metadata["help"]`` is the CLI help text.
The resolved run config is saved beside every checkpoint (``config.yaml``) and
is enough to rebuild the model. On disk the memory config is a top-level
``memory:`` section; in Python it lives at ``ModelConfig.memory``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MemoryKind = Literal["none", "xl", "knn", "tokens"]
Arch = Literal["transformer", "lstm", "seq2seq", "memn2n"]
IMPLEMENTED_KINDS = ("none", "xl", "knn", "tokens")
MAX_INT = 2**31 - 1         # no count, size, step or seed of a run is larger: a larger value can only be a mistake
MAX_PER_STEP = 2**16        # micro-batches (train.grad_accum) or segments (bptt, curriculum) in one optimizer step


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class MemoryConfig:
    kind: MemoryKind = _help("memory kind: none | xl | knn | tokens", default="none")
    mem_len: int = _help("Transformer-XL memory: past states kept per layer and lane "
                         "(Dai et al. 2019 §3.2); 0 disables recurrence", default=0)
    # kNN long-term memory (Memorizing Transformers, Wu et al. 2022); used when kind="knn"
    knn_layers: list[int] = _help("blocks that retrieve from the kNN memory (0-based, negative counts "
                                  "from the top); empty means the block at 3/4 depth", default_factory=list)
    knn_k: int = _help("entries retrieved per query and head (Wu et al. 2022 use 32)", default=32)
    knn_capacity: int = _help("kNN memory entries kept per lane, layer and head; the oldest are evicted first",
                              default=8192)
    knn_backend: Literal["torch", "faiss"] = _help("kNN search: torch (exact, chunked matmul + top-k) | "
                                                   "faiss (extra 'faiss'; see knn_index)", default="torch")
    knn_index: Literal["flat", "hnsw", "ivf"] = _help("faiss index: flat (exact) | hnsw | ivf (approximate)",
                                                      default="flat")
    knn_normalize: bool = _help("L2-normalize queries and keys of the kNN memory (Wu et al. 2022 §3)",
                                default=True)
    knn_chunk: int = _help("memory entries scored per matmul in the torch search (bounds extra memory)",
                           default=4096)
    # recurrent memory tokens (RMT, Bulatov et al. 2022); used when kind="tokens", with XL alongside if mem_len > 0
    n_mem_tokens: int = _help("kind tokens: memory tokens read at the start of each segment and written at its "
                              "end; their outputs are the next segment's memory (Bulatov et al. 2022)", default=8)
    token_gate: bool = _help("kind tokens: gated memory update, new = (1 - g) * old + g * written with a gate "
                             "g = sigmoid(W written + b) per token and width (the Block-Recurrent Transformer's "
                             "state gate, Hutchins et al. 2022); false: the written outputs replace the memory "
                             "(Bulatov et al. 2022). A closed gate keeps the memory unchanged through segments "
                             "that hold nothing worth writing", default=False)
    token_gate_stretch: float = _help("kind tokens with token_gate: the gate stretched by e and clipped, "
                                      "g = clamp((1 + 2e) sigmoid(W written + b) - e, 0, 1) (the hard-concrete "
                                      "stretch, Louizos et al. 2018), so it can close exactly and a memory kept "
                                      "through filler segments does not drift at all; 0: the plain sigmoid, "
                                      "which only approaches 0", default=0.0)
    token_gate_floor: float = _help("kind tokens with token_gate: a gate below this value is taken as 0 (the memory "
                                    "element kept exactly), in training (straight through, like the clip) and "
                                    "in evaluation; may be set at evaluation only (longmem eval RUN "
                                    "--memory.token_gate_floor 0.05). Gates that settle a little above 0 in "
                                    "filler segments let the memory creep over hundreds of them; 0: off",
                                    default=0.0)
    token_gate_penalty: float = _help("kind tokens with token_gate, training only: this weight times the mean "
                                      "gate of every lane and written segment is added to the summed loss "
                                      "(which is divided by the number of targets): writing costs, so the gate "
                                      "closes in segments with nothing worth keeping and the memory does not "
                                      "drift through them. With token_gate_stretch e the stretched gate g is "
                                      "charged g + e/2 down to g = -e/2: shut exactly, with a margin. The "
                                      "logged training loss includes the charge; validation loss does not. 0: off",
                                      default=0.0)
    token_noise: float = _help("kind tokens, training only: Gaussian noise of this standard deviation added to the "
                               "memory read at each segment (the memory has unit RMS); a memory that must survive "
                               "noise learns to restore itself at every write, so it drifts less over many segments "
                               "than the few it was trained on. 0: off", default=0.0)

    def __post_init__(self):
        _check_numbers(self, "memory")
        if self.kind not in typing.get_args(MemoryKind):
            raise ValueError(f"memory.kind={self.kind!r}; accepted: {', '.join(typing.get_args(MemoryKind))}")
        if self.kind not in IMPLEMENTED_KINDS:
            raise ValueError(f"memory.kind={self.kind!r} is not implemented yet; available: "
                             f"{', '.join(IMPLEMENTED_KINDS)}")
        if self.mem_len < 0:
            raise ValueError(f"memory.mem_len must be >= 0, got {self.mem_len}")
        if self.kind == "none" and self.mem_len:
            raise ValueError("memory.mem_len > 0 needs memory.kind='xl', 'knn' or 'tokens' "
                             "(kind 'none' keeps no memory)")
        if self.token_noise < 0:
            raise ValueError(f"memory.token_noise must be >= 0, got {self.token_noise}")
        if self.token_gate_stretch < 0:
            raise ValueError(f"memory.token_gate_stretch must be >= 0, got {self.token_gate_stretch}")
        if self.token_gate_stretch > 0 and not self.token_gate:
            raise ValueError("memory.token_gate_stretch > 0 needs memory.token_gate true (it shapes the gate)")
        if not 0 <= self.token_gate_floor < 1:
            raise ValueError(f"memory.token_gate_floor must be in [0, 1), got {self.token_gate_floor}")
        if self.token_gate_floor > 0 and not self.token_gate:
            raise ValueError("memory.token_gate_floor > 0 needs memory.token_gate true (it shapes the gate)")
        if self.token_gate_penalty < 0:
            raise ValueError(f"memory.token_gate_penalty must be >= 0, got {self.token_gate_penalty}")
        if self.token_gate_penalty > 0 and not self.token_gate:
            raise ValueError("memory.token_gate_penalty > 0 needs memory.token_gate true (it charges the gate)")
        if self.n_mem_tokens <= 0:
            raise ValueError(f"memory.n_mem_tokens must be positive, got {self.n_mem_tokens}")
        if isinstance(self.knn_layers, int) and not isinstance(self.knn_layers, bool):
            self.knn_layers = [self.knn_layers]
        if (not isinstance(self.knn_layers, (list, tuple))
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.knn_layers)):
            raise ValueError(f"memory.knn_layers must be a list of block indices like [2] or [-1], "
                             f"got {self.knn_layers!r}")
        self.knn_layers = list(self.knn_layers)
        for name in ("knn_k", "knn_capacity", "knn_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"memory.{name} must be positive, got {getattr(self, name)}")
        if self.kind == "knn" and self.knn_k > self.knn_capacity:
            raise ValueError(f"memory.knn_k={self.knn_k} exceeds memory.knn_capacity={self.knn_capacity}")
        if self.knn_backend not in ("torch", "faiss"):
            raise ValueError(f"memory.knn_backend={self.knn_backend!r}; accepted: torch, faiss")
        if self.knn_index not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"memory.knn_index={self.knn_index!r}; accepted: flat, hnsw, ivf")


@dataclass
class ModelConfig:
    arch: Arch = _help("transformer (MemoryLM) | lstm (LSTM LM, state carried across segments) | seq2seq "
                       "(Transformer encoder-decoder, source -> target) | memn2n (end-to-end memory network, bAbI)",
                       default="transformer")
    vocab_size: int = _help("vocabulary size (set from the tokenizer when training)", default=256)
    d_model: int = _help("width of the residual stream", default=128)
    n_layers: int = _help("number of Transformer blocks", default=4)
    n_heads: int = _help("attention heads per block", default=4)
    d_ff: int = _help("hidden width of the MLP; 0 means 4 * d_model", default=0)
    segment_len: int = _help("tokens processed per segment; longer calls are split", default=128)
    dropout: float = _help("dropout on embeddings, attention weights and residual branches", default=0.0)
    rope_base: float = _help("rotary embedding base (Su et al. 2021)", default=10000.0)
    smear_keys: bool = _help("transformer: mix each attention key with the previous position's key, a learned "
                             "share per head (smeared keys, Olsson et al. 2022): one layer can then match "
                             "\"the token after an earlier occurrence of this one\", and copying / associative "
                             "recall is learned many times faster; kNN memory stores the smeared keys",
                             default=False)
    hops: int = _help("memn2n: memory hops K (Sukhbaatar et al. 2015 §2.2)", default=3)
    memory_size: int = _help("memn2n: most recent sentences kept in memory", default=50)
    pe_formula: Literal["code", "paper"] = _help(
        "memn2n position encoding: code: l_kj = 1 + 4 (k - (d+1)/2)(j - (J+1)/2) / (d J), the authors' released "
        "code (word weights average 1) | paper: (1 - j/J) - (k/d)(1 - 2j/J) as printed in §4.1 (about half the "
        "code's weights; bAbI task 16 stays at half its answers wrong with it, BENCHMARKS.md); J is each "
        "sentence's own length", default="code")
    attend_empty: bool = _help(
        "memn2n: the attention softmax also counts the empty slots up to memory_size, at score 0 (the authors' "
        "code: an empty slot holds the zero nil embedding), so a hop can attend to nothing; off: softmax over "
        "the story's sentences only", default=True)
    memory: MemoryConfig = field(default_factory=MemoryConfig, metadata={"help": "memory settings"})

    def __post_init__(self):
        if isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        _check_numbers(self, "model")
        if self.rope_base <= 0:
            raise ValueError(f"model.rope_base must be positive, got {self.rope_base}")
        if self.arch not in typing.get_args(Arch):
            raise ValueError(f"model.arch={self.arch!r}; accepted: {', '.join(typing.get_args(Arch))}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "segment_len", "hops", "memory_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.arch != "transformer" and self.memory.kind != "none":
            raise ValueError(f"model.arch={self.arch!r} has its own memory; memory.kind must be 'none', "
                             f"got {self.memory.kind!r}")
        if self.pe_formula not in ("code", "paper"):
            raise ValueError(f"model.pe_formula={self.pe_formula!r}; accepted: code, paper")
        if self.smear_keys and self.arch != "transformer":
            raise ValueError(f"model.smear_keys is a transformer (MemoryLM) option; model.arch={self.arch!r} has "
                             f"no smeared keys")
        if self.arch in ("lstm", "memn2n"):                       # no attention heads to check
            self.d_ff = self.d_ff or 4 * self.d_model
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
            return
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for rotary positions")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DataConfig:
    path: str = _help("a .txt file, a folder of .txt files (one document per file) or a .jsonl file "
                      "(one document per line); empty means the embedded corpus (Python's pydoc topics); "
                      "seq2seq: a .jsonl of source/target pairs; memn2n: a bAbI folder or file (empty: generated "
                      "tasks, see task.*)", default="")
    text_field: str = _help("field holding the text in .jsonl lines and Hugging Face datasets", default="text")
    hf_dataset: str = _help("a Hugging Face dataset name (needs the `datasets` package and its files in "
                            "the local cache or network access); replaces data.path", default="")
    hf_config: str = _help("the Hugging Face dataset configuration", default="")
    hf_split: str = _help("the Hugging Face split read as the corpus", default="train")
    tokenizer: Literal["byte", "char", "bpe"] = _help(
        "byte (any UTF-8, vocab 256) | char (characters of the corpus) | bpe (byte-level BPE trained on the "
        "corpus with Hugging Face tokenizers)", default="byte")
    vocab_size: int = _help("vocabulary size of the bpe tokenizer", default=4096)
    cache: bool = _help("tokenize a file corpus once into a memory-mapped token file cached beside the data",
                        default=True)
    val_fraction: float = _help("fraction of documents held out for validation", default=0.1)
    batch_size: int = _help("lanes per batch: row i of each batch continues row i of the previous one", default=16)
    seed: int = _help("seed of the document split and lane order", default=0)

    def __post_init__(self):
        _check_numbers(self, "data")
        if self.vocab_size <= 0:
            raise ValueError(f"data.vocab_size must be positive, got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.path and self.hf_dataset:
            raise ValueError("give data.path or data.hf_dataset, not both")


@dataclass
class TrainConfig:
    max_steps: int = _help("optimizer steps", default=1000)
    optimizer: Literal["adamw", "sgd"] = _help(
        "adamw | sgd (plain SGD, as End-To-End Memory Networks train, Sukhbaatar et al. 2015 §4.2)",
        default="adamw")
    lr: float = _help("peak learning rate", default=1e-3)
    min_lr: float = _help("learning rate at the end of the cosine decay", default=1e-4)
    lr_halve_every: int = _help("0: cosine decay after the warm-up; N > 0: a step schedule instead, the learning "
                                "rate halved every N steps (Sukhbaatar et al. 2015 §4.2)", default=0)
    warmup_steps: int = _help("linear warm-up steps", default=50)
    weight_decay: float = _help("AdamW weight decay (matrices only: not norms, biases or the tied embedding)",
                                default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.95)
    grad_clip: float = _help("clip the gradient norm to this; 0 disables", default=1.0)
    grad_accum: int = _help("micro-batches per optimizer step (each continues the lanes)", default=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16 (with a gradient scaler)",
        default="auto")
    device: Literal["auto", "cpu", "cuda"] = _help("auto uses CUDA when available", default="auto")
    eval_every: int = _help("validate every N steps; 0 validates only at the end", default=200)
    eval_segments: int = _help("segments per lane in a periodic validation; 0 means the whole split", default=0)
    checkpoint_every: int = _help("save a checkpoint every N steps (also at each validation and at the end); "
                                  "0 saves only at validations and at the end", default=0)
    keep_last: int = _help("step checkpoints to keep (the best by validation loss is kept too)", default=2)
    patience: int = _help("early stopping: stop after N validations without improvement; 0 disables", default=0)
    log_every: int = _help("write a metrics.jsonl line every N steps", default=10)
    seed: int = _help("seed of weights and dropout", default=0)
    threads: int = _help("torch CPU threads; 0 leaves torch's default", default=0)
    progress: bool = _help("show a progress bar on stderr", default=True)
    bptt_segments: int = _help("backpropagation through segments: the graph spans K consecutive segments of a "
                               "lane (one micro-step reads K batches), the memory is detached beyond them; "
                               "memory.kind tokens learns to write its memory only with K >= 2", default=1)
    bptt_checkpoint: bool = _help("activation checkpointing per segment inside a bptt window: recompute each "
                                  "segment's activations in the backward pass, so memory does not grow with K",
                                  default=False)
    curriculum: str = _help("segments per training example, growing in equal stages over max_steps, comma-"
                            "separated (e.g. '1,2,4,8'); a stage's bptt window is min(stage, bptt_segments) and a "
                            "task stream's examples are stage * segment_len tokens; empty: no curriculum",
                            default="")
    penalty_start: int = _help("the model's training penalties (memory.token_gate_penalty) count from this step "
                               "on: the task is learned with the memory written freely first, then writing is "
                               "made to cost. 0: from the start", default=0)

    def __post_init__(self):
        for name in ("grad_accum", "bptt_segments"):         # each multiplies the work of one step
            if not 1 <= getattr(self, name) <= MAX_PER_STEP:
                raise ValueError(f"train.{name} must be from 1 to {MAX_PER_STEP} (an optimizer step reads "
                                 f"grad_accum x bptt_segments batches), got {getattr(self, name)}")
        _check_numbers(self, "train")
        if self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {self.max_steps}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError("train.lr must be positive and train.min_lr non-negative")
        for name in ("warmup_steps", "lr_halve_every", "eval_every", "eval_segments", "checkpoint_every",
                     "patience", "log_every", "threads", "penalty_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {self.keep_last}")
        self.curriculum_stages()                          # validates

    def curriculum_stages(self) -> list[int]:
        """The curriculum as a list of segments per example (empty: none)."""
        text = str(self.curriculum).strip()
        if not text:
            return []
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() and 0 < int(p) <= MAX_PER_STEP for p in parts):
            raise ValueError(f"train.curriculum={self.curriculum!r}: give segment counts from 1 to {MAX_PER_STEP} "
                             f"separated by commas, e.g. '1,2,4,8'")
        stages = [int(p) for p in parts]
        if len(stages) > self.max_steps:
            raise ValueError(f"train.curriculum has {len(stages)} stages but train.max_steps={self.max_steps}")
        return stages

    def segments_at(self, step: int) -> int:
        """Segments per example at optimizer step ``step`` (0-based): the curriculum stage, 0 without one."""
        stages = self.curriculum_stages()
        if not stages:
            return 0
        return stages[min(len(stages) - 1, step * len(stages) // self.max_steps)]

    def bptt_at(self, step: int) -> int:
        """The bptt window (segments per micro-step) at optimizer step ``step``."""
        stage = self.segments_at(step)
        return min(stage, self.bptt_segments) if stage else self.bptt_segments


@dataclass
class TaskConfig:
    """Tasks: bAbI for memn2n, source -> target pairs for seq2seq (see training/tasks.py), and the long-range
    probes a language model (transformer, lstm) can train on, the loss on answer tokens only
    (data/tasks/probes.py)."""
    name: Literal["auto", "babi", "copy", "passage", "passkey", "recall", "haystack"] = _help(
        "auto (babi for memn2n, passage for seq2seq, the data.path corpus for language models) | babi "
        "(data.path: bAbI folder/file, empty: generated stories) | copy (target = source) | passage (answer a "
        "key from the far start of a long passage) | passkey (a number hidden in filler) | recall (key=value "
        "pairs asked again later) | haystack (bAbI facts scattered through task.distractor text); seq2seq reads "
        "source/target pairs instead when data.path is a .jsonl file", default="auto")
    babi_tasks: str = _help("bAbI task ids, comma-separated (e.g. '1' per task, '1,2,3'); empty: all tasks "
                            "found (1,2,3 when generated)", default="")
    n_train: int = _help("generated tasks: training examples per task", default=1000)
    n_test: int = _help("generated tasks: test examples per task (probes: validation examples)", default=200)
    source_len: int = _help("generated seq2seq tasks: characters of a source", default=64)
    min_source_len: int = _help("generated seq2seq tasks: 0 makes every source task.source_len long; N > 0 draws "
                                "the length of each training/validation source between N and task.source_len "
                                "(short passages first teach the lookup); test sources are always task.source_len",
                                default=0)
    linear_start_steps: int = _help("memn2n: at most this many first steps without the softmax in memory "
                                    "(linear start, Sukhbaatar et al. 2015 §4.2); it ends earlier when the "
                                    "validation loss stops falling (see task.linear_start_patience)", default=0)
    linear_start_patience: int = _help("memn2n: validations (train.eval_every) in a row without a new lowest "
                                       "linear-start validation loss that end linear start early (the paper's rule: "
                                       "1); 0 never ends it early: all task.linear_start_steps run, as in the "
                                       "authors' code (30 epochs for the joint model)", default=1)
    linear_start_lr: float = _help("memn2n: learning rate during linear start (0: train.lr; the paper uses "
                                   "0.005); the schedule of train.* starts when linear start ends", default=0.0)
    length: int = _help("probes (passkey, recall, haystack): tokens per training example", default=512)
    n_pairs: int = _help("recall: key=value pairs per example", default=8)
    distractor: str = _help("haystack: corpus (a path like data.path) whose text hides the facts; empty: the "
                            "embedded corpus", default="")
    time_noise: float = _help("memn2n: fraction of random empty memories inserted in training "
                              "(random noise, Sukhbaatar et al. 2015 §4.1)", default=0.1)

    def __post_init__(self):
        _check_numbers(self, "task")
        for name in ("n_train", "n_test", "source_len", "length", "n_pairs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"task.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_source_len <= self.source_len:
            raise ValueError(f"task.min_source_len must be in [0, task.source_len={self.source_len}], "
                             f"got {self.min_source_len}")
        if self.linear_start_lr < 0:
            raise ValueError(f"task.linear_start_lr must be >= 0, got {self.linear_start_lr}")
        if self.linear_start_patience < 0:
            raise ValueError(f"task.linear_start_patience must be >= 0, got {self.linear_start_patience}")
        if self.linear_start_steps < 0:
            raise ValueError(f"task.linear_start_steps must be >= 0, got {self.linear_start_steps}")
        if not 0.0 <= self.time_noise < 1.0:
            raise ValueError(f"task.time_noise must be in [0, 1), got {self.time_noise}")
        for part in filter(None, (p.strip() for p in self.babi_tasks.split(","))):
            if not part.isdigit() or not 1 <= int(part) <= 20:
                raise ValueError(f"task.babi_tasks={self.babi_tasks!r}: give task ids 1..20 separated by commas")


@dataclass
class RunConfig:
    """Everything a run needs; what ``config.yaml`` holds."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self):
        if self.model.arch != "transformer" and self.model.memory.kind != "none":
            raise ValueError(f"model.arch={self.model.arch!r} has its own memory; memory.kind must be 'none', "
                             f"got {self.model.memory.kind!r}")

    @property
    def memory(self) -> MemoryConfig:
        return self.model.memory

    # -- (de)serialization ---------------------------------------------------
    def to_dict(self) -> dict:
        model = dataclasses.asdict(self.model)
        memory = model.pop("memory")
        return {"model": model, "memory": memory,
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train),
                "task": dataclasses.asdict(self.task)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a mapping with sections {', '.join(SECTIONS)}")
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid sections: {', '.join(SECTIONS)}")
        parts = {}
        for section, klass in SECTIONS.items():
            values = d.get(section) or {}
            if not isinstance(values, dict):
                raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
            _check_keys(klass, values, section)
            parts[section] = klass(**{k: _coerce(klass, k, v, f"{section}.{k}") for k, v in values.items()})
        memory = parts.pop("memory")
        parts["model"].memory = memory
        return cls(**parts)

    def save(self, path: str | Path) -> None:
        from longmem.training.checkpoint import atomic_write_text
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @staticmethod
    def read(path: str | Path) -> dict:
        """The YAML mapping in ``path`` as written (before ``from_dict`` fills defaults and checks it)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, RecursionError) as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"{path} holds a YAML {type(d).__name__}, not a run config: a mapping with sections "
                             f"{', '.join(SECTIONS)}")
        return d or {}

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(cls.read(path))

    def override(self, overrides: dict[str, str]) -> "RunConfig":
        """A new config with dotted overrides applied (``{"train.lr": "3e-4"}``); values are YAML scalars."""
        d = self.to_dict()
        for key, raw in overrides.items():
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name or "." in name:
                raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
            _check_keys(SECTIONS[section], {name: None}, section)
            d[section][name] = _parse_scalar(SECTIONS[section], name, raw, key)
        return RunConfig.from_dict(d)


SECTIONS: dict[str, type] = {"model": ModelConfig, "memory": MemoryConfig, "data": DataConfig, "train": TrainConfig,
                             "task": TaskConfig}


def _fields(klass: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(klass) if not (klass is ModelConfig and f.name == "memory")}


def valid_keys() -> list[str]:
    return [f"{s}.{n}" for s, k in SECTIONS.items() for n in _fields(k)]


def config_help() -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every config field; the CLI shows these."""
    out = []
    for section, klass in SECTIONS.items():
        for name, f in _fields(klass).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((f"{section}.{name}", f.metadata.get("help", ""), default))
    return out


def _check_numbers(config, section: str) -> None:
    """No number of a config is negative, NaN, infinite or beyond MAX_INT (a size, count, step, seed, rate or
    weight); each class's ``__post_init__`` adds the tighter ranges of its fields."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if hint is int and not 0 <= value <= MAX_INT:
            raise ValueError(f"{section}.{f.name} must be an integer from 0 to {MAX_INT}, got {value}")
        if hint is float and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{section}.{f.name} must be a finite number >= 0, got {value}")


def did_you_mean(word: str, options) -> str:
    """ "; did you mean X?" for the option closest to a mistyped ``word`` (difflib), or ""."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _check_keys(klass: type, values: dict, section: str) -> None:
    allowed = _fields(klass)
    for k in values:
        if k not in allowed:
            keys = [f"{section}.{n}" for n in allowed]
            raise ValueError(f"unknown config key '{section}.{k}'{did_you_mean(f'{section}.{k}', keys)} (valid keys "
                             f"in '{section}': {', '.join(keys)})")


def _parse_scalar(klass: type, name: str, raw: Any, key: str) -> Any:
    """A command-line value: text fields keep the raw text, others are read as YAML scalars."""
    if not isinstance(raw, str) or typing.get_type_hints(klass)[name] is str:
        return raw
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):
        raise ValueError(f"{key}: cannot read value {raw!r}") from None


def _coerce(klass: type, name: str, value: Any, key: str) -> Any:
    hint = typing.get_type_hints(klass)[name]
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{key}={value!r}; accepted: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):                     # 1e4: YAML 1.1 reads it as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        return str(value)
    return value
