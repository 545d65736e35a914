"""longmem.io: the tensor file format (format, version, fingerprint, info) and what reading refuses."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import longmem.io
from longmem.io import read_tensor_file, tensor_file_bytes, weights_fingerprint, write_tensor_file

pytestmark = pytest.mark.unit

TENSORS = {"keys.0": torch.arange(12.0).reshape(3, 4), "count": torch.tensor([5])}
HEADER = {"format": "longmem-test", "version": "2", "fingerprint": "abc123", "info": json.dumps({"step": 7})}


def read(path, **kw):
    return read_tensor_file(path, **{"format": "longmem-test", "versions": ("2",), "fingerprint": "abc123",
                                     "what": "test file", **kw})


def test_a_tensor_file_round_trips_its_tensors_and_info(tmp_path):
    path = tmp_path / "f.safetensors"
    write_tensor_file(path, TENSORS, format="longmem-test", version="2", fingerprint="abc123",
                      info={"step": 7, "note": "é"})
    tensors, info = read(path)
    assert info == {"step": 7, "note": "é"}
    assert tensors.keys() == TENSORS.keys() and all(torch.equal(tensors[k], v) for k, v in TENSORS.items())
    assert read(path, fingerprint=None)[1]["step"] == 7                   # no fingerprint asked: not checked
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]     # written atomically, no leftovers


def test_files_from_before_the_format_keep_their_flat_header_fields_as_info(tmp_path):
    path = tmp_path / "old.safetensors"
    path.write_bytes(st_save(TENSORS, metadata={"format": "longmem-test", "step": "3"}))   # no version, no info
    assert read(path, versions=("2", None), fingerprint=None)[1] == {"step": "3"}
    with pytest.raises(ValueError, match="version None"):
        read(path, fingerprint=None)


def _bytes(**header) -> bytes:
    return st_save(TENSORS, metadata={k: v for k, v in {**HEADER, **header}.items() if v is not None})


def _tampered() -> list[tuple[str, bytes, str]]:
    """(name, file bytes, what the message says) for each way a tensor file is foreign, old or damaged."""
    good = tensor_file_bytes(TENSORS, format="longmem-test", version="2", fingerprint="abc123", info={"step": 7})
    n = int.from_bytes(good[:8], "little")
    return [
        ("truncated", good[:-10], "not a valid safetensors"),
        ("truncated header", good[:20], "not a valid safetensors"),
        ("only a few bytes", good[:5], "only 5 bytes"),
        ("header length garbage", (10**12).to_bytes(8, "little") + good[8:], "not a valid safetensors"),
        ("header not JSON", good[:8] + b"[" + good[9:], "not a valid safetensors"),
        ("header nested too deep", (100_001).to_bytes(8, "little") + b"{" + b"[" * 100_000, "not a valid"),
        ("tensor offsets edited", good[:8] + good[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1)
         + good[8 + n:], "not a valid safetensors"),
        ("a pickle", b"\x80\x04\x95" + b"\x00" * 64, "pickle"),
        ("no metadata", st_save(TENSORS), "names no format"),
        ("another format", _bytes(format="longmem-weights"), "format 'longmem-weights'"),
        ("another version", _bytes(version="1"), "version '1', this longmem reads version 2"),
        ("no version", _bytes(version=None), "version None"),
        ("fingerprint missing", _bytes(fingerprint=None), "made by another model"),
        ("another fingerprint", _bytes(fingerprint="ffff"), "made by another model (weights fingerprint ffff"),
        ("info not JSON", _bytes(info="{not json"), "'info' is not a JSON object"),
        ("info a JSON list", _bytes(info="[1, 2]"), "'info' is not a JSON object"),
        ("info nested too deep", _bytes(info="[" * 100_000), "'info' is not a JSON object"),
    ]


@pytest.mark.parametrize("name,data,what", _tampered(), ids=[c[0] for c in _tampered()])
def test_foreign_old_and_damaged_tensor_files_are_refused_naming_the_file(tmp_path, name, data, what):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        read(path)
    assert type(err.value) is ValueError and str(path) in str(err.value) and what in str(err.value), err.value


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="test file not found"):
        read(tmp_path / "missing.safetensors")


def test_the_fingerprint_changes_with_any_weight():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b) and len(weights_fingerprint(a)) == 16
    with torch.no_grad():
        b.bias[1] += 1e-6
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_io_is_the_bottom_layer():
    tree = ast.parse(Path(longmem.io.__file__).read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert "safetensors.torch" in modules and not [m for m in modules if m.split(".")[0] == "longmem"]
