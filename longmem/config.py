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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from longmem.io import atomic_write_text

BUILTIN_KINDS = ("none", "xl", "knn", "tokens")
METRIC_LOGGERS = ("jsonl", "tensorboard", "wandb")       # train.loggers; longmem.training.loggers builds them

# memory kinds by name -> builder(ModelConfig) -> list of memories. ``longmem.models.memory`` registers the
# built-in kinds (and users theirs, with ``longmem.models.memory.register_kind``); config only checks names.
MEMORY_KINDS: dict[str, Any] = {}
MAX_INT = 2**31 - 1         # no count, size, step or seed of a run is larger: a larger value can only be a mistake
MAX_PER_STEP = 2**16        # micro-batches (train.grad_accum) or segments (bptt, curriculum) in one optimizer step
PRESETS = Path(__file__).resolve().parent / "configs"   # YAML presets shipped with the package (--config tiny)


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class KNNConfig:
    """kNN long-term memory (Memorizing Transformers, Wu et al. 2022); used by kind knn."""
    layers: list[int] = _help("blocks that retrieve from the kNN memory (0-based, negative counts from the top); "
                              "empty means the block at 3/4 depth", default_factory=list)
    k: int = _help("entries retrieved per query and head (Wu et al. 2022 use 32)", default=32)
    capacity: int = _help("kNN memory entries kept per lane, layer and head; the oldest are evicted first",
                          default=8192)
    backend: Literal["torch", "faiss"] = _help("kNN search: torch (exact, chunked matmul + top-k) | faiss (extra "
                                               "'faiss': persistent indexes per lane and head, updated as the "
                                               "store moves; see memory.knn.index)", default="torch")
    index: Literal["flat", "hnsw", "ivf"] = _help("faiss index: flat (exact) | hnsw | ivf (approximate; recall in "
                                                  "BENCHMARKS.md)", default="flat")
    normalize: bool = _help("L2-normalize queries and keys of the kNN memory (Wu et al. 2022 §3)", default=True)
    chunk: int = _help("memory entries scored per matmul in the torch search (bounds extra memory)", default=8192)
    nprobe: int = _help("faiss ivf: inverted lists searched per query (of sqrt(capacity)); more is slower and "
                        "closer to exact", default=32)
    ef_search: int = _help("faiss hnsw: candidate list size of a search (efSearch); more is slower and closer to "
                           "exact", default=64)
    hnsw_m: int = _help("faiss hnsw: links per entry in the graph (M); more is slower to write, closer to exact",
                        default=32)

    def __post_init__(self):
        _check_numbers(self, "memory.knn")
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if (not isinstance(self.layers, (list, tuple))
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)):
            raise ValueError(f"memory.knn.layers must be a list of block indices like [2] or [-1], got {self.layers!r}")
        self.layers = list(self.layers)
        for name in ("k", "capacity", "chunk", "nprobe", "ef_search", "hnsw_m"):
            if getattr(self, name) <= 0:
                raise ValueError(f"memory.knn.{name} must be positive, got {getattr(self, name)}")
        if self.backend not in ("torch", "faiss"):
            raise ValueError(f"memory.knn.backend={self.backend!r}; accepted: torch, faiss")
        if self.index not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"memory.knn.index={self.index!r}; accepted: flat, hnsw, ivf")


@dataclass
class TokensConfig:
    """Recurrent memory tokens (RMT, Bulatov et al. 2022); used by kind tokens, with XL alongside if
    memory.mem_len > 0."""
    n_tokens: int = _help("memory tokens read at the start of each segment and written at its end; their outputs "
                          "are the next segment's memory (Bulatov et al. 2022)", default=8)
    gate: Literal["none", "sigmoid"] = _help(
        "none: the written outputs replace the memory (Bulatov et al. 2022) | sigmoid: gated update, new = (1 - g) "
        "old + g written with g = sigmoid(W written + b) per token and width (the Block-Recurrent Transformer's "
        "state gate, Hutchins et al. 2022): a closed gate keeps the memory unchanged through segments that hold "
        "nothing worth writing; its mean is the auxiliary training loss that train.aux_weight charges",
        default="none")
    stretch: float = _help("gate sigmoid: the gate stretched by e and clipped, g = clamp((1 + 2e) sigmoid(W written "
                           "+ b) - e, 0, 1) (the hard-concrete stretch, Louizos et al. 2018), so it can close "
                           "exactly and a memory kept through filler segments does not drift at all; 0: the plain "
                           "sigmoid, which only approaches 0", default=0.0)
    floor: float = _help("gate sigmoid: a gate below this value is taken as 0 (the memory element kept exactly), "
                         "in training (straight through, like the clip) and in evaluation; may be set at "
                         "evaluation only (longmem eval RUN --memory.tokens.floor 0.05); 0: off", default=0.0)

    def __post_init__(self):
        _check_numbers(self, "memory.tokens")
        if self.n_tokens <= 0:
            raise ValueError(f"memory.tokens.n_tokens must be positive, got {self.n_tokens}")
        if self.gate not in ("none", "sigmoid"):
            raise ValueError(f"memory.tokens.gate={self.gate!r}; accepted: none, sigmoid")
        if self.stretch < 0:
            raise ValueError(f"memory.tokens.stretch must be >= 0, got {self.stretch}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"memory.tokens.floor must be in [0, 1), got {self.floor}")
        for name in ("stretch", "floor"):
            if getattr(self, name) > 0 and self.gate == "none":
                raise ValueError(f"memory.tokens.{name} > 0 needs memory.tokens.gate sigmoid (it shapes the gate)")


@dataclass
class RetrievalConfig:
    """Retrieval of evicted keys/values (InfLLM, Xiao et al. 2024); used by kind retrieval, with no training:
    every layer attends to [memory.n_sinks sinks; top_k blocks of the store; a window of memory.mem_len]."""
    block_size: int = _help("tokens per block: the window evicts whole blocks to the store, and retrieval picks "
                            "whole blocks", default=64)
    top_k: int = _help("blocks retrieved per segment and layer (each segment's queries choose)", default=8)
    capacity: int = _help("tokens kept in the store per lane and layer (a multiple of block_size); the oldest "
                          "blocks are evicted first (FIFO)", default=32768)
    query_chunk: int = _help("a block's score is its best token's match with the mean query of chunks of this "
                             "many segment tokens", default=64)
    store_dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "precision of the stored keys/values (bfloat16 halves the store's memory)", default="float32")
    backend: Literal["torch", "faiss"] = _help("block search: torch (exact, every stored key scored) | faiss (extra "
                                               "'faiss': a persistent index per lane and layer, updated as blocks "
                                               "enter and leave the store; see memory.retrieval.index)",
                                               default="torch")
    index: Literal["flat", "hnsw", "ivf"] = _help("faiss index: flat (exact: blocks of the torch search's scores) | "
                                                  "hnsw | ivf (approximate); each holds a float32 copy of the "
                                                  "stored keys",
                                                  default="flat")

    def __post_init__(self):
        _check_numbers(self, "memory.retrieval")
        if self.backend not in ("torch", "faiss"):
            raise ValueError(f"memory.retrieval.backend={self.backend!r}; accepted: torch, faiss")
        if self.index not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"memory.retrieval.index={self.index!r}; accepted: flat, hnsw, ivf")
        for name in ("block_size", "top_k", "capacity", "query_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"memory.retrieval.{name} must be positive, got {getattr(self, name)}")
        if self.capacity % self.block_size:
            raise ValueError(f"memory.retrieval.capacity={self.capacity} must be a multiple of "
                             f"memory.retrieval.block_size={self.block_size}")
        if self.store_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"memory.retrieval.store_dtype={self.store_dtype!r}; accepted: float32, bfloat16, "
                             f"float16")


@dataclass
class LocalGlobalConfig:
    """Sparse local + global attention (Longformer, Beltagy et al. 2020 §3.1), causal; used by kind local_global,
    which adds no weights: each token attends to itself and the ``window`` tokens before it, and to the first
    ``n_global`` positions of its lane's stream (the global positions), across segments."""
    window: int = _help("tokens before each token it attends to (Longformer's sliding window w, causal: only the "
                        "past half)", default=256)
    n_global: int = _help("first positions of each lane's stream that every later token attends to, at their true "
                          "distance (Longformer's global attention on chosen positions)", default=4)

    def __post_init__(self):
        _check_numbers(self, "memory.local_global")
        if self.window < 1:
            raise ValueError(f"memory.local_global.window must be positive, got {self.window}")
        if self.n_global < 0:
            raise ValueError(f"memory.local_global.n_global must be >= 0, got {self.n_global}")


@dataclass
class MemoryConfig:
    kind: str = _help("memory kind: none | xl (Transformer-XL recurrence) | knn (kNN memory + XL) | tokens "
                      "(memory tokens + XL) | sinks (attention sinks + a window of cached keys/values, no "
                      "training) | retrieval (sinks + window + blocks of evicted keys/values retrieved per segment, "
                      "no training) | local_global (a sliding window + global positions, Longformer; no weights) | "
                      "any kind registered with longmem.models.memory.register_kind", default="none")
    mem_len: int = _help("past positions kept per layer and lane: the Transformer-XL memory (Dai et al. 2019 "
                         "§3.2), or the window of a key/value cache (kind sinks); 0 disables recurrence", default=0)
    n_sinks: int = _help("first positions of each lane kept in memory for good besides the last mem_len "
                         "(attention sinks, StreamingLLM, Xiao et al. 2023); kinds xl and sinks", default=0)
    knn: KNNConfig = _help("kNN memory settings", default_factory=KNNConfig)
    tokens: TokensConfig = _help("memory token settings", default_factory=TokensConfig)
    retrieval: RetrievalConfig = _help("retrieval memory settings", default_factory=RetrievalConfig)
    local_global: LocalGlobalConfig = _help("local + global attention settings (kind local_global)",
                                            default_factory=LocalGlobalConfig)
    options: dict = _help("settings of a memory kind registered outside longmem (a mapping it reads)",
                          default_factory=dict)

    def __post_init__(self):
        if isinstance(self.knn, dict):
            self.knn = KNNConfig(**self.knn)
        if isinstance(self.tokens, dict):
            self.tokens = TokensConfig(**self.tokens)
        if isinstance(self.retrieval, dict):
            self.retrieval = RetrievalConfig(**self.retrieval)
        if isinstance(self.local_global, dict):
            self.local_global = LocalGlobalConfig(**self.local_global)
        _check_numbers(self, "memory")
        if MEMORY_KINDS and self.kind not in MEMORY_KINDS:
            raise ValueError(f"memory.kind={self.kind!r}; accepted: {', '.join(MEMORY_KINDS)}")
        if self.mem_len < 0:
            raise ValueError(f"memory.mem_len must be >= 0, got {self.mem_len}")
        if self.kind == "none" and self.mem_len:
            raise ValueError("memory.mem_len > 0 needs a memory kind such as 'xl', 'knn', 'tokens' or 'sinks' "
                             "(kind 'none' keeps no memory)")
        if self.kind == "retrieval" and self.mem_len < 1:
            raise ValueError("memory.kind retrieval needs memory.mem_len > 0: the local window")
        if not 0 <= self.n_sinks < max(self.mem_len, 1):
            raise ValueError(f"memory.n_sinks must be in [0, memory.mem_len), got {self.n_sinks} "
                             f"(memory.mem_len={self.mem_len})")
        if self.kind == "knn" and self.knn.k > self.knn.capacity:
            raise ValueError(f"memory.knn.k={self.knn.k} exceeds memory.knn.capacity={self.knn.capacity}")
        if not isinstance(self.options, dict):
            raise ValueError(f"memory.options must be a mapping, got {self.options!r}")


@dataclass
class ModelConfig:
    arch: str = _help("transformer (MemoryLM, these settings) | lstm (LSTM LM, state carried across segments) | "
                      "seq2seq (Transformer encoder-decoder, source -> target) | memn2n (end-to-end memory network, "
                      "bAbI) | ntm (Neural Turing Machine) | dnc (Differentiable Neural Computer): the classic "
                      "baselines (longmem.classic) have settings of their own", default="transformer")
    vocab_size: int = _help("vocabulary size (set from the tokenizer when training)", default=256)
    d_model: int = _help("width of the residual stream", default=128)
    n_layers: int = _help("number of Transformer blocks", default=4)
    n_heads: int = _help("attention (query) heads per block", default=4)
    n_kv_heads: int = _help("key/value heads per block (grouped-query attention, Ainslie et al. 2023): n_heads / "
                            "n_kv_heads query heads share one; 0 means n_heads", default=0)
    head_dim: int = _help("size of one attention head; 0 means d_model / n_heads", default=0)
    d_ff: int = _help("hidden width of the MLP; 0 means 4 * d_model (gelu) or 8/3 * d_model rounded up to a "
                      "multiple of 8 (swiglu)", default=0)
    mlp: Literal["gelu", "swiglu"] = _help("gelu: down(gelu(up x)) (GPT-2) | swiglu: down(silu(gate x) * up x) "
                                           "(Shazeer 2020; the Llama family)", default="gelu")
    tie_embeddings: bool = _help("the output head shares the token embedding matrix (Press & Wolf 2017)",
                                 default=True)
    norm_eps: float = _help("epsilon of every RMSNorm", default=1e-6)
    qkv_bias: bool = _help("biases on the query, key and value projections (Qwen2)", default=False)
    qk_norm: bool = _help("per-head RMSNorm of queries and keys before rotary positions (Qwen3)", default=False)
    segment_len: int = _help("tokens processed per segment; longer calls are split", default=128)
    dropout: float = _help("dropout on embeddings, attention weights and residual branches", default=0.0)
    rope_theta: float = _help("rotary embedding base (Su et al. 2021)", default=10000.0)
    rope_scaling: dict = _help("rotary frequency scaling: {} (none) | {rope_type: linear, factor: F} (position "
                               "interpolation, Chen et al. 2023) | {rope_type: llama3, factor, low_freq_factor, "
                               "high_freq_factor, original_max_position_embeddings} (Llama 3.1)",
                               default_factory=dict)
    max_position_embeddings: int = _help("positions the model was trained on (a pretrained model's context); "
                                         "0: not known. Informational: longmem assigns positions inside the "
                                         "attention window", default=0)
    position_range: int = _help("grouped distant positions (Self-Extend, Jin et al. 2024), an evaluation setting: "
                                "the longest window (memory slots + segment) the model was trained on, e.g. "
                                "mem_len + segment_len; a longer window (a larger memory.mem_len at evaluation) "
                                "keeps exact distances below model.position_window and maps farther keys to "
                                "floor-divided group positions, so no query meets a distance it was not trained "
                                "on; a window that fits is read unchanged; 0 off", default=0)
    position_window: int = _help("with model.position_range: the neighbour window, distances read exactly; "
                                 "0 means position_range / 2", default=0)
    smear_keys: bool = _help("transformer: mix each attention key with the previous position's key, a learned "
                             "share per head (smeared keys, Olsson et al. 2022): one layer can then match "
                             "\"the token after an earlier occurrence of this one\", and copying / associative "
                             "recall is learned many times faster; kNN memory stores the smeared keys",
                             default=False)
    smear_width: int = _help("with smear_keys: positions mixed into each key, this one and the smear_width - 1 "
                             "before it, learned shares per head (a softmax over the offsets; a depthwise causal "
                             "convolution of the keys as in Primer, So et al. 2021 §3.2); 2: the previous one. "
                             "Wider lets a key say which words came a few tokens before it (bAbI: the subject of a "
                             "sentence at its place)", default=2)
    smear_queries: int = _help("transformer: mix into each query the keys of the smear_queries positions before it, "
                               "learned shares per query head (0: off). A query then says which words came just "
                               "before it, as wider smeared keys do for a key: one layer matches \"the place "
                               "written a few words after Mary\" from \"Where is Mary? Answer:\". Keys, not "
                               "queries, are mixed in, so every memory that holds past keys reads it exactly",
                               default=0)
    memory: MemoryConfig = field(default_factory=MemoryConfig, metadata={"help": "memory settings"})

    def __post_init__(self):
        if isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        _check_numbers(self, "model")
        if self.arch != "transformer":
            raise ValueError(f"model.arch={self.arch!r}: a ModelConfig is the memory Transformer's; the baselines have "
                             f"their own config classes ({', '.join(a for a in ARCH_CONFIGS if a != 'transformer')})")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "segment_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_heads", "head_dim", "d_ff", "max_position_embeddings"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0 (0: the default), got {getattr(self, name)}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"model.norm_eps must be a positive number, got {self.norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"model.rope_theta must be a positive number, got {self.rope_theta}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"model.mlp={self.mlp!r}; accepted: gelu, swiglu")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads} "
                             f"(or set model.head_dim)")
        if self.head_dim_ % 2:
            raise ValueError(f"head size {self.head_dim_} must be even for rotary positions")
        if self.n_heads % self.n_kv_heads_:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else -(-8 * self.d_model // 3 // 8) * 8
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"model.rope_scaling must be a mapping, got {self.rope_scaling!r}")
        if self.smear_queries < 0:
            raise ValueError(f"model.smear_queries must be >= 0 (0: off), got {self.smear_queries}")
        if self.smear_width < 2:
            raise ValueError(f"model.smear_width must be >= 2 (this key and the one before it), got {self.smear_width}")
        if self.position_range < 0 or self.position_window < 0:
            raise ValueError(f"model.position_range and model.position_window must be >= 0, got "
                             f"{self.position_range} and {self.position_window}")
        if self.position_range and not 0 <= self.position_window_ < self.position_range - 1:
            raise ValueError(f"model.position_window={self.position_window} must be below model.position_range - 1 "
                             f"= {self.position_range - 1} (the grouped positions need room beyond it)")

    @property
    def head_dim_(self) -> int:
        """The head size: ``head_dim`` or d_model / n_heads."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def position_window_(self) -> int:
        """The neighbour window of grouped positions: ``position_window`` or position_range / 2."""
        return self.position_window or self.position_range // 2

    @property
    def n_kv_heads_(self) -> int:
        """The key/value heads: ``n_kv_heads`` or n_heads."""
        return self.n_kv_heads or self.n_heads


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
    tokenizer: Literal["byte", "char", "word", "bpe", "pretrained"] = _help(
        "byte (any UTF-8, vocab 256) | char (characters of the corpus) | word (lower-case words of the corpus, "
        "punctuation dropped: bAbI as word tokens, as MemN2N and the DNC read it) | bpe (byte-level BPE trained on the "
        "corpus with Hugging Face tokenizers) | pretrained (the tokenizer of an imported model, kept as it is: "
        "runs made by longmem import, and train --train.init_from such a run)", default="byte")
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
    optimizer: Literal["adamw", "sgd", "rmsprop"] = _help(
        "adamw | sgd (plain SGD, as End-To-End Memory Networks train, Sukhbaatar et al. 2015 §4.2) | rmsprop "
        "(momentum 0.9, decay 0.95, as the Neural Turing Machine trains, Graves et al. 2014 §4)",
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
    mem_len_max: int = _help("randomized memory lengths (memory kind xl): keep this many past positions while "
                             "training and let each step read a random number of them, from memory.mem_len to this, "
                             "so evaluation with a memory up to this long (--memory.mem_len) meets only distances "
                             "seen in training; 0 off", default=0)
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
    loggers: str = _help("where metrics go besides RUN/metrics.jsonl (always written: resume and report.md read "
                         "it), comma-separated: jsonl | tensorboard (RUN/tensorboard/, extra 'tensorboard') | wandb "
                         "(Weights & Biases offline, RUN/wandb/, extra 'wandb'); e.g. jsonl,tensorboard",
                         default="jsonl")
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
    init_from: str = _help("a run directory whose weights start this run (fine-tuning): a pretrained model made by "
                           "longmem import, or any run of the same architecture; its model settings and tokenizer "
                           "are kept (memory.*, model.segment_len and model.dropout may differ), the parameters of "
                           "a memory it lacks start fresh; without --config the model section (memory included) "
                           "and data.tokenizer are taken from that run. Empty: from scratch", default="")
    aux_weight: float = _help("weight of the memories' auxiliary training loss, added to the summed cross-entropy "
                              "(which is divided by the number of targets): memory tokens with a gate are charged "
                              "their mean gate per lane and write (memory.tokens.gate), so writing costs and the "
                              "memory does not drift through segments with nothing worth keeping. The logged "
                              "training loss includes it; validation loss does not. 0: off", default=0.0)
    aux_start: int = _help("the auxiliary loss counts from this step on: the task is learned with the memory "
                           "written freely first, then writing is made to cost. 0: from the start", default=0)

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
                     "patience", "log_every", "threads", "aux_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {self.keep_last}")
        self.curriculum_stages()                          # validates
        self.logger_names()

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

    def logger_names(self) -> list[str]:
        """The metric loggers of ``loggers`` (``longmem.training.loggers``): jsonl first, whether named or not."""
        names = [p.strip() for p in str(self.loggers).split(",") if p.strip()]
        for name in names:
            if name not in METRIC_LOGGERS:
                raise ValueError(f"train.loggers: unknown logger {name!r} (accepted, comma-separated: "
                                 f"{', '.join(METRIC_LOGGERS)}){did_you_mean(name, METRIC_LOGGERS)}")
        return list(dict.fromkeys(["jsonl", *names]))

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
    """Tasks: bAbI for memn2n, source -> target pairs for seq2seq (see longmem/classic/tasks.py), and the long-range
    probes a language model (transformer, lstm) can train on, the loss on answer tokens only
    (data/tasks/probes.py)."""
    name: Literal["auto", "babi", "copy", "passage", "passkey", "recall", "haystack", "repeat_copy",
                  "associative_recall"] = _help(
        "auto (babi for memn2n, passage for seq2seq, the data.path corpus for language models) | babi "
        "(data.path: bAbI folder/file, empty: generated stories) | copy (seq2seq: target = source; lstm, ntm, "
        "dnc: copy random bit vectors, Graves et al. 2014 §4.1) | passage (answer a key from the far start of a "
        "long passage) | passkey (a number hidden in filler) | recall (key=value pairs asked again later) | "
        "haystack (bAbI facts scattered through task.distractor text) | repeat_copy, associative_recall (lstm, "
        "ntm, dnc: the bit-vector tasks of Graves et al. 2014 §4.2, §4.3); seq2seq reads source/target pairs "
        "instead when data.path is a .jsonl file", default="auto")
    babi_tasks: str = _help("bAbI task ids, comma-separated (e.g. '1' per task, '1,2,3'); empty: all tasks "
                            "found (1,2,3 when generated)", default="")
    n_train: int = _help("generated tasks: training examples per task", default=1000)
    n_test: int = _help("generated tasks: test examples per task (probes, bit-vector tasks: validation examples)",
                        default=200)
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
    bits: int = _help("copy, repeat_copy, associative_recall: bits W of each random vector (Graves et al. 2014 "
                      "§4: 8; sets model.bits)", default=8)
    min_len: int = _help("copy, repeat_copy: fewest vectors in a sequence; associative_recall: fewest items (at "
                         "least 2); drawn uniformly per example up to task.max_len (§4.1: 1..20; §4.3: 2..6)",
                         default=1)
    max_len: int = _help("copy, repeat_copy: most vectors in a training sequence; associative_recall: most items",
                         default=20)
    max_repeats: int = _help("repeat_copy: repeats drawn uniformly from 1..N per example (§4.2: 10)", default=10)

    def __post_init__(self):
        _check_numbers(self, "task")
        for name in ("n_train", "n_test", "source_len", "length", "n_pairs", "min_len", "max_repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"task.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_source_len <= self.source_len:
            raise ValueError(f"task.min_source_len must be in [0, task.source_len={self.source_len}], "
                             f"got {self.min_source_len}")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"task.bits must be from 1 to 16, got {self.bits}")
        if self.max_len < self.min_len:
            raise ValueError(f"task.max_len={self.max_len} must be at least task.min_len={self.min_len}")
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
    model: Any = field(default_factory=ModelConfig)        # ModelConfig, or a baseline's (ARCH_CONFIGS)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    @property
    def memory(self) -> MemoryConfig:
        return self.model.memory

    # -- (de)serialization ---------------------------------------------------
    def to_dict(self) -> dict:
        model = dataclasses.asdict(self.model)
        model.pop("memory", None)
        return {"model": model, "memory": dataclasses.asdict(self.model.memory),
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train),
                "task": dataclasses.asdict(self.task)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a mapping with sections {', '.join(SECTIONS)}")
        d = migrate_legacy(d)
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid sections: {', '.join(SECTIONS)}")
        values = d.get("model") or {}
        klass = model_class(values)
        parts = {section: _build(klass if section == "model" else k,
                                 _model_values(klass, values) if section == "model" else d.get(section) or {},
                                 section) for section, k in SECTIONS.items()}
        memory = parts.pop("memory")
        if klass is ModelConfig:
            parts["model"].memory = memory
        elif memory.kind != "none":
            raise ValueError(f"model.arch={parts['model'].arch!r} has its own memory; memory.kind must be 'none', "
                             f"got {memory.kind!r}")
        return cls(**parts)

    def save(self, path: str | Path) -> None:
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
        """A new config with dotted overrides applied (``{"train.lr": "3e-4", "memory.knn.k": "16"}``);
        values are YAML scalars (text fields keep the raw text)."""
        d = self.to_dict()
        overrides = dict(sorted(overrides.items(), key=lambda kv: kv[0] != "model.arch"))    # the arch first
        for key, raw in overrides.items():
            key, raw = legacy_key(key, raw)
            path = key.split(".")
            if path[0] not in SECTIONS or len(path) < 2:
                raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
            klass, node = SECTIONS[path[0]], d[path[0]]
            if path[0] == "model":
                klass = model_class(node) if key != "model.arch" else ModelConfig
            for depth, name in enumerate(path[1:-1], start=1):
                _check_keys(klass, {name: None}, ".".join(path[:depth]))
                hint = typing.get_type_hints(klass)[name]
                if hint is dict:                                     # a free mapping: memory.options.x
                    node = node.setdefault(name, {})
                    klass = None
                    break
                if not dataclasses.is_dataclass(hint):
                    raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
                klass, node = hint, node[name]
            name = path[-1]
            if klass is None:
                node[name] = yaml.safe_load(raw) if isinstance(raw, str) else raw
                continue
            _check_keys(klass, {name: None}, ".".join(path[:-1]))
            if dataclasses.is_dataclass(typing.get_type_hints(klass)[name]):
                raise ValueError(f"{key} is a group of settings; set one of them: "
                                 f"{', '.join(k for k in valid_keys() if k.startswith(key + '.'))}")
            node[name] = _parse_scalar(klass, name, raw, key)
        return RunConfig.from_dict(d)


# model.arch -> its config class: the memory Transformer here, the baselines registered by longmem.classic
ARCH_CONFIGS: dict[str, type] = {"transformer": ModelConfig}


def model_class(values: dict) -> type:
    """The config class of a ``model:`` mapping, by its ``arch`` (default transformer)."""
    arch = values.get("arch", "transformer") if isinstance(values, dict) else "transformer"
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"model.arch={arch!r}; accepted: {', '.join(ARCH_CONFIGS)}")
    return ARCH_CONFIGS[arch]


def _model_values(klass: type, values: dict) -> dict:
    """A ``model:`` mapping without the settings other architectures have and ``klass`` has not (a Transformer
    setting left in an LSTM's section, as files of longmem 0.1 and presets switched with --model.arch have)."""
    if not isinstance(values, dict):
        return values
    mine = set(_fields(klass))
    others = {n for k in ARCH_CONFIGS.values() if k is not klass for n in _fields(k)}
    return {k: v for k, v in values.items() if k in mine or k not in others}


SECTIONS: dict[str, type] = {"model": ModelConfig, "memory": MemoryConfig, "data": DataConfig, "train": TrainConfig,
                             "task": TaskConfig}


def _fields(klass: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(klass) if f.name != "memory"}


def _baseline_leaves():
    """(dotted key, field, arch) of the baselines' model settings the Transformer does not have."""
    mine = _fields(ModelConfig)
    for arch, klass in ARCH_CONFIGS.items():
        for name, f in _fields(klass).items():
            if name not in mine:
                yield f"model.{name}", f, arch


def _leaves(klass: type, prefix: str):
    """(dotted key, field) of every setting of ``klass``, nested groups flattened."""
    hints = typing.get_type_hints(klass)
    for name, f in _fields(klass).items():
        if dataclasses.is_dataclass(hints[name]):
            yield from _leaves(hints[name], f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", f


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as {dotted key: value} (mappings that are settings' values stay whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and key not in ("memory.options", "model.rope_scaling"):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def valid_keys() -> list[str]:
    """Every dotted config key: the Transformer's model settings, then the baselines' own (see ``config_help``)."""
    return [key for key, _, _ in config_help()]


def config_help() -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every config field; the CLI shows these. The baselines' own model
    settings come after the Transformer's, their help naming the ``model.arch`` they belong to."""
    out = []
    for section, klass in SECTIONS.items():
        for key, f in _leaves(klass, section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((key, f.metadata.get("help", ""), default))
        if section == "model":
            seen = set()
            for key, f, arch in _baseline_leaves():
                if key not in seen:
                    seen.add(key)
                    archs = [a for a, k in ARCH_CONFIGS.items() if key.split(".")[1] in _fields(k)]
                    out.append((key, f"(model.arch {' | '.join(archs)}) " + f.metadata.get("help", ""), f.default))
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


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """The YAML file ``name_or_path`` names: a file that exists, else the preset of that name shipped with
    longmem (``tiny`` or ``tiny.yaml``: ``PRESETS/tiny.yaml``), wherever the command runs."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if path.parent == Path(".") and (PRESETS / f"{stem}.yaml").is_file():
        return PRESETS / f"{stem}.yaml"
    presets = preset_names()
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found: it is neither a file nor a preset name"
                            f"{did_you_mean(stem, presets)} (presets shipped with longmem: {', '.join(presets)}); "
                            f"pass a YAML file or one of those names")


def _check_keys(klass: type, values: dict, section: str) -> None:
    allowed = _fields(klass)
    for k in values:
        if k not in allowed and section == "model":
            archs = [a for a, c in ARCH_CONFIGS.items() if k in _fields(c)]
            if archs:
                raise ValueError(f"model.{k} is a setting of model.arch {' | '.join(archs)}, not of "
                                 f"{getattr(klass, '__dataclass_fields__')['arch'].default}: set --model.arch too")
        if k not in allowed:
            keys = [f"{section}.{n}" for n in allowed]
            raise ValueError(f"unknown config key '{section}.{k}'{did_you_mean(f'{section}.{k}', keys)} (valid keys "
                             f"in '{section}': {', '.join(keys)})")


def _build(klass: type, values: Any, prefix: str):
    """``klass`` from a mapping read from YAML (or made by ``to_dict``), nested groups built recursively;
    unknown keys and wrong types raise ValueError naming the key."""
    if not isinstance(values, dict):
        raise ValueError(f"config section {prefix!r} must be a mapping, got {values!r}")
    _check_keys(klass, values, prefix)
    hints = typing.get_type_hints(klass)
    kwargs = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], v if v is not None else {}, f"{prefix}.{k}")
        else:
            kwargs[k] = _coerce(klass, k, v, f"{prefix}.{k}")
    return klass(**kwargs)


# settings renamed or regrouped since longmem 0.1: old key -> new key (run directories and commands written
# before still work). ``memory.token_noise`` (a superseded experiment) is gone; it only acted in training.
LEGACY_KEYS = {
    **{f"memory.knn_{k}": f"memory.knn.{k}" for k in ("layers", "k", "capacity", "backend", "index", "normalize",
                                                     "chunk")},
    "memory.n_mem_tokens": "memory.tokens.n_tokens", "memory.token_gate": "memory.tokens.gate",
    "memory.token_gate_stretch": "memory.tokens.stretch", "memory.token_gate_floor": "memory.tokens.floor",
    "memory.token_gate_penalty": "train.aux_weight", "train.penalty_start": "train.aux_start",
    "model.rope_base": "model.rope_theta",
}
REMOVED_KEYS = {"memory.token_noise": "memory.token_noise was removed (a superseded experiment; the gated recipe "
                                      "of memory.tokens replaces it)"}


def _legacy_value(old: str, value: Any) -> Any:
    if old == "memory.token_gate":                                   # a bool then, a gate type now
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, bool):
            raise ValueError(f"{old} must be true or false, got {value!r}")
        return "sigmoid" if value else "none"
    return value


def legacy_key(key: str, raw: Any) -> tuple[str, Any]:
    """A dotted key of an older longmem and its value mapped to today's, with a FutureWarning (a removed key:
    refused)."""
    if key in REMOVED_KEYS:
        raise ValueError(REMOVED_KEYS[key])
    if key in LEGACY_KEYS:
        warnings.warn(f"{key} is the old name of {LEGACY_KEYS[key]}; use the new one (old names will be removed)",
                      FutureWarning, stacklevel=3)
        return LEGACY_KEYS[key], _legacy_value(key, raw)
    return key, raw


def migrate_legacy(d: dict) -> dict:
    """A config mapping with the settings of older longmem versions moved to today's keys."""
    if not any(isinstance(d.get(s), dict) and any(f"{s}.{k}" in LEGACY_KEYS or f"{s}.{k}" in REMOVED_KEYS
                                                  for k in d[s]) for s in SECTIONS):
        return d
    d = {s: dict(v) if isinstance(v, dict) else v for s, v in d.items()}
    for old, new in LEGACY_KEYS.items():
        section, name = old.split(".")
        if not isinstance(d.get(section), dict) or name not in d[section]:
            continue
        value = _legacy_value(old, d[section].pop(name))
        *groups, leaf = new.split(".")
        node = d.setdefault(groups[0], {}) if isinstance(d.get(groups[0]), dict) or groups[0] not in d else {}
        d[groups[0]] = node
        for g in groups[1:]:
            node[g] = dict(node.get(g) or {})
            node = node[g]
        node.setdefault(leaf, value)
    for old in REMOVED_KEYS:
        section, name = old.split(".")
        if isinstance(d.get(section), dict):
            d[section].pop(name, None)
    return d


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
