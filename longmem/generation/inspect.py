"""What the memory does over a text, as plain JSON: the data of the server's ``/inspect`` page.

:func:`inspect_text` feeds a text through a :class:`Decoder` (the views the server decodes with, so a
chat session's memory is read as it is kept) under ``models.inspect.trace`` and reports per token of the
text (lane 0):

- ``attention``: per traced layer, the attention mass (mean over heads) on the memory slots in front of the
  segment (XL memory, a key/value cache), on positions memories added (memory tokens), on the segment's
  own tokens, and by distance in the text in powers of two (``bins``);
- ``knn`` (kNN memory): per retrieving layer and head, the entries retrieved (as token positions of this
  text; negative ones were read before it, e.g. by the session), their scores and attention weights, and
  the gate of each head;
- ``memory_tokens`` (memory tokens): per segment, how much each memory token changed and its gate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from longmem.data.tokenizer import start_ids
from longmem.generation.decoding import Decoder
from longmem.models.inspect import N_BINS, SegmentTrace, bin_label, trace
from longmem.models.memory import State

if TYPE_CHECKING:
    from longmem.data.tokenizer import Tokenizer


def _r(t: torch.Tensor, digits: int = 4) -> Any:
    """A tensor as nested lists of floats rounded to ``digits`` (compact JSON)."""
    return torch.round(t.double() * 10 ** digits).div(10 ** digits).tolist()


def inspect_text(decoder: Decoder, tokenizer: Tokenizer, text: str, *, state: State | None = None, top: int = 5,
                 layers: list[int] | None = None) -> dict[str, Any]:
    """The memory's view of ``text`` fed after ``state`` (None: a fresh memory), as JSON-ready data (see the
    module docstring). ``state`` is read, not changed: pass a copy when it must stay as it is for memories
    that write in place (the retrieval memory). ``top``: retrieved entries kept per token, layer and head
    (the best by attention weight); ``layers``: the layers whose attention is summarized (None: all)."""
    model = decoder.model
    n_layers = model.config.n_layers
    traced = list(range(n_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n_layers for i in traced):
        raise ValueError(f"layers must be in [0, {n_layers}), got {layers}")
    ids = tokenizer.encode(text)
    ids = start_ids(tokenizer, ids) if state is None else ids
    if not ids:
        raise ValueError("the text encodes to no tokens; give a non-empty text")
    pending = int(state.pending.shape[1]) if state is not None and state.pending is not None else 0
    with trace(*decoder.views, layers=traced) as tracer, torch.no_grad():
        decoder.feed(torch.tensor([ids], device=decoder.device), state)
    segs = tracer.segments

    def column(get: Callable[[SegmentTrace], torch.Tensor]) -> torch.Tensor:                        # lane 0 of every segment, in order, pending dropped
        return torch.cat([get(s)[0] for s in segs], dim=0)[pending:]

    mass = {i: column(lambda s: s.mass[i]) for i in traced}                       # (N, 3)
    dist = {i: column(lambda s: s.by_distance[i]) for i in traced}                # (N, N_BINS)
    used = max((int((d.sum(0) > 0).nonzero().max()) + 1 for d in dist.values() if d.sum() > 0), default=1)
    out: dict[str, Any] = {
        "tokens": [{"id": t, "text": tokenizer.decode([t])} for t in ids],
        "memory": model.config.memory.kind, "segment_len": model.config.segment_len, "layers": traced,
        "bins": [bin_label(b) for b in range(min(used, N_BINS))],
        "attention": {"memory": [_r(mass[i][:, 0]) for i in traced], "added": [_r(mass[i][:, 1]) for i in traced],
                      "segment": [_r(mass[i][:, 2]) for i in traced],
                      "by_distance": [_r(dist[i][:, :used]) for i in traced]},
        "segments": [], "knn": None, "memory_tokens": None}
    start = -pending
    for s in segs:
        slots = next((int(m["slots"][0]) for m in s.memories.values() if "slots" in m), None)   # filled XL/cache slots
        out["segments"].append({"start": start, "length": s.n_tokens, "memory_slots": slots})
        start += s.n_tokens
    knn = [s.memories["knn"] for s in segs if "knn" in s.memories]
    if knn:
        out["knn"] = _knn(knn, segs, pending=pending, top=top)
    tokens = [(s, s.memories["tokens"]) for s in segs if "tokens" in s.memories]
    if tokens:
        whole = model.config.segment_len
        out["memory_tokens"] = {
            "n_tokens": int(tokens[0][1]["change"].shape[1]),
            "segments": [{"start": seg["start"], "written": s.n_tokens == whole, "change": _r(m["change"][0]),
                          "gate": None if m["gate"] is None else _r(m["gate"][0])}
                         for seg, (s, m) in zip(out["segments"], tokens)]}
    return out


def _knn(records: list[dict[str, Any]], segs: list[SegmentTrace], *, pending: int, top: int) -> dict[str, Any]:
    """The kNN part of :func:`inspect_text`: ``retrieved[token][layer][head]`` = [[position, score, weight], ...]
    (the best ``top`` by weight; position = token index in this text, negative before it)."""
    first = records[0]
    offset = int(first["written"][0]) + pending             # entries before the text's first token
    layers = first["layers"]
    retrieved: list[list[list[list[list[float]]]]] = []          # token, layer, head, entry, (pos, score, w)
    for rec, s in zip(records, segs):
        T = s.n_tokens
        per_layer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        for j in range(len(layers)):
            if j not in rec["entries"]:                     # nothing stored yet: no retrieval
                per_layer.append(None)
                continue
            w, order = rec["weights"][j][0].topk(min(top, rec["weights"][j].shape[-1]), dim=-1)   # (H, T, top)
            e = rec["entries"][j][0].gather(-1, order)
            sc = rec["scores"][j][0].gather(-1, order)
            per_layer.append((e, sc, w))
        for t in range(T):
            row: list[list[list[list[float]]]] = []
            for found in per_layer:
                if found is None:
                    row.append([])
                    continue
                e, sc, w = found
                row.append([[[int(e[h, t, n]) - offset, round(float(sc[h, t, n]), 4), round(float(w[h, t, n]), 4)]
                             for n in range(e.shape[-1]) if int(e[h, t, n]) >= 0] for h in range(e.shape[0])])
            retrieved.append(row)
    return {"layers": layers, "gate": _r(first["gate"]), "offset": offset, "retrieved": retrieved[pending:]}
