"""Weights in safetensors, refusal of anything else, atomic writes."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longmem.io import atomic_write_bytes, atomic_write_text, read_safetensors
from longmem.training.checkpoint import load_weights, save_weights


class _Payload:
    """Unpickling this creates ``marker``: proof that code in a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_save_load_round_trip_gives_identical_logits(make_model, tmp_path):
    src = make_model(seed=1)
    dst = make_model(seed=2)
    x = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        assert not torch.equal(src(x).logits, dst(x).logits)
    save_weights(src, tmp_path / "model.safetensors")
    load_weights(dst, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(src(x).logits, dst(x).logits)
    assert dst.head.weight is dst.embed.weight                       # still tied after loading
    tensors, meta = read_safetensors(tmp_path / "model.safetensors")
    assert "head.weight" not in tensors and "embed.weight" in tensors   # the tied matrix is stored once
    assert meta["format"] == "longmem-weights"


def test_pickle_named_safetensors_is_refused_and_never_runs(make_model, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    payload = pickle.dumps({"embed.weight": _Payload(marker)})
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="safetensors") as e:
        load_weights(make_model(), path)
    assert "pickle" in str(e.value)
    assert not marker.exists()
    pickle.loads(payload)                                            # the payload is live: this test can fail
    assert marker.exists()


def test_torch_save_file_is_refused(make_model, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"embed.weight": torch.zeros(3), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(make_model(), path)
    assert not marker.exists()


def test_torn_and_foreign_files_are_refused(make_model, tmp_path):
    model = make_model()
    good = tmp_path / "model.safetensors"
    save_weights(model, good)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(model, torn)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(model, tiny)
    foreign = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}, str(foreign))
    with pytest.raises(ValueError, match="not a longmem weights file"):
        load_weights(model, foreign)
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "missing.safetensors")


def test_mismatching_checkpoint_names_the_tensor(make_model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(make_model(vocab_size=37), path)
    target = make_model(vocab_size=50)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="embed.weight") as e:
        load_weights(target, path)
    assert "(37, 16)" in str(e.value) and "(50, 16)" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())   # nothing half-loaded

    save_weights(make_model(n_layers=1), path)
    with pytest.raises(ValueError, match=r"missing \['blocks\.1\."):
        load_weights(make_model(n_layers=2), path)
    save_weights(make_model(n_layers=2), path)
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.1\."):
        load_weights(make_model(n_layers=1), path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    atomic_write_text(tmp_path / "sub" / "note.txt", "héllo")
    assert path.read_bytes() == b"second"
    assert (tmp_path / "sub" / "note.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(os.listdir(tmp_path / "sub")) == ["file.bin", "note.txt"]


def test_failed_atomic_write_cleans_up_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("x")                              # a non-empty folder cannot be replaced
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert (target / "inside").read_text() == "x"


def test_atomic_write_respects_umask(tmp_path):
    atomic_write_bytes(tmp_path / "a", b"1")
    (tmp_path / "b").write_bytes(b"1")
    assert (tmp_path / "a").stat().st_mode == (tmp_path / "b").stat().st_mode
