"""Typed configs: validation, YAML round trip, dotted overrides."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from longmem.config import (ARCH_CONFIGS, PRESETS, DataConfig, MemoryConfig, ModelConfig, RunConfig, TaskConfig,
                            TrainConfig, config_help, find_config, preset_names, valid_keys)

from conftest import REPO_ROOT


def test_defaults_and_derived_fields():
    cfg = RunConfig()
    assert cfg.model.d_ff == 4 * cfg.model.d_model
    assert cfg.memory is cfg.model.memory
    assert ModelConfig(d_model=32, n_heads=2, d_ff=48).d_ff == 48


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(d_model=12, n_heads=4), "even"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layers=0), "n_layers"),
    (dict(segment_len=0), "segment_len"),
    (dict(arch="lstm"), "the baselines have their own config classes"),
])
def test_model_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_memory_config_validation():
    with pytest.raises(ValueError, match="accepted"):
        MemoryConfig(kind="lstm")
    with pytest.raises(ValueError, match="n_tokens"):
        MemoryConfig(kind="tokens", tokens={"n_tokens": 0})
    assert MemoryConfig(kind="tokens", tokens={"n_tokens": 4}, mem_len=16).mem_len == 16     # tokens + XL
    with pytest.raises(ValueError, match="mem_len"):
        MemoryConfig(kind="xl", mem_len=-1)
    with pytest.raises(ValueError, match="xl"):
        MemoryConfig(kind="none", mem_len=8)
    assert MemoryConfig(kind="xl", mem_len=0).mem_len == 0


def test_data_and_train_config_validation():
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ValueError, match="train.foo") as e:
        RunConfig().override({"train.foo": "1"})
    assert "train.max_steps" in str(e.value)
    for key in ("foo", "optim.lr", "train.lr.peak", "model.memory"):
        with pytest.raises(ValueError) as e:
            RunConfig().override({key: "1"})
        assert "valid keys" in str(e.value)


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  max_steps: 5\n  foo: 1\n")
    with pytest.raises(ValueError, match="train.foo") as e:
        RunConfig.load(path)
    assert "train.max_steps" in str(e.value)
    path.write_text("training:\n  max_steps: 5\n")
    with pytest.raises(ValueError, match="valid sections"):
        RunConfig.load(path)
    path.write_text("model:\n  memory:\n    kind: xl\n")       # memory is its own top-level section
    with pytest.raises(ValueError, match="model.memory"):
        RunConfig.load(path)


@pytest.mark.parametrize("key,value", [
    ("train.max_steps", "abc"),
    ("train.max_steps", "2.5"),
    ("train.max_steps", "true"),
    ("train.lr", "fast"),
    ("train.progress", "maybe"),
    ("data.tokenizer", "wordpiece"),
    ("model.d_model", "[16]"),
])
def test_bad_override_types_raise(key, value):
    with pytest.raises(ValueError, match=key.split(".")[1]):
        RunConfig().override({key: value})


def test_bad_yaml_types_raise(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  max_steps: abc\n")
    with pytest.raises(ValueError, match="train.max_steps"):
        RunConfig.load(path)


def test_tokens_memory_and_bptt_options_from_the_command_line(tmp_path):
    cfg = RunConfig().override({"memory.kind": "tokens", "memory.tokens.n_tokens": "4", "train.bptt_segments": "4",
                                "train.curriculum": "1,2,4,8", "train.max_steps": "80"})
    assert cfg.memory.kind == "tokens" and cfg.memory.tokens.n_tokens == 4
    assert cfg.train.curriculum_stages() == [1, 2, 4, 8]
    # four equal stages over 80 steps; the bptt window is capped by bptt_segments
    assert [cfg.train.segments_at(s) for s in (0, 19, 20, 59, 60, 79)] == [1, 1, 2, 4, 8, 8]
    assert [cfg.train.bptt_at(s) for s in (0, 20, 40, 60)] == [1, 2, 4, 4]
    plain = RunConfig().override({"train.bptt_segments": "3"})
    assert plain.train.segments_at(5) == 0 and plain.train.bptt_at(5) == 3
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    assert RunConfig.load(path).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("key,value,match", [
    ("train.bptt_segments", "0", "bptt_segments must be from 1 to"),
    ("train.curriculum", "1,two,4", "segment counts from 1 to"),
    ("train.curriculum", "1,0", "segment counts from 1 to"),
    ("memory.tokens.n_tokens", "-1", "n_tokens"),
    ("memory.token_noise", "-0.1", "token_noise was removed"),
    ("memory.tokens.floor", "1.0", "tokens.floor"),
    ("memory.tokens.floor", "0.05", "needs memory.tokens.gate sigmoid"),
    ("memory.tokens.stretch", "-0.1", "tokens.stretch must be a finite number >= 0"),
    ("memory.tokens.stretch", "0.1", "needs memory.tokens.gate sigmoid"),
    ("train.aux_weight", "-1", "aux_weight must be a finite number >= 0"),
    ("memory.tokens.gate", "gru", "accepted: none, sigmoid"),
    pytest.param("memory.token_gate_stretch", "-0.1", "tokens.stretch must be a finite number >= 0",  # 0.1 names read
                 marks=pytest.mark.filterwarnings("ignore:memory.token_gate_stretch is the old name:FutureWarning")),
    ("task.linear_start_patience", "-1", "linear_start_patience"),
])
def test_bptt_and_tokens_options_are_validated(key, value, match):
    with pytest.raises(ValueError, match=match):
        RunConfig().override({key: value})


def test_an_old_key_is_read_as_the_new_one_with_a_future_warning():
    with pytest.warns(FutureWarning, match="memory.token_gate is the old name of memory.tokens.gate"):
        cfg = RunConfig().override({"memory.kind": "tokens", "memory.token_gate": "true"})
    assert cfg.memory.tokens.gate == "sigmoid"                   # the old value too: a bool then, a gate type now


def test_dotted_override_reaches_memory_and_leaves_original_alone():
    base = RunConfig()
    cfg = base.override({"memory.kind": "xl", "memory.mem_len": "64", "train.lr": "3e-4",
                         "train.progress": "false", "model.dropout": "0"})
    assert cfg.model.memory.mem_len == 64 and cfg.memory.kind == "xl"
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.progress is False
    assert isinstance(cfg.model.dropout, float)
    assert base.memory.kind == "none" and base.memory.mem_len == 0
    assert cfg.override({"memory.mem_len": 128}).memory.mem_len == 128    # non-string values too


@pytest.mark.parametrize("path", ["yes", "off", "my: corpus.txt", "[draft].txt", "1.50"])
def test_string_overrides_are_kept_verbatim(path):
    """``--data.path`` is a path: YAML must not turn it into a bool, a dict, a float
    or a parse error (which would escape the CLI's error handling as a traceback)."""
    assert RunConfig().override({"data.path": path}).data.path == path


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig().override({"memory.kind": "xl", "memory.mem_len": "48", "model.d_model": "32",
                                "data.path": "corpus/", "train.lr": "2e-3", "train.progress": "false"})
    cfg.save(tmp_path / "config.yaml")
    loaded = RunConfig.load(tmp_path / "config.yaml")
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded == cfg
    on_disk = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert set(on_disk) == {"model", "memory", "data", "train", "task"}
    assert {"kind": "xl", "mem_len": 48}.items() <= on_disk["memory"].items()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        RunConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="YAML"):
        RunConfig.load(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        RunConfig.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert RunConfig.load(empty) == RunConfig()


def test_presets_ship_in_the_package_and_are_found_by_name(tmp_path, monkeypatch):
    cfg = RunConfig.load(find_config("tiny"))
    assert cfg.memory.kind == "xl" and cfg.memory.mem_len == 32
    assert cfg.model.d_model == 32 and cfg.model.d_ff == 128
    assert {"tiny", "demo", "passkey", "babi"} <= set(preset_names())
    for name in preset_names():                                        # every preset is a valid config
        RunConfig.load(find_config(name))
    assert find_config("tiny.yaml") == PRESETS / "tiny.yaml"
    assert (REPO_ROOT / "configs").resolve() == PRESETS                # the checkout's configs/ is that folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("train: {max_steps: 3}\n")           # a file of that name wins
    assert find_config("tiny") == Path("tiny")
    for wrong in ("tinny", "configs/tiny.yaml", "tiny.json"):
        with pytest.raises(FileNotFoundError, match="neither a file nor a preset name") as e:
            find_config(wrong)
        assert "presets shipped with longmem: babi" in str(e.value)
    with pytest.raises(FileNotFoundError, match="did you mean tiny"):
        find_config("tinny")


def test_every_key_has_help_and_a_valid_default():
    rows = config_help()
    assert [k for k, _, _ in rows] == valid_keys()
    assert "memory.mem_len" in valid_keys() and "model.memory" not in valid_keys()
    assert all(text for _, text, _ in rows)
    # every default survives the override path (keys and types agree), each model key under its own arch
    baseline = {k for k, text, _ in rows if text.startswith("(model.arch ")}
    RunConfig().override({k: d for k, _, d in rows if k not in baseline})
    for arch in ("lstm", "seq2seq", "memn2n"):
        own = {k: d for k, text, d in rows if k in baseline and f" {arch}" in text.split(")")[0]}
        assert RunConfig().override({"model.arch": arch, **own}).model.arch == arch
    # a setting of the Transformer explicitly given to a baseline is refused, naming its arch
    with pytest.raises(ValueError, match="model.smear_keys is a setting of model.arch transformer"):
        RunConfig().override({"model.arch": "lstm", "model.smear_keys": "true"})


NUMERIC = [(key, type(default)) for key, _, default in config_help()
           if isinstance(default, (int, float)) and not isinstance(default, bool)]


@pytest.mark.parametrize("key,kind", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_number_of_every_config_is_range_checked(key, kind):
    """No size, count, step, seed, rate or weight may be negative, NaN, infinite or (integers) beyond 2**31:
    each is refused with a ValueError naming its key, from the command line and from Python."""
    bad = ["-1", "nan", "inf", "-inf"] + ([str(2**31), "1e23"] if kind is int else [])
    arch = {} if key.split(".")[1] in {f.name for f in dataclasses.fields(ModelConfig)} or not key.startswith(
        "model.") else {"model.arch": next(a for a, c in ARCH_CONFIGS.items()
                                           if key.split(".")[1] in {f.name for f in dataclasses.fields(c)})}
    for value in bad:
        with pytest.raises(ValueError, match=re.escape(key)):
            RunConfig().override({**arch, key: value})
    section, *groups, name = key.split(".")
    klass = {"model": ModelConfig, "memory": MemoryConfig, "data": DataConfig, "train": TrainConfig,
             "task": TaskConfig}[section]
    if section == "model" and name not in {f.name for f in dataclasses.fields(ModelConfig)}:
        klass = next(c for c in ARCH_CONFIGS.values() if name in {f.name for f in dataclasses.fields(c)})
    for group in groups:                                       # memory.knn.k -> KNNConfig
        klass = typing.get_type_hints(klass)[group]
    with pytest.raises(ValueError, match=re.escape(key)):
        klass(**{name: kind(-1)})


@pytest.mark.parametrize("key,value", [("train.grad_accum", "1e23"), ("train.grad_accum", "100000"),
                                       ("train.bptt_segments", "1e9"), ("train.curriculum", "1,1000000000")])
def test_work_per_step_that_could_never_finish_is_refused(key, value):
    with pytest.raises(ValueError, match=f"{re.escape(key)}.*1 to 65536"):
        RunConfig().override({key: value})
    assert RunConfig().override({key: "1,4" if key == "train.curriculum" else "4"})      # sane values pass


def test_a_mistyped_key_gets_the_closest_one_suggested(tmp_path):
    with pytest.raises(ValueError, match=r"did you mean train\.lr\?"):
        RunConfig().override({"train.lrr": "1"})
    (tmp_path / "c.yaml").write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ValueError, match=r"did you mean model\.d_model\?"):
        RunConfig.load(tmp_path / "c.yaml")


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("42\n", "int"), ("just words\n", "str"),
                                       ("[" * 100_000, None)])
def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"YAML {kind}" if kind else "not valid YAML"):
        RunConfig.load(path)
