"""Probe tasks (passkey, recall, babi, haystack): generators, the task stream, scoring, the eval command."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longmem.cli import main
from longmem.config import ModelConfig
from longmem.data.stream import TaskStream
from longmem.data.tasks import probes as P
from longmem.data.tasks.babi import generate_babi
from longmem.data.tokenizer import ByteTokenizer, CharTokenizer
from longmem.evaluation.probes import _bounds, n_segments, score_probes, summarize
from longmem.models import IGNORE_INDEX, LMOutput

TOK = ByteTokenizer()


def text(ids) -> str:
    return TOK.decode([int(i) for i in ids])


def answer_text(p: P.Probe, k: int = 1) -> str:
    return text(p.tokens[p.answer == k])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_places_the_needle_at_the_depth_and_is_seeded(depth):
    p = P.passkey(TOK, length=700, depth=depth, rng=random.Random(5))
    q = P.passkey(TOK, length=700, depth=depth, rng=random.Random(5))
    assert len(p) == 700 and np.array_equal(p.tokens, q.tokens) and np.array_equal(p.answer, q.answer)
    key = answer_text(p).strip()
    assert len(key) == 5 and key.isdigit()
    needle = f" The pass key is {key}. Remember it."
    at = text(p.tokens).index(needle)
    assert at == p.info["needle"]
    prefix = len(P.PASSKEY_PREFIX)
    room = 700 - prefix - len(P.PASSKEY_QUESTION) - 6 - len(needle + " ")
    assert at == prefix + round(depth * room)
    assert text(p.tokens).endswith(P.PASSKEY_QUESTION + " " + key)
    # the 5 digits are the answer; the space before them (its own byte) is context
    assert p.answer[-6:].tolist() == [0] + [1] * 5 and p.answer[:-5].sum() == 0
    assert P.passkey(TOK, length=700, depth=depth, rng=random.Random(6)).tokens.tolist() != p.tokens.tolist()


def test_recall_asks_every_stated_pair_with_its_value():
    p = P.recall(TOK, length=500, depth=0.5, rng=random.Random(1), n_pairs=5)
    s = text(p.tokens)
    assert len(p) == 500 and len(p.answers) == 5 and int(p.answer.max()) == 5
    stated = dict(part.split("=") for part in s[s.index(P.RECALL_PREFIX) + len(P.RECALL_PREFIX):].split(",")[:5])
    stated = {k.strip(): v for k, v in stated.items()}
    for k, a in enumerate(p.answers, 1):
        assert answer_text(p, k) == a["text"] == stated[a["key"]]
        assert a["distance"] > 0
    assert s.index(P.RECALL_QUESTION) > s.index(P.RECALL_PREFIX)
    early = P.recall(TOK, length=500, depth=0.0, rng=random.Random(1), n_pairs=5)
    assert text(early.tokens).startswith(P.RECALL_PREFIX)
    assert min(a["distance"] for a in early.answers) > min(a["distance"] for a in p.answers)


def test_haystack_keeps_the_story_in_order_and_the_question_last():
    ex = generate_babi(task=2, n=1, seed=3)[0]
    source = np.asarray(TOK.encode("Lorem ipsum dolor sit amet. " * 7), dtype=np.int64)
    p = P.haystack(TOK, ex, length=3000, rng=random.Random(0), source=source)
    q = P.haystack(TOK, ex, length=3000, rng=random.Random(0), source=source)
    assert len(p) == 3000 and np.array_equal(p.tokens, q.tokens)
    s = text(p.tokens)
    positions = [s.index(" " + sentence) for sentence in ex.story]
    assert positions == sorted(positions)
    assert s.endswith(f"Question: {ex.question} Answer: {ex.answer}\n")
    assert answer_text(p) == ex.answer                                  # the space before it is context
    assert P.story_length(TOK, ex) == len(P.babi(TOK, ex))
    with pytest.raises(ValueError, match="too short"):
        P.haystack(TOK, ex, length=P.story_length(TOK, ex) - 1, rng=random.Random(0), source=source)


def test_parse_lengths_and_depths():
    assert P.parse_lengths("1k, 4k,1m,100") == [1024, 4096, 1024 ** 2, 100]
    assert P.parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("", "4x", "-1"):
        with pytest.raises(ValueError):
            P.parse_lengths(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.parse_depths("0,1.5")


def test_char_tokenizer_missing_digits_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot write"):
        P.passkey(CharTokenizer("abc .\n"), length=400, depth=0.5, rng=random.Random(0))


class Oracle(torch.nn.Module):
    """A fake language model that knows the probes: it predicts the true next token, except at
    ``wrong`` positions (absolute); it finds where a segment sits among the probes' segments."""

    def __init__(self, probes, *, kind="xl", segment_len=16, wrong=()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = ModelConfig(vocab_size=256, segment_len=segment_len,
                                  memory={"kind": kind, "mem_len": 8 if kind == "xl" else 0})
        self.probes, self.wrong, self.calls = probes, set(wrong), 0

    def _locate(self, row):
        for p in self.probes:
            for a, b in _bounds(len(p) - 1, self.config.segment_len):
                if b - a == len(row) and p.tokens[a:b].tolist() == row.tolist():
                    return p.tokens, a
        raise AssertionError("a segment that is not one of the probes' segments")

    def forward(self, tokens, state=None):
        self.calls += 1
        B, T = tokens.shape
        logits = torch.zeros(B, T, 256)
        for b in range(B):
            seq, offset = self._locate(tokens[b])
            for t in range(T):
                pos = offset + t
                nxt = int(seq[pos + 1])
                logits[b, t, (nxt + 1) % 256 if pos in self.wrong else nxt] = 1.0
        return LMOutput(logits=logits, loss=None, state=state)


def test_scoring_counts_whole_answers_and_skips_segments_only_without_memory():
    probes = [P.recall(TOK, length=300, depth=d, rng=random.Random(i), n_pairs=3) for i, d in enumerate([0, .5, 1])]
    oracle = Oracle(probes)
    scores = score_probes(oracle, probes, batch_size=2)
    assert summarize(scores)["accuracy"] == 1.0 and summarize(scores)["answers"] == 9
    assert oracle.calls == n_segments(probes, oracle, batch_size=2) == 2 * -(-299 // 16)
    # one wrong token of answer 2 of the first probe: only that answer is wrong
    second = int(np.flatnonzero(probes[0].answer == 2)[1])
    scores = score_probes(Oracle(probes, wrong={second - 1}), probes[:1])
    assert [a["correct"] for a in scores[0]] == [True, False, True]
    # without memory only segments holding answers are computed; segments end with the probe
    none = Oracle(probes, kind="none")
    summarize(score_probes(none, probes[:1]))
    assert none.calls == n_segments(probes[:1], none, batch_size=8) < -(-299 // 16)


def test_task_stream_targets_answers_only_and_resumes_exactly():
    def make(index, length):
        return P.passkey(TOK, length=length, depth=0.5, rng=random.Random(index)).as_doc()
    stream = TaskStream(make, batch_size=2, seg_len=100, length=300)
    first = [next(stream) for _ in range(4)]
    assert first[0].reset.all() and not first[1].reset.any() and first[3].reset.all()
    for lane in range(2):                                  # the answer targets of each lane's first example
        doc = make(lane, 300)
        got = torch.cat([b.targets[lane] for b in first[:3]])
        expect = np.where(doc[1][1:] > 0, doc[0][1:], IGNORE_INDEX)
        assert got[:299].tolist() == expect.tolist() and (got[299:] == IGNORE_INDEX).all()
    saved = json.loads(json.dumps(stream.state_dict()))
    stream.length = 200                                    # e.g. a curriculum: new examples are shorter
    after = [next(stream) for _ in range(3)]
    again = TaskStream(make, batch_size=2, seg_len=100, length=300)
    again.load_positions(saved["positions"])
    again.length = 200
    for a, b in zip(after, [next(again) for _ in range(3)]):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not after[1].reset.any() and after[2].reset.all()   # the begun 300-token example ends first


@pytest.mark.parametrize("kind", ["xl", "knn", "tokens", "none"])
def test_task_stream_drops_the_padding_after_short_examples_with_the_same_losses(make_model, kind):
    """A segment where every lane's example ends is cut after its longest row (a multiple of 16): the
    answer losses and the states the next examples start from are those of the padded segment."""
    import longmem.data.stream as S
    seg = 48

    def make(index, length):                          # examples of 5..70 tokens, the last 3 are answers
        rng = np.random.default_rng(index)
        n = int(rng.integers(5, 70))
        doc = np.stack([rng.integers(1, 37, n), np.zeros(n, dtype=np.int64)])
        doc[1, -3:] = 1
        return doc
    trimmed_stream = TaskStream(make, batch_size=3, seg_len=seg, length=0)
    trimmed = [next(trimmed_stream) for _ in range(12)]
    padded_stream = TaskStream(make, batch_size=3, seg_len=seg, length=0)
    multiple, S.TRIM_MULTIPLE = S.TRIM_MULTIPLE, seg                 # no trimming: every segment padded
    try:
        padded = [next(padded_stream) for _ in range(12)]
    finally:
        S.TRIM_MULTIPLE = multiple
    widths = [b.inputs.shape[1] for b in trimmed]
    assert all(w % 16 == 0 or w == seg for w in widths) and min(widths) < seg and seg in widths
    assert all(p.inputs.shape[1] == seg for p in padded)
    model = make_model(kind=kind, mem_len=0 if kind == "none" else 16, segment_len=seg)
    losses = []
    for batches in (trimmed, padded):
        state, out = None, []
        for b in batches:
            w = b.inputs.shape[1]
            res = model(b.inputs, state=state, reset=b.reset)
            out.append(torch.nn.functional.cross_entropy(res.logits[:, :w].flatten(0, 1), b.targets.flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            state = res.state
        losses.append(torch.stack(out))
    torch.testing.assert_close(losses[0], losses[1])
    assert (losses[0] > 0).sum() >= 8


def cli(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.e2e
def test_train_on_passkey_and_eval_sweep_through_the_cli(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    cli(capsys, "train", "--out", str(out), "--task.name", "passkey", "--task.length", "300", "--task.n_test", "4",
        "--model.d_model", "16", "--model.n_layers", "1", "--model.n_heads", "2", "--model.segment_len", "64",
        "--memory.kind", "xl", "--memory.mem_len", "64", "--data.tokenizer", "char", "--data.batch_size", "2",
        "--train.max_steps", "12", "--train.eval_every", "6", "--train.progress", "false")
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals if "val_accuracy" in v] == [6, 12]
    res = json.loads(cli(capsys, "eval", str(out), "--task", "passkey", "--lengths", "300,400", "--depths", "0,1",
                         "--n", "2", "--json"))
    assert set(res) >= {"task", "run", "accuracy", "chance", "results", "plot", "memory", "mem_len"}
    assert [(r["length"], r["depth"]) for r in res["results"]] == [(300, 0.0), (300, 1.0), (400, 0.0), (400, 1.0)]
    assert all(set(r) >= {"accuracy", "answer_loss", "answers", "examples", "mean_distance"} for r in res["results"])
    assert json.loads((out / "eval" / "passkey.json").read_text())["results"] == res["results"]
    assert (out / "eval" / "passkey.png").is_file()
    hay = json.loads(cli(capsys, "eval", str(out), "--task", "haystack", "--lengths", "2k", "--n", "1", "--json",
                         "--cloze", "--out", str(tmp_path / "h.json")))
    assert {r["babi_task"] for r in hay["results"]} == {1, 2, 3} and (tmp_path / "h.png").is_file()
    assert hay["cloze"] is True
    rec = json.loads(cli(capsys, "eval", str(out), "--task", "recall", "--lengths", "300", "--depths", "0.5",
                         "--n", "1", "--json"))
    assert rec["chance"] == 0.01 and rec["results"][0]["answers"] == 8          # task.n_pairs answers
    babi = json.loads(cli(capsys, "eval", str(out), "--task", "babi", "--n", "2", "--json"))
    assert [r["babi_task"] for r in babi["results"]] == [1, 2, 3] and 0 <= babi["mean_error"] <= 100
    assert main(["eval", str(out), "--task", "passkey", "--depths", "2"]) == 2


def test_an_answer_s_leading_whitespace_tokens_are_context_not_answer():
    """A pretrained tokenizer often writes the space before a number as a token of its own: scoring it would
    count "It is a ..." against a model that knows the key. Only the key's own tokens are the answer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from longmem.data.tokenizer import PretrainedTokenizer
    vocab = {c: i for i, c in enumerate([" ", *"0123456789", *"abcdefghijklmnopqrstuvwxyz", *".?TWRFpkhyst"])}
    hf = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    hf.pre_tokenizer = pre_tokenizers.Split("", "isolated")                  # one token per character
    tok = PretrainedTokenizer(hf)
    p = P.passkey(tok, length=400, depth=0.5, rng=random.Random(0))
    answer = [int(t) for t, a in zip(p.tokens, p.answer) if a]
    assert "".join(tok.decode([t]) for t in answer) == p.answers[0]["text"].strip() and len(answer) == 5
    assert tok.decode([int(p.tokens[len(p.tokens) - 6])]) == " "          # the space, just before, not scored


def test_demonstrations_come_first_as_context_and_distances_count_from_the_story():
    stories = generate_babi(task=1, n=4, seed=0)
    tok = ByteTokenizer()
    ex, demos = stories[0], stories[1:3]
    source = np.asarray(tok.encode(P.FILLER * 40), dtype=np.int64)
    plain = P.haystack(tok, ex, length=900, rng=random.Random(0), source=source)
    shot = P.haystack(tok, ex, length=900, rng=random.Random(0), source=source, demos=demos)
    assert len(shot.tokens) == len(plain.tokens) == 900 and shot.answer.max() == 1
    head = tok.decode(shot.tokens[:60].tolist())
    assert head.startswith(" ".join(demos[0].story)[:60])                      # the demonstration leads
    assert int(shot.answer[:len(shot.tokens) // 2].sum()) == 0                  # demo answers are context
    text = tok.decode(shot.tokens.tolist())
    first = text.index(" " + ex.story[0], len(" ".join(demos[0].story)) + 30)  # the story's first sentence
    question = text.rindex("\nQuestion:")
    assert shot.answers[0]["distance"] == question - first                      # bytes: tokens = characters


def test_cloze_restates_the_subject_before_the_answer_in_demonstrations_and_question():
    stories = generate_babi(task=2, n=4, seed=0)
    tok = ByteTokenizer()
    ex, demos = stories[0], stories[1:3]
    assert P.answer_lead("Where is the football?") == " The football is in the"
    assert P.answer_lead("Where was the apple before the kitchen?") == ""            # other forms: asked plainly
    source = np.asarray(tok.encode(P.FILLER * 40), dtype=np.int64)
    p = P.haystack(tok, ex, length=1500, rng=random.Random(0), source=source, demos=demos, cloze=True)
    text = tok.decode(p.tokens.tolist())
    lead = P.answer_lead(ex.question)
    assert lead and text.endswith(f"Question: {ex.question} Answer:{lead} {ex.answer}\n")
    assert text.startswith(" ".join(demos[0].story) + f"\nQuestion: {demos[0].question} Answer:"
                           f"{P.answer_lead(demos[0].question)} {demos[0].answer}")
    assert answer_text(p) == ex.answer                                          # only the place is scored
    leads = sum(len(P.answer_lead(e.question)) for e in [ex, *demos])
    assert P.story_length(tok, ex, demos, cloze=True) == P.story_length(tok, ex, demos) + leads
    plain = P.babi(tok, ex)
    assert len(P.babi(tok, ex, cloze=True).tokens) == len(plain.tokens) + len(lead)
