"""The Differentiable Neural Computer's memory access (Graves et al. 2016, Methods) on hand examples and its
invariants, and one tiny bAbI run through the CLI (words, the answer after the question) with exact resume
(the model's memory is carried from step to step and saved in checkpoints)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from longmem.classic.config import DNCConfig
from longmem.classic.dnc import DNC, allocation, update_links
from longmem.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: faster on one thread


def test_allocation_gives_the_least_used_slot_on_a_hand_example():
    usage = torch.tensor([[0.9, 0.1, 0.5], [0.0, 0.0, 0.0]])
    a = allocation(usage)
    # slots by ascending usage: 1, 2, 0 -> a[1] = 0.9, a[2] = 0.5 * 0.1, a[0] = 0.1 * (0.1 * 0.5)
    assert torch.allclose(a[0], torch.tensor([0.1 * 0.05, 0.9, 0.05]), atol=1e-5)
    assert a[1].argmax().item() == 0 and a[1, 0] > 0.999                          # ties: the first free slot
    assert torch.allclose(allocation(torch.ones(1, 3)), torch.zeros(1, 3), atol=1e-5)   # nothing free


def test_links_record_the_order_of_writes():
    S = 4
    link, precedence = torch.zeros(1, S, S), torch.zeros(1, S)
    for slot in (2, 0, 3):                                         # write slot 2, then 0, then 3
        w = torch.nn.functional.one_hot(torch.tensor([slot]), S).float()
        link = update_links(link, precedence, w)
        precedence = (1 - w.sum(-1, keepdim=True)) * precedence + w
    assert link[0, 0, 2] == 1 and link[0, 3, 0] == 1 and link.sum() == 2           # L[i, j]: i written after j
    forward = torch.einsum("bij,bj->bi", link, torch.tensor([[0.0, 0, 1, 0]]))    # from slot 2 forward: slot 0
    assert forward.tolist() == [[1.0, 0, 0, 0]]


def test_dnc_weightings_and_links_keep_their_bounds():
    model = build_model(DNCConfig(vocab_size=17, d_model=12, n_layers=1, memory_slots=6, memory_width=5,
                                  read_heads=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)                                             # sharp gates: weights near their bounds
    part = model(torch.randint(0, 17, (5, 20))).state.dnc
    assert isinstance(model, DNC)
    link = part.link
    assert torch.equal(torch.diagonal(link, dim1=-2, dim2=-1), torch.zeros(5, 6))  # zero diagonal
    assert (link >= 0).all() and (link.sum(-1) <= 1 + 1e-5).all() and (link.sum(-2) <= 1 + 1e-5).all()
    for w in (part.read_weights, part.write_weights, part.precedence):
        assert (w >= 0).all() and (w.sum(-1) <= 1 + 1e-5).all()
    assert ((part.usage >= 0) & (part.usage <= 1)).all()


@pytest.mark.e2e
def test_dnc_trains_on_babi_words_resumes_exactly_and_reports_accuracy(tmp_path, capsys):
    from longmem.cli import main
    from longmem.runs import load_run
    from longmem.training import state as S
    out = tmp_path / "run"
    args = ["--model.arch", "dnc", "--model.d_model", "16", "--model.n_layers", "1", "--model.memory_slots", "8",
            "--model.memory_width", "8", "--model.read_heads", "2", "--model.segment_len", "24", "--task.name", "babi",
            "--task.babi_tasks", "1", "--task.n_train", "40", "--task.n_test", "8", "--data.tokenizer", "word",
            "--data.batch_size", "4", "--train.max_steps", "12", "--train.lr", "0.01", "--train.warmup_steps", "0",
            "--train.checkpoint_every", "4", "--train.keep_last", "3", "--train.log_every", "1",
            "--train.progress", "false"]
    assert main(["train", "--out", str(out), *args]) == 0

    def losses():
        return {e["step"]: e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in e}
    ref = losses()
    assert sorted(ref) == list(range(1, 13))
    _, tensors = S.load_checkpoint(out / "checkpoints" / "step-00000008")
    assert tensors["memory.dnc.link"].shape == (4, 8, 8) and tensors["memory.dnc.memory"].abs().sum() > 0
    shutil.rmtree(out / "checkpoints" / "step-00000012")
    assert main(["train", "--resume", str(out)]) == 0
    got = losses()
    assert sorted(got) == list(range(1, 13)) and all(abs(ref[s] - got[s]) <= 1e-6 for s in ref), (ref, got)
    run = load_run(out)
    assert isinstance(run.model, DNC) and run.tokenizer.kind == "word"
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "babi", "--n", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "babi" and res["arch"] == "dnc" and res["results"][0]["answers"] == 4
