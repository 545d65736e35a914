"""`pip install .` (not editable) into a fresh venv outside the checkout: the commands work from any folder,
presets are found by name inside the installed package, and `bench` says it needs a checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def _run(cmd: list, *, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, encoding="utf-8",
                          timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, env): longmem installed from a copy of the sources into a venv with no pip of its own; the
    dependencies (torch ...) are this interpreter's site-packages, put on its path by a .pth file, whose own
    .pth files (this checkout's editable install) are not run."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"                                    # only what a source distribution holds
    shutil.copytree(REPO_ROOT / "longmem", src / "longmem", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    venv = tmp / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = _run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp, env=env).stdout.strip()
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = _run([venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                "--ignore-installed", src], cwd=tmp, env=env)
    assert res.returncode == 0, res.stderr
    shutil.rmtree(src)                                   # the installed copy must stand alone
    return venv, Path(purelib), env


def test_an_installed_longmem_runs_from_any_folder_with_presets_by_name(installed, tmp_path):
    venv, purelib, env = installed
    res = _run([venv / "bin/python", "-c", "import longmem, longmem.config as c; print(longmem.__file__); "
                "print(c.find_config('tiny')); print(c.find_config('demo'))"], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    for line in res.stdout.splitlines():                 # the installed copy, not the checkout
        assert Path(line).is_relative_to(purelib / "longmem"), res.stdout
    assert (purelib / "longmem" / "py.typed").is_file()
    longmem = venv / "bin/longmem"
    for args in (["--help"], ["demo", "--help"], ["train", "--help"], ["bench", "--help"]):
        res = _run([longmem, *args], cwd=tmp_path, env=env)
        assert res.returncode == 0 and res.stdout.startswith("usage: longmem"), (args, res.stderr)
    res = _run([longmem, "train", "--config", "tiny", "--out", "RUN", "--train.max_steps", "2", "--train.log_every",
                "1", "--train.progress", "false", "--train.threads", "1"], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert {"config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= {
        p.name for p in (tmp_path / "RUN").iterdir()}
    res = _run([longmem, "bench", "--quick", "--out", "page/BENCHMARKS.md"], cwd=tmp_path, env=env)
    assert res.returncode == 2 and "longmem bench: error: longmem bench needs a checkout" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RUN"]       # nothing written
