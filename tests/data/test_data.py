"""Tokenizers, corpora and ordered lanes."""
from __future__ import annotations

import itertools
import numpy as np
import pytest

from longmem.data.corpus import embedded_corpus, load_documents, split_documents
from longmem.data.stream import (PAD_ID, TrainStream, encode_documents, eval_batches, n_eval_batches)
from longmem.data.tokenizer import (ByteTokenizer, CharTokenizer, build_tokenizer, load_tokenizer,
                                    save_tokenizer)
from longmem.models import IGNORE_INDEX

UNICODE = "héllo wörld 🙂👩‍🔬 你好，世界 e\u0301 a\u0308\u0323 Ωμέγα \x00\t\n\r \U0010FFFF"


# -- tokenizers ---------------------------------------------------------------
def test_byte_tokenizer_round_trips_any_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert all(0 <= i < tok.vocab_size == 256 for i in ids)
    assert len(ids) == len(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    assert "\ufffd" not in tok.decode(ids)


def test_byte_stream_decoder_holds_back_partial_characters():
    tok = ByteTokenizer()
    decode = tok.stream_decoder()
    pieces = [decode([i]) for i in tok.encode(UNICODE)]
    assert "".join(pieces) == UNICODE
    assert all("\ufffd" not in p for p in pieces)


def test_char_tokenizer_round_trip_and_unknowns():
    text = "hello world, héllo 🙂"
    tok = CharTokenizer.fit([text, "xyz"])
    assert tok.vocab_size == len(set(text + "xyz")) + 1
    ids = tok.encode(text)
    assert 0 not in ids
    assert tok.decode(ids) == text
    assert tok.encode("hQ🙃") == [tok.encode("h")[0], 0, 0]
    assert tok.decode([0]) == CharTokenizer.UNK
    assert tok.decode([10_000]) == CharTokenizer.UNK


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer.fit(["the quick brown fox 🦊 jumps"])],
                         ids=["byte", "char"])
def test_tokenizer_save_load(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    text = "the fox jumps 🦊"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == text
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_load_tokenizer_refuses_other_files(tmp_path):
    path = tmp_path / "tokenizer.json"
    for content in ('{"model": {"type": "BPE"}}', "[1, 2, 3]", "not json",
                    '{"format": "longmem-tokenizer", "version": 1, "type": "bpe"}'):
        path.write_text(content)
        with pytest.raises(ValueError, match="tokenizer"):
            load_tokenizer(path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="byte, char, bpe"):
        build_tokenizer("wordpiece", ["text"])
    assert isinstance(build_tokenizer("char", ["ab"]), CharTokenizer)


# -- corpora --------------------------------------------------------------------
def test_split_never_cuts_a_document_and_is_seeded():
    docs = [f"document {i} " * (i + 1) for i in range(20)]
    train, val = split_documents(docs, val_fraction=0.25, seed=7)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == sorted(docs)                      # every doc on exactly one side
    assert not set(train) & set(val)
    assert train == [d for d in docs if d in train]                 # original order kept
    assert split_documents(docs, val_fraction=0.25, seed=7) == (train, val)
    assert split_documents(docs, val_fraction=0.25, seed=8) != (train, val)
    with pytest.raises(ValueError, match="none for training"):
        split_documents(docs[:2], val_fraction=0.9, seed=0)


def test_split_single_document_by_fraction():
    text = "abcdefghij" * 10
    train, val = split_documents([text], val_fraction=0.2, seed=0)
    assert train == [text[:80]] and val == [text[80:]]


def test_load_documents_from_folder_and_file(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first 🙂", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.md").write_text("not a document")
    assert load_documents(tmp_path) == ["first 🙂", "second", "third"]
    assert load_documents(str(tmp_path / "a.txt")) == ["first 🙂"]


def test_load_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path)                                     # a folder without .txt files
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match=".txt"):
        load_documents(tmp_path / "data.csv")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        load_documents(tmp_path / "blank.txt")


def test_non_utf8_file_is_decoded_with_replacement_and_a_warning(tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert load_documents(tmp_path / "latin1.txt") == ["caf\ufffd au lait"]
    [record] = [r for r in caplog.records if r.name == "longmem.data.corpus"]      # the library logs, never prints
    assert record.levelname == "WARNING"
    assert "latin1.txt" in record.getMessage() and "not valid UTF-8" in record.getMessage()


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one doc"}\n\n{"text": "two", "id": 2}\n')
    assert load_documents(path) == ["one doc", "two"]
    path.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="text_field|'text'"):
        load_documents(path)
    assert load_documents(path, text_field="body") == ["x"]
    path.write_text('{"text": \n')
    with pytest.raises(ValueError, match="docs.jsonl:1 is not valid JSON"):
        load_documents(path)


def test_bpe_tokenizer_trains_round_trips_and_saves(tmp_path):
    from longmem.data.tokenizer import BPETokenizer, build_tokenizer, load_tokenizer, save_tokenizer
    texts = embedded_corpus()[:10]
    tok = build_tokenizer("bpe", texts, vocab_size=400)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 400
    sample = "Ünïcode 🙂 and     spaces\n" + texts[0][:200]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode())                          # merges compress
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(sample) == ids
    step = again.stream_decoder()
    assert "".join(step([i]) for i in ids) == sample
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("bpe", texts, vocab_size=100)


def test_bpe_tokenizer_file_is_plain_hugging_face_and_the_old_wrapper_still_loads(tmp_path):
    import json

    from tokenizers import Tokenizer
    from longmem.data.tokenizer import BPETokenizer, build_tokenizer, load_tokenizer, save_tokenizer
    tok = build_tokenizer("bpe", embedded_corpus()[:10], vocab_size=300)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    sample = "the with statement 42"
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(sample).ids == tok.encode(sample)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample)
    # runs of longmem 0.1 wrapped the file in longmem's own format
    old = tmp_path / "old" / "tokenizer.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"format": "longmem-tokenizer", "version": 1, "type": "bpe",
                               "hf": json.loads(tok.hf.to_str())}))
    back = load_tokenizer(old)
    assert isinstance(back, BPETokenizer) and back.encode(sample) == tok.encode(sample)


def test_token_cache_is_memory_mapped_and_reused(tmp_path):
    from longmem.data.cache import cache_dir_for, encode_texts
    from longmem.data.tokenizer import ByteTokenizer, CharTokenizer
    (tmp_path / "a.txt").write_text("hello")
    cache = cache_dir_for(tmp_path)
    assert cache == tmp_path / ".longmem-cache"
    texts = ["hello world", "héllo", "x"]
    first = encode_texts(texts, ByteTokenizer(), cache_dir=cache)
    assert [list(map(int, a)) for a in first] == [list(t.encode()) for t in texts]
    assert isinstance(first[0].base, np.memmap) or isinstance(first[0], np.memmap)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2
    again = encode_texts(texts, ByteTokenizer(), cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == files         # reused, not rewritten
    assert [list(a) for a in again] == [list(a) for a in first]
    encode_texts(texts, CharTokenizer.fit(texts), cache_dir=cache)   # another tokenizer: another key
    assert len(list(cache.iterdir())) == 4
    encode_texts(texts + ["more"], ByteTokenizer(), cache_dir=cache)  # other text: another key
    assert len(list(cache.iterdir())) == 6


def test_embedded_corpus_is_the_default():
    docs = load_documents("")
    assert docs == embedded_corpus()
    assert len(docs) > 10 and all(isinstance(d, str) and d for d in docs)


# -- ordered lanes ------------------------------------------------------------------
def make_docs(lengths: list[int]) -> list[np.ndarray]:
    """Documents whose every token is unique, so a slice identifies its document."""
    docs, start = [], 1
    for n in lengths:
        docs.append(np.arange(start, start + n, dtype=np.int64))
        start += n
    return docs


def split_lane(batches, lane: int, docs: list[np.ndarray] | None = None) -> list[tuple[list[int], list[int]]]:
    """The real (inputs, targets) of lane ``lane``, one pair per document, split at resets.

    Checks on the way that padding (PAD_ID inputs, ignored targets) only fills the
    end of a document's last segment and, given ``docs`` (unique tokens), that
    reset is true exactly when the previous document in the lane has ended."""
    last_token = {int(d[0]): int(d[-1]) for d in docs} if docs is not None else None
    out, inputs, targets = [], [], []
    for i, b in enumerate(batches):
        x, y, reset = b.inputs[lane].tolist(), b.targets[lane].tolist(), bool(b.reset[lane])
        if last_token is not None:
            ended = not inputs or targets[-1] == last_token[inputs[0]]
            assert reset == (i == 0 or ended), f"batch {i}: reset={reset} but document ended={ended}"
        if reset and inputs:
            out.append((inputs, targets))
            inputs, targets = [], []
        n = sum(t != IGNORE_INDEX for t in y)
        assert y[n:] == [IGNORE_INDEX] * (len(y) - n), "padding only at the end of a segment"
        assert x[n:] == [PAD_ID] * (len(y) - n)
        inputs += x[:n]
        targets += y[:n]
        if last_token is not None and n < len(y) and inputs:
            assert targets[-1] == last_token[inputs[0]], "padding only in a document's last segment"
    if inputs:
        out.append((inputs, targets))
    return out


@pytest.fixture
def docs():
    return make_docs([23, 5, 2, 40, 11, 17])


def check_document(inputs: list[int], targets: list[int], docs: list[np.ndarray], *, whole: bool = True) -> int:
    """The document these tokens come from (by first token); they are all of it or a prefix."""
    doc = next(d for d in docs if d[0] == inputs[0])
    n = len(doc) - 1 if whole else len(inputs)
    assert inputs == doc[:n].tolist()
    assert targets == doc[1:n + 1].tolist()                          # targets: inputs shifted by one
    return int(doc[0])


def test_train_stream_lanes_continue_their_documents(docs):
    seg, batch_size = 4, 3
    stream = TrainStream(docs, batch_size=batch_size, seg_len=seg, seed=0)
    batches = list(itertools.islice(stream, 80))
    assert all(b.inputs.shape == b.targets.shape == (batch_size, seg) for b in batches)
    assert bool(batches[0].reset.all())
    all_ids = sorted(int(d[0]) for d in docs)
    orders = []
    for lane in range(batch_size):
        *finished, (open_x, open_y) = split_lane(batches, lane, docs)
        assert len(finished) >= 2 * len(docs)                        # at least two epochs
        seen = [check_document(x, y, docs) for x, y in finished]
        check_document(open_x, open_y, docs, whole=False)            # the open document: a prefix
        # each epoch of a lane is a permutation of all documents
        assert sorted(seen[:len(docs)]) == all_ids
        assert sorted(seen[len(docs):2 * len(docs)]) == all_ids
        orders.append(seen)
    assert len({tuple(o) for o in orders}) > 1                       # lanes walk in their own orders


def test_train_stream_is_seeded():
    docs = make_docs([9, 14, 3, 30])
    a = list(itertools.islice(TrainStream(docs, batch_size=2, seg_len=5, seed=3), 30))
    b = list(itertools.islice(TrainStream(docs, batch_size=2, seg_len=5, seed=3), 30))
    c = list(itertools.islice(TrainStream(docs, batch_size=2, seg_len=5, seed=4), 30))
    assert all(np.array_equal(x.inputs, y.inputs) and np.array_equal(x.reset, y.reset) for x, y in zip(a, b))
    assert not all(np.array_equal(x.inputs, y.inputs) for x, y in zip(a, c))
    with pytest.raises(ValueError):
        TrainStream([], batch_size=2, seg_len=5, seed=0)


@pytest.mark.parametrize("batch_size,seg", [(1, 4), (2, 4), (3, 7), (8, 16)])
def test_eval_batches_cover_every_target_once(docs, batch_size, seg):
    batches = list(eval_batches(docs, batch_size=batch_size, seg_len=seg))
    assert len(batches) == n_eval_batches(docs, batch_size=batch_size, seg_len=seg)
    assert sum(b.n_targets for b in batches) == sum(len(d) - 1 for d in docs)
    pairs = sorted((int(x), int(y)) for b in batches for x, y in zip(b.inputs.flatten(), b.targets.flatten())
                   if y != IGNORE_INDEX)
    assert pairs == sorted((int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:]))  # each target once
    for lane in range(batch_size):                  # between resets a lane reads one contiguous slice
        for x, y in split_lane(batches, lane):
            doc = next(d for d in docs if x[0] in d)
            start = int(np.where(doc == x[0])[0][0])
            assert x == doc[start:start + len(x)].tolist() and y == doc[start + 1:start + 1 + len(x)].tolist()
    capped = list(eval_batches(docs, batch_size=batch_size, seg_len=seg, max_segments=2))
    assert len(capped) == min(2, len(batches))


def test_eval_batches_spread_one_long_document_over_the_lanes():
    docs = make_docs([401])
    batches = list(eval_batches(docs, batch_size=4, seg_len=10))
    assert len(batches) == 10                                        # 400 targets / 4 lanes / 10 per segment
    assert all(b.n_targets == 40 for b in batches)


def test_eval_batches_pad_exhausted_lanes():
    docs = make_docs([3, 3, 3])
    batches = list(eval_batches(docs, batch_size=4, seg_len=1))
    assert len(batches) == 2
    assert all(bool(b.reset[3]) and (b.targets[3] == IGNORE_INDEX).all() and (b.inputs[3] == PAD_ID).all()
               for b in batches)


def test_encode_documents_drops_documents_without_targets():
    docs = encode_documents(["a", "", "ab", "héllo"], ByteTokenizer())
    assert [d.tolist() for d in docs] == [[97, 98], list("héllo".encode())]
    assert all(d.dtype == np.int64 for d in docs)


def test_tokenized_text_survives_the_lanes():
    tok = ByteTokenizer()
    texts = ["Ünïcödé 🙂 text number one.", "two", "and a third, longer document " * 3]
    batches = list(eval_batches(encode_documents(texts, tok), batch_size=1, seg_len=8))   # one lane: no cuts
    rebuilt = [tok.decode(x + y[-1:]) for lane in range(1) for x, y in split_lane(batches, lane)]
    assert sorted(rebuilt) == sorted(texts)


def test_hf_dataset_without_the_package_or_offline_is_a_clear_error(monkeypatch):
    import builtins

    from longmem.config import DataConfig
    from longmem.data.corpus import load_corpus
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[hf\]' in the longmem checkout"):
        load_corpus(DataConfig(hf_dataset="tiny_shakespeare"))
    with pytest.raises(ValueError, match="not both"):
        DataConfig(hf_dataset="x", path="y.txt")


def test_hf_dataset_offline_names_the_dataset_and_the_way_out(monkeypatch):
    import sys
    import types

    from longmem.config import DataConfig
    from longmem.data.corpus import load_corpus
    fake = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None):
        raise ConnectionError(f"Couldn't reach the Hub for dataset '{name}'")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"cannot load the Hugging Face dataset 'wikitext'.*local cache"):
        load_corpus(DataConfig(hf_dataset="wikitext", hf_config="wikitext-2-raw-v1"))
