"""The type checker over the public modules (the list and settings: pyproject.toml's [tool.mypy]): any error
fails. A first run reads torch's annotations (about 30-50 s); later runs reuse .mypy_cache (a few seconds)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_the_public_modules_type_check():
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
    assert "Success: no issues found" in res.stdout
