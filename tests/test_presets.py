"""Every preset shipped in longmem/configs trains a few steps through the CLI with its own settings (issue 23):
only the run's length, its validation and the data folder are overridden. bAbI presets read a tiny bAbI-format
folder written here (the tests never need ../shared/data)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from longmem.config import RunConfig, find_config, preset_names

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]

# a few facts and questions of bAbI tasks 1 and 6, in the files' format (IDs restart with each story)
STORIES = {
    1: ("1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Where is Mary?\tbathroom\t1\n"
        "4 Daniel went back to the kitchen.\n5 Where is Daniel?\tkitchen\t4\n"),
    6: ("1 Sandra journeyed to the garden.\n2 John travelled to the office.\n3 Is Sandra in the garden?\tyes\t1\n"
        "4 Mary moved to the hallway.\n5 Is Mary in the office?\tno\t4\n"),
}
SHORT = {"train.max_steps": "2", "train.eval_every": "0", "train.warmup_steps": "0", "train.log_every": "1",
         "train.progress": "false", "task.n_test": "4", "train.eval_segments": "1"}


def babi_folder(path):
    """qa1 and qa6, train and test, of a few stories each."""
    path.mkdir()
    for task, story in STORIES.items():
        name = {1: "single-supporting-fact", 6: "yes-no-questions"}[task]
        (path / f"qa{task}_{name}_train.txt").write_text(story * 6)
        (path / f"qa{task}_{name}_test.txt").write_text(story * 2)
    return path


@pytest.mark.parametrize("name", preset_names())
def test_preset_trains_a_few_steps_through_the_cli(name, tmp_path, capsys):
    from longmem.cli import main
    cfg = RunConfig.load(find_config(name))
    over = dict(SHORT)
    if cfg.task.name == "babi":
        over["data.path"] = str(babi_folder(tmp_path / "babi"))
    out = tmp_path / "run"
    args = [x for k, v in over.items() for x in (f"--{k}", v)]
    assert main(["train", "--config", name, "--out", str(out), *args]) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "lr" in e] == [1, 2]                    # both steps logged
    assert all(e["loss"] == e["loss"] for e in events if "loss" in e)            # a loss only where targets were
    assert any("val_loss" in e for e in events)
    saved, expected = RunConfig.load(out / "config.yaml"), cfg.override(over)    # the preset's own settings
    for section in ("model", "data", "task", "train"):
        got, want = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(expected, section))
        for derived in ("vocab_size", "bits"):                                     # set from the tokenizer
            got.pop(derived, None), want.pop(derived, None)
        assert got == want, (name, section)


def test_the_haystack_preset_starts_from_the_stories_preset_as_its_header_says(tmp_path):
    """haystack-stories, then haystack with --train.init_from: the second stage starts from the first's weights
    and keeps its tokenizer; its own segment length (a whole haystack in one segment) is kept."""
    from longmem.cli import main
    from longmem.data.tokenizer import load_tokenizer
    from longmem.io import read_safetensors
    first, second = tmp_path / "stories", tmp_path / "haystack"
    args = [x for k, v in SHORT.items() for x in (f"--{k}", v)]
    assert main(["train", "--config", "haystack-stories", "--out", str(first), *args]) == 0
    assert main(["train", "--config", "haystack", "--out", str(second), "--train.init_from", str(first),
                 "--train.lr", "1e-12", *args]) == 0
    (a, _), (b, _) = read_safetensors(first / "model.safetensors"), read_safetensors(second / "model.safetensors")
    worst = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert a.keys() == b.keys() and max(worst.values()) < 1e-3, worst     # lr ~0 (min_lr): the first stage's weights
    assert load_tokenizer(second / "tokenizer.json").encode("Where is Mary?") == \
        load_tokenizer(first / "tokenizer.json").encode("Where is Mary?")
    assert RunConfig.load(second / "config.yaml").model.segment_len == 1024
