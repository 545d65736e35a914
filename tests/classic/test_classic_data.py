"""bAbI reader and generator, source/target pairs, and the text metrics (against hand-computed values)."""
from __future__ import annotations

import json
import math
import random
import re

import pytest

from longmem.data.tasks.babi import babi_files, generate_babi, load_babi, parse_babi, read_babi_file, words
from longmem.classic.pairs import generate_pairs, read_pairs
from longmem.data.tokenizer import WordTokenizer, load_tokenizer, save_tokenizer
from longmem.evaluation.metrics import accuracy, bleu, exact_match, lcs_length, rouge_l, token_f1, tokens

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: faster on one thread

STORY = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel?\thallway\t4
1 Sandra got the football there.
2 John picked up the milk.
3 What is John carrying? \tmilk,football\t2 1
"""


def test_reader_restarts_stories_and_reads_questions():
    ex = parse_babi(STORY.splitlines(), task=8)
    assert len(ex) == 3
    assert ex[0].story == ["Mary moved to the bathroom.", "John went to the hallway."]
    assert ex[0].question == "Where is Mary?" and ex[0].answer == "bathroom" and ex[0].supporting == [0]
    assert ex[1].story[-1] == "Daniel went back to the hallway." and len(ex[1].story) == 3   # questions are not context
    assert ex[1].supporting == [2]
    assert ex[2].story == ["Sandra got the football there.", "John picked up the milk."]     # a new story
    assert ex[2].answers == ["milk", "football"] and ex[2].supporting == [1, 0] and ex[2].task == 8
    with pytest.raises(ValueError, match="starts with its ID"):
        parse_babi(["Mary moved."])
    with pytest.raises(ValueError, match="supporting ids"):
        parse_babi(["1 Mary moved.", "2 Where is Mary?\tbathroom\t7"])


def test_folder_and_file_loading(tmp_path):
    (tmp_path / "qa8_lists-sets_train.txt").write_text(STORY)
    (tmp_path / "qa8_lists-sets_test.txt").write_text(STORY.split("1 Sandra")[0])
    (tmp_path / "qa1_single_train.txt").write_text("1 Mary moved to the office.\n2 Where is Mary?\toffice\t1\n")
    assert sorted(babi_files(tmp_path, split="train")) == [1, 8]
    assert [e.task for e in load_babi(tmp_path, split="train", tasks=[8])] == [8, 8, 8]
    assert len(load_babi(tmp_path / "qa8_lists-sets_train.txt", split="test")) == 2     # the test file beside it
    assert read_babi_file(tmp_path / "qa1_single_train.txt")[0].task == 1
    with pytest.raises(FileNotFoundError, match="task"):
        load_babi(tmp_path, split="train", tasks=[3])
    with pytest.raises(FileNotFoundError, match="test"):
        babi_files(tmp_path / "qa1_single_train.txt", split="test")


def _replay_task1(story: list[str], question: str) -> str:
    actor = question.split()[-1].rstrip("?")
    place = None
    for s in story:
        m = re.match(rf"{actor} .* the (\w+)\.", s)
        if m:
            place = m.group(1)
    return place


def test_generator_is_seeded_and_its_answers_are_right():
    a, b = generate_babi(task=1, n=50, seed=3), generate_babi(task=1, n=50, seed=3)
    assert a == b and a != generate_babi(task=1, n=50, seed=4)
    for ex in a:
        assert ex.answer == _replay_task1(ex.story, ex.question)
        assert ex.answer in words(ex.story[ex.supporting[0]])
    for task in (2, 3):
        exs = generate_babi(task=task, n=40, seed=0)
        assert len(exs) == 40 and all(len(e.supporting) >= 2 for e in exs)
        assert all(e.answer in words(" ".join(e.story[i] for i in e.supporting)) for e in exs)
        assert len({e.answer for e in exs}) >= 3                     # not a constant answer
    with pytest.raises(ValueError, match="generated bAbI tasks"):
        generate_babi(task=7, n=5, seed=0)


def test_word_tokenizer_round_trips_through_json(tmp_path):
    tok = WordTokenizer.fit(["Mary went to the kitchen.", "s,e"])
    assert tok.decode(tok.encode("Mary went to the KITCHEN?")) == "mary went to the kitchen"
    assert tok.encode("s,e") == [tok.stoi["s,e"]] and tok.encode("zebra") == [1]
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    assert back.itos == tok.itos and back.vocab_size == tok.vocab_size


def test_pairs_from_jsonl_and_generated(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"source": "a b", "target": "b a"}) + "\n\n" + json.dumps({"source": "c", "target": "c"}) + "\n")
    assert [(p.source, p.target) for p in read_pairs(path)] == [("a b", "b a"), ("c", "c")]
    path.write_text(json.dumps({"source": "x"}) + "\n")
    with pytest.raises(ValueError, match="'source' and 'target'"):
        read_pairs(path)
    for p in generate_pairs("passage", n=20, seed=0, source_len=100):
        key = p.source.rstrip("?").split()[-1]
        assert len(p.source) == 100 and f"{key}:{p.target} " in p.source[:30]     # the answer sits at the far start
    assert all(p.source == p.target for p in generate_pairs("copy", n=5, seed=0, source_len=8))
    lengths = {len(p.source) for p in generate_pairs("passage", n=200, seed=0, source_len=96, min_source_len=40)}
    assert min(lengths) >= 40 and max(lengths) <= 96 and len(lengths) > 30        # varied training lengths
    from longmem.config import RunConfig
    from longmem.classic.pairs import pair_examples
    cfg = RunConfig().override({"model.arch": "seq2seq", "task.name": "passage", "task.source_len": "60",
                                "task.min_source_len": "30", "task.n_train": "50", "task.n_test": "20"})
    assert {len(p.source) for p in pair_examples(cfg, "test")} == {60}           # tested at full length
    assert len({len(p.source) for p in pair_examples(cfg, "train")}) > 5


def test_text_metrics_against_hand_computed_values():
    assert exact_match(" The Cat ", "the cat") == 1.0 and exact_match("cat", "cats") == 0.0
    # token F1: 2 shared of 3 predicted and 4 reference tokens: p=2/3, r=1/2, F1=4/7
    assert token_f1("the cat sat".split(), "the cat is here".split()) == pytest.approx(4 / 7)
    assert token_f1([], []) == 1.0 and token_f1(["a"], ["b"]) == 0.0
    # ROUGE-L: LCS of "a b c d e" and "a x c y e" is a c e (3): p = r = 3/5
    assert lcs_length(list("abcde"), list("axcye")) == 3
    assert rouge_l(list("abcde"), list("axcye")) == pytest.approx(0.6)
    assert rouge_l(list("abc"), list("abcdef")) == pytest.approx(2 * 1 * 0.5 / 1.5)
    # BLEU: identical -> 1; hand-computed bigram BLEU with brevity penalty:
    # pred "a b c" vs ref "a b c d": p1 = 3/3, p2 = 2/2, BP = exp(1 - 4/3)
    assert bleu([list("abcd")], [list("abcd")]) == pytest.approx(1.0)
    assert bleu([list("abc")], [list("abcd")], max_n=2) == pytest.approx(math.exp(1 - 4 / 3))
    # pred "a a b" vs ref "a b b": clipped p1 = 2/3, p2 = 1/2 ("a b" only), same length
    assert bleu([list("aab")], [list("abb")], max_n=2) == pytest.approx(math.sqrt(2 / 3 * 1 / 2))
    assert bleu([list("xyz")], [list("abc")]) == 0.0
    assert tokens("Hello  World") == ["hello", "world"] and tokens("ab", chars=True) == ["a", "b"]
    with pytest.raises(ValueError, match="predictions"):
        bleu([["a"]], [])


def test_accuracy_and_bleu_against_sacrebleu():
    assert accuracy(["Kitchen", "garden", "x"], ["kitchen", "hallway", "x"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many"):
        accuracy(["a"], [])
    sacrebleu = pytest.importorskip("sacrebleu")          # in the dev extra: runs in `make test`
    rng = random.Random(0)
    words = "the a cat dog sat on mat rug and ran".split()
    refs = [rng.choices(words, k=rng.randint(6, 12)) for _ in range(20)]
    preds = [[w if rng.random() < 0.7 else rng.choice(words) for w in r][:rng.randint(5, len(r))] for r in refs]
    ours = bleu(preds, refs)
    theirs = sacrebleu.corpus_bleu([" ".join(p) for p in preds], [[" ".join(r) for r in refs]],
                                   tokenize="none", smooth_method="none")
    assert ours > 0.05 and ours == pytest.approx(theirs.score / 100, abs=1e-9)
