"""Run directories: writing the three files by hand and loading them back."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longmem.config import RunConfig
from longmem.data.tokenizer import ByteTokenizer, CharTokenizer, save_tokenizer
from longmem.models import MemoryLM
from longmem.runs import CONFIG, TOKENIZER, WEIGHTS, load_run
from longmem.training.checkpoint import save_weights

from conftest import spread_weights


def write_run(path: Path, *, tokenizer=None, memory: dict | None = None) -> MemoryLM:
    cfg = RunConfig().override({"model.vocab_size": "256", "model.d_model": "16", "model.n_layers": "2",
                                "model.n_heads": "2", "model.segment_len": "8",
                                **(memory or {"memory.kind": "xl", "memory.mem_len": "8"})})
    model = spread_weights(MemoryLM(cfg.model)).eval()
    path.mkdir()
    cfg.save(path / CONFIG)
    save_weights(model, path / WEIGHTS)
    save_tokenizer(tokenizer or ByteTokenizer(), path / TOKENIZER)
    return model


def test_load_run_rebuilds_the_model(tmp_path):
    model = write_run(tmp_path / "run")
    run = load_run(tmp_path / "run")
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(run.model(x).logits, model(x).logits)
    assert not run.model.training
    assert isinstance(run.tokenizer, ByteTokenizer)
    assert run.config.to_dict() == RunConfig.load(tmp_path / "run" / CONFIG).to_dict()


def test_load_run_with_longer_memory(tmp_path):
    write_run(tmp_path / "run")
    run = load_run(tmp_path / "run", overrides={"memory.mem_len": "32"})
    assert run.model.xl.mem_len == 32
    assert run.config.memory.mem_len == 32 == run.model.config.memory.mem_len
    state = None
    for _ in range(5):
        state = run.model(torch.randint(0, 256, (1, 8)), state=state).state
    assert state.xl.length == 32
    with pytest.raises(ValueError, match="memory.kind"):                   # kNN would need trained weights
        load_run(tmp_path / "run", overrides={"memory.kind": "knn"})
    # a kind that needs no training may replace the trained one: no memory, or sinks + a window
    assert load_run(tmp_path / "run", overrides={"memory.kind": "none", "memory.mem_len": "0"}).model.memories == []
    sinks = load_run(tmp_path / "run", overrides={"memory.kind": "sinks", "memory.n_sinks": "2"}).model
    assert (sinks.kv.window, sinks.kv.n_sinks) == (8, 2)
    with pytest.raises(ValueError, match="train.max_steps"):
        load_run(tmp_path / "run", overrides={"train.foo": "1"})


def test_load_run_with_a_larger_knn_store(tmp_path):
    """The store's size and search are evaluation settings: a run trained with a small store reads
    longer contexts with a larger one; the weights are the same."""
    model = write_run(tmp_path / "run", memory={"memory.kind": "knn", "memory.mem_len": "0",
                                                "memory.knn.capacity": "16", "memory.knn.k": "4"})
    run = load_run(tmp_path / "run", overrides={"memory.knn.capacity": "64", "memory.knn.k": "8"})
    assert (run.model.knn.capacity, run.model.knn.k) == (64, 8) == (run.config.memory.knn.capacity,
                                                                   run.config.memory.knn.k)
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), model.state_dict().values()))
    state = run.model(torch.randint(0, 256, (1, 48))).state
    assert int(state.knn.count().max()) == 48                        # 48 entries kept: more than the 16 trained


def test_load_run_with_a_gate_floor(tmp_path):
    """memory.tokens.floor thresholds the trained gate: an evaluation setting, the weights are the same."""
    model = write_run(tmp_path / "run", memory={"memory.kind": "tokens", "memory.mem_len": "0",
                                                "memory.tokens.n_tokens": "2", "memory.tokens.gate": "sigmoid"})
    run = load_run(tmp_path / "run", overrides={"memory.tokens.floor": "0.05"})
    assert run.model.tokens.floor == 0.05 == run.config.memory.tokens.floor
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), model.state_dict().values()))


def test_load_run_refuses_to_silently_ignore_architecture_overrides(tmp_path):
    """An override of the architecture cannot apply to trained weights: it must be
    refused, not dropped while ``run.config`` claims it took effect."""
    write_run(tmp_path / "run")
    with pytest.raises(ValueError, match="d_model"):
        load_run(tmp_path / "run", overrides={"model.d_model": "32"})


def test_load_run_config_describes_the_loaded_model(tmp_path):
    """``run.config`` must describe ``run.model`` (eval reads both): a segment_len
    override is either applied to the model or refused."""
    write_run(tmp_path / "run")
    try:
        run = load_run(tmp_path / "run", overrides={"model.segment_len": "16"})
    except ValueError as e:
        assert "segment_len" in str(e)
        return
    assert run.model.config.segment_len == run.config.model.segment_len == 16


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        load_run(tmp_path / "nope")
    write_run(tmp_path / "run")
    (tmp_path / "run" / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_run(tmp_path / "run")
    write_run(tmp_path / "run2", tokenizer=CharTokenizer.fit(["abc"]))
    with pytest.raises(ValueError, match="tokenizer has 4 tokens"):
        load_run(tmp_path / "run2")


def test_files_nested_too_deeply_are_refused_with_a_value_error(tmp_path):
    """JSON and YAML a user hands over, nested 100,000 deep: a ValueError naming the file, not a RecursionError."""
    from longmem.data.corpus import iter_jsonl
    from longmem.data.tokenizer import load_tokenizer
    from longmem.training import state as S
    from longmem.io import read_safetensors
    deep = "[" * 100_000
    (tmp_path / "ck").mkdir()
    files = {"tokenizer.json": deep, "config.yaml": deep, "ck/trainer_state.json": deep, "docs.jsonl": deep + "\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    header = b'{"a":' + b"[" * 100_000
    (tmp_path / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    loaders = [lambda: load_tokenizer(tmp_path / "tokenizer.json"), lambda: RunConfig.load(tmp_path / "config.yaml"),
               lambda: S.load_checkpoint(tmp_path / "ck"), lambda: list(iter_jsonl(tmp_path / "docs.jsonl")),
               lambda: read_safetensors(tmp_path / "w.safetensors")]
    for load in loaders:
        with pytest.raises(ValueError, match="not valid|not a valid"):
            load()


def test_evaluating_without_memory_needs_no_other_memory_setting(tmp_path):
    """``--memory.kind none`` on a run with a memory (an imported model reads with sinks and a window) drops its
    memory length and sinks instead of refusing them; both may still be given."""
    cfg = RunConfig.from_dict({"model": {"vocab_size": 256, "d_model": 16, "n_layers": 1, "n_heads": 2, "segment_len": 8},
                               "memory": {"kind": "sinks", "mem_len": 16, "n_sinks": 2}})
    run_dir = tmp_path / "RUN"
    run_dir.mkdir()
    cfg.save(run_dir / CONFIG)
    save_weights(MemoryLM(cfg.model), run_dir / WEIGHTS)
    save_tokenizer(ByteTokenizer(), run_dir / TOKENIZER)
    run = load_run(run_dir, overrides={"memory.kind": "none"})
    assert (run.config.memory.kind, run.config.memory.mem_len, run.config.memory.n_sinks) == ("none", 0, 0)
    assert not run.model.stateful
    with pytest.raises(ValueError, match="mem_len"):
        load_run(run_dir, overrides={"memory.kind": "none", "memory.mem_len": "4"})


def test_a_run_trained_in_one_segment_reads_a_longer_stream_in_shorter_segments(tmp_path):
    """``model.segment_len`` is how a run reads, not a weight: a run trained on whole 48-token examples in one
    segment (no memory) read in 8-token segments through kind retrieval that keeps every block gives its own
    logits; the same segments with no memory do not (each sees 8 tokens)."""
    cfg = RunConfig.from_dict({"model": {"vocab_size": 256, "d_model": 16, "n_layers": 2, "n_heads": 2,
                                         "segment_len": 48}})
    run_dir = tmp_path / "RUN"
    run_dir.mkdir()
    cfg.save(run_dir / CONFIG)
    model = spread_weights(MemoryLM(cfg.model)).eval()
    save_weights(model, run_dir / WEIGHTS)
    save_tokenizer(ByteTokenizer(), run_dir / TOKENIZER)
    read = {"model.segment_len": "8", "memory.kind": "retrieval", "memory.mem_len": "8", "memory.n_sinks": "0",
            "memory.retrieval.block_size": "4", "memory.retrieval.top_k": "16", "memory.retrieval.capacity": "64"}
    run = load_run(run_dir, overrides=read)
    assert run.model.config.segment_len == 8
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        want = model(x).logits
        torch.testing.assert_close(run.model(x).logits, want, atol=1e-4, rtol=0)
        short = load_run(run_dir, overrides={"model.segment_len": "8"}).model(x).logits
    assert (short - want).abs().max() > 1e-2
