"""Memories of MemoryLM: the protocol (``base.py``), the state they share (``state.py``), one file per
memory, and the registry of kinds below (a kind is a list of memories built from the model config)."""
from longmem.models.memory.base import Memory, Segment, build_memories, register_kind
from longmem.models.memory.knn import KNNMemory
from longmem.models.memory.kv import KVMemory
from longmem.models.memory.local_global import LocalGlobalMemory
from longmem.models.memory.retrieval import RetrievalMemory, RetrievalState, retrieval_memory
from longmem.models.memory.state import (KNNState, KVState, LSTMState, State, TokensState, XLState,
                                         register_part)
from longmem.models.memory.tokens import TokenMemory
from longmem.models.memory.xl import XLMemory


def _xl(c):
    return XLMemory(mem_len=c.memory.mem_len, n_layers=c.n_layers, n_sinks=c.memory.n_sinks)


def _knn(c):
    return KNNMemory(config=c.memory.knn, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads_,
                     head_dim=c.head_dim_)


def _tokens(c):
    t = c.memory.tokens
    return TokenMemory(n_tokens=t.n_tokens, d_model=c.d_model, gate=t.gate == "sigmoid", stretch=t.stretch,
                       floor=t.floor)


register_kind("none", lambda c: [], training_free=True)
register_kind("xl", lambda c: [_xl(c)], training_free=True)
# kinds "knn" and "tokens" keep XL recurrence alongside (Wu et al. 2022 use it as local memory; Bulatov et al.
# 2022 §4 combine memory tokens with it); with mem_len 0 it keeps nothing
register_kind("knn", lambda c: [_xl(c), _knn(c)])
register_kind("tokens", lambda c: [_xl(c), _tokens(c)])
register_kind("sinks", lambda c: [KVMemory(window=c.memory.mem_len, n_layers=c.n_layers, n_sinks=c.memory.n_sinks)],
              training_free=True)
register_kind("retrieval", lambda c: [retrieval_memory(c)], training_free=True)
# Longformer's sliding window + global positions (Beltagy et al. 2020 §3.1): no weights, best trained with
register_kind("local_global", lambda c: [LocalGlobalMemory(window=c.memory.local_global.window,
                                                           n_global=c.memory.local_global.n_global,
                                                           n_layers=c.n_layers)], training_free=True)

__all__ = ["KNNMemory", "KNNState", "KVMemory", "KVState", "LSTMState", "LocalGlobalMemory", "Memory", "RetrievalMemory", "RetrievalState",
           "Segment", "State", "TokenMemory",
           "TokensState", "XLMemory", "XLState", "build_memories", "register_kind", "register_part"]
