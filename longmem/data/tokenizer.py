"""Tokenizers saved as ``tokenizer.json``: byte-level (any UTF-8, no unknown
token), character-level (the characters of the training corpus), word-level (bAbI),
byte-level BPE (Hugging Face ``tokenizers``, trained on the corpus) and bit vectors
(the NTM / DNC tasks).
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterable

from longmem.io import atomic_write_text

FORMAT = "longmem-tokenizer"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, every text encodes and decodes losslessly."""
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A function ids -> text that holds back incomplete UTF-8 sequences between calls."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: dec.decode(bytes(ids))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "type": "byte"}


class CharTokenizer:
    """One token per character seen in the corpus; id 0 is ``unk`` for unseen characters."""
    kind = "char"
    UNK = "\ufffd"

    def __init__(self, chars: Iterable[str]):
        chars = [c for c in dict.fromkeys(chars) if c != self.UNK]
        self.itos = [self.UNK] + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] if 0 <= i < len(self.itos) else self.UNK for i in ids)

    def stream_decoder(self):
        return self.decode

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "type": "char", "chars": self.itos[1:]}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer, saved as a plain ``tokenizer.json`` that Hugging Face tools
    read, with ``tokenizer_config.json`` beside it (special tokens, chat template, and
    ``longmem_tokenizer``: the longmem kind)."""
    kind = "hf"

    def __init__(self, hf, *, config: dict | None = None, generation_config: dict | None = None):
        self.hf = hf
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def stream_decoder(self):
        """Decodes the running sequence and returns the new text, holding back a
        trailing incomplete UTF-8 character."""
        ids: list[int] = []
        emitted = 0

        def step(new: Iterable[int]) -> str:
            nonlocal emitted
            ids.extend(new)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                return ""
            piece, emitted = text[emitted:], len(text)
            return piece
        return step

    def to_dict(self) -> dict:
        """Everything that decides the token ids (the token cache keys on it)."""
        return {"type": self.kind, "hf": json.loads(self.hf.to_str()), "config": self.config}

    def save(self, path: str | Path) -> None:
        """``path`` (tokenizer.json) and ``tokenizer_config.json`` (+ ``generation_config.json``) beside it."""
        path = Path(path)
        atomic_write_text(path, self.hf.to_str())
        atomic_write_text(path.with_name(CONFIG_FILE),
                          json.dumps({**self.config, "longmem_tokenizer": self.kind}, indent=1, ensure_ascii=False))
        if self.generation_config:
            atomic_write_text(path.with_name(GENERATION_FILE), json.dumps(self.generation_config, indent=1))


class PretrainedTokenizer(HFTokenizer):
    """The tokenizer of an imported pretrained model: its special tokens, chat template (``chat_template``)
    and end-of-turn tokens. ``encode`` gives the text's own tokens; a document or a fresh prompt starts
    with the BOS token when the model's config asks for it (``add_bos``, see :func:`start_ids`), as Hugging
    Face tokenizers do."""
    kind = "pretrained"

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @property
    def bos_id(self) -> int | None:
        tok = self.config.get("bos_token")
        return self.hf.token_to_id(tok) if isinstance(tok, str) else None

    @property
    def add_bos(self) -> bool:
        return bool(self.config.get("add_bos_token")) and self.bos_id is not None

    def end_of_turn(self):
        """The token ids and strings that end an assistant turn (``chat_template.StopTokens``)."""
        from longmem.pretrained.chat_template import end_of_turn
        return end_of_turn(self.hf, self.config, self.generation_config)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained with Hugging Face ``tokenizers`` (no unknown tokens: the
    256 byte symbols are always in the vocabulary)."""
    kind = "bpe"

    @classmethod
    def fit(cls, texts: Iterable[str], *, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers
        hf = HFTok(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)


class WordTokenizer:
    """One token per lower-case word (bAbI, MemN2N): id 0 pads, id 1 is ``<unk>`` for unseen words."""
    kind = "word"
    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, vocab: Iterable[str]):
        self.itos = [self.PAD, self.UNK] + [w for w in dict.fromkeys(vocab) if w not in (self.PAD, self.UNK)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "WordTokenizer":
        from longmem.data.tasks.babi import words
        seen = set()
        for t in texts:
            seen.update(words(t))
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        from longmem.data.tasks.babi import words
        return [self.stoi.get(w, 1) for w in words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids if 0 < i < len(self.itos))

    def stream_decoder(self):
        return lambda ids: " ".join(self.itos[i] for i in ids if 0 < i < len(self.itos)) + " "

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "type": "word", "words": self.itos[2:]}


class BitsTokenizer:
    """Random binary vectors of ``width`` bits as tokens (the NTM and DNC tasks, ``data/tasks/algorithmic.py``):
    id v < 2**width is the vector whose bits are v's binary digits (most significant first), then the
    markers ``SPECIALS``. Text is whitespace-separated: ``"0110 1011 | _ _"``."""
    kind = "bits"
    DELIM, QUERY, BLANK, REPEAT, END = "|", "?", "_", "*", "."
    SPECIALS = (DELIM, QUERY, BLANK, REPEAT, END)

    def __init__(self, width: int = 8):
        if not 1 <= width <= 16:
            raise ValueError(f"a bit-vector tokenizer takes 1 to 16 bits per vector, got {width}")
        self.width = width
        self.n_vectors = 2 ** width
        self.ids = {s: self.n_vectors + i for i, s in enumerate(self.SPECIALS)}

    @property
    def vocab_size(self) -> int:
        return self.n_vectors + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word in self.ids:
                out.append(self.ids[word])
            elif len(word) == self.width and set(word) <= {"0", "1"}:
                out.append(int(word, 2))
            else:
                raise ValueError(f"{word!r} is neither a vector of {self.width} bits (like {'01' * (self.width // 2)}"
                                 f"{'0' * (self.width % 2)}) nor a marker ({' '.join(self.SPECIALS)})")
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.token(i) for i in ids)

    def token(self, i: int) -> str:
        if 0 <= i < self.n_vectors:
            return format(i, f"0{self.width}b")
        return self.SPECIALS[i - self.n_vectors] if i < self.vocab_size else "<unk>"

    def stream_decoder(self):
        return lambda ids: self.decode(ids) + " "

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "type": "bits", "width": self.width}


Tokenizer = ByteTokenizer | CharTokenizer | BPETokenizer | WordTokenizer | BitsTokenizer | PretrainedTokenizer


def start_ids(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` as the start of a document or a fresh prompt: with the BOS token in front when the tokenizer's
    model expects one (a pretrained tokenizer with ``add_bos_token``) and it is not there already."""
    if getattr(tokenizer, "add_bos", False) and ids[:1] != [tokenizer.bos_id]:
        return [tokenizer.bos_id] + list(ids)
    return list(ids)
CONFIG_FILE, GENERATION_FILE = "tokenizer_config.json", "generation_config.json"


def build_tokenizer(kind: str, texts: Iterable[str], *, vocab_size: int = 4096) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.fit(texts)
    if kind == "word":
        return WordTokenizer.fit(texts)
    if kind == "bpe":
        if vocab_size < 257:
            raise ValueError(f"data.vocab_size must be > 256 for a byte-level BPE, got {vocab_size}")
        return BPETokenizer.fit(texts, vocab_size=vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; accepted: byte, char, bpe, word")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write ``tok`` to ``path`` (tokenizer.json): Hugging Face tokenizers as plain Hugging Face files
    (see :class:`HFTokenizer`), the others in longmem's own format."""
    if isinstance(tok, HFTokenizer):
        tok.save(path)
        return
    atomic_write_text(path, json.dumps(tok.to_dict(), ensure_ascii=False))


def _read_json_beside(path: Path, name: str) -> dict:
    other = path.with_name(name)
    if not other.is_file():
        return {}
    try:
        d = json.loads(other.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{other} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{other} must hold a JSON object")
    return d


def _load_hf(path: Path, text: str) -> HFTokenizer:
    """A plain Hugging Face tokenizer.json (and the config files beside it)."""
    from tokenizers import Tokenizer as HFTok
    try:
        hf = HFTok.from_str(text)
    except Exception as e:                                # tokenizers raises its own Exception type
        raise ValueError(f"{path} is not a tokenizer file Hugging Face tokenizers can read: {e}") from None
    config = _read_json_beside(path, CONFIG_FILE)
    kind = config.pop("longmem_tokenizer", "pretrained")
    if kind == "bpe":
        return BPETokenizer(hf)
    return PretrainedTokenizer(hf, config=config, generation_config=_read_json_beside(path, GENERATION_FILE))


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a longmem tokenizer (not valid JSON: {e})") from None
    if isinstance(d, dict) and "model" in d and "format" not in d:       # a plain Hugging Face tokenizer.json
        return _load_hf(path, path.read_text(encoding="utf-8"))
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path} is not a longmem tokenizer (missing format: {FORMAT!r})")
    if d.get("type") == "byte":
        return ByteTokenizer()
    if d.get("type") == "char" and isinstance(d.get("chars"), list):
        return CharTokenizer(d["chars"])
    if d.get("type") == "word" and isinstance(d.get("words"), list):
        return WordTokenizer(d["words"])
    if d.get("type") == "bits" and isinstance(d.get("width"), int):
        return BitsTokenizer(d["width"])
    if d.get("type") == "bpe" and isinstance(d.get("hf"), dict):
        from tokenizers import Tokenizer as HFTok
        try:
            return BPETokenizer(HFTok.from_str(json.dumps(d["hf"])))
        except Exception as e:                            # tokenizers raises its own Exception type
            raise ValueError(f"{path}: the BPE tokenizer inside cannot be read: {e}") from None
    raise ValueError(f"{path}: unknown tokenizer type {d.get('type')!r}; accepted: byte, char, bpe, word, bits")
