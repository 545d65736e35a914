"""The memory protocol from outside the package: a new memory kind is one class, one state part and two
registry lines, and then it trains, evaluates, generates, checkpoints and resumes through the command
line with no edit anywhere in longmem (issue 19's proof)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from longmem.cli import main
from longmem.config import MEMORY_KINDS, PRESETS
from longmem.models.memory import Memory, register_kind, register_part
from longmem.models.memory.state import PARTS

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class MeanState:
    """The running mean of the last layer's outputs of every token a lane has read: (B, D), and the count (B,)."""
    mean: torch.Tensor
    count: torch.Tensor

    def reset(self, drop):
        keep = (~drop.bool()).to(self.count.device)
        return MeanState(mean=self.mean * keep[:, None], count=self.count * keep)

    def detach(self):
        return MeanState(mean=self.mean.detach(), count=self.count)

    def to_tensors(self):
        return {"mean": self.mean, "count": self.count}

    @classmethod
    def from_tensors(cls, d):
        return cls(mean=d["mean"], count=d["count"].long())


class MeanMemory(Memory):
    """A gist of the past: the mean output so far, added (times a learned scale) to every token's input."""
    name = "gist"

    def __init__(self, d_model: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((d_model,), 0.1))

    def init(self, batch_size, *, device, dtype):
        return MeanState(mean=torch.zeros(batch_size, self.scale.shape[0], device=device, dtype=dtype),
                         count=torch.zeros(batch_size, dtype=torch.long, device=device))

    def begin(self, seg, part):
        seg.x = seg.x + self.scale * part.mean[:, None, :].to(seg.x.dtype)
        return part

    def end(self, seg, part, h):
        out = seg.tokens_of(h).detach()                                       # (B, T, D)
        count = part.count + out.shape[1]
        mean = (part.mean * part.count[:, None] + out.sum(1)) / count[:, None]
        return MeanState(mean=mean, count=count), None


@pytest.fixture
def gist_kind():
    register_part("gist", MeanState)
    register_kind("gist", lambda c: [MeanMemory(c.d_model)])
    yield
    MEMORY_KINDS.pop("gist")
    PARTS.pop("gist")


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_a_memory_registered_outside_trains_evaluates_generates_and_resumes(gist_kind, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the memory keeps the gist of what was read before the window. " * 80)
    args = ["--config", str(PRESETS / "tiny.yaml"), "--data.path", str(text), "--memory.kind", "gist",
            "--memory.mem_len", "0", "--train.progress", "false", "--train.log_every", "1", "--train.threads", "1",
            "--train.eval_every", "3", "--data.cache", "false"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", "--out", str(whole), *args, "--train.max_steps", "6"]) == 0
    assert main(["train", "--out", str(part), *args, "--train.max_steps", "3"]) == 0
    assert main(["train", "--resume", str(part), "--train.max_steps", "6"]) == 0
    assert losses(part) == pytest.approx(losses(whole), abs=1e-6)             # exact resume, memory carried
    from safetensors import safe_open
    with safe_open(str(part / "trainer_state.safetensors"), framework="pt") as f:
        assert {"memory.gist.mean", "memory.gist.count"} <= set(f.keys())   # the lanes' memory checkpointed
    capsys.readouterr()
    assert main(["eval", str(whole), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert main(["generate", str(whole), "--prompt", "the memory", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip()
    from longmem.runs import load_run
    model = load_run(whole).model
    assert [m.name for m in model.memories] == ["gist"] and model.stateful
    assert "gist.scale" in model.state_dict()                                 # its weights are saved by its name
