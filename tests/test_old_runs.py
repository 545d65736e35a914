"""A run directory written before the redesign (longmem 0.1 layout: flat memory keys, the baselines'
fields in ``model:``, kNN memory) loads, evaluates and resumes with today's code to the numbers that
version gave (tests/fixtures/README.md says how it was made)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from longmem.cli import main
from longmem.evaluation.suite import eval_ppl
from longmem.runs import load_run

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1-knn"
EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "run-0.1-knn.expected.json").read_text())

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


def test_a_run_of_longmem_0_1_loads_and_evaluates_as_it_did(tmp_path):
    run = load_run(FIXTURE)
    assert run.config.memory.kind == "knn" and run.config.memory.knn.capacity == 64   # memory.knn_capacity
    res = eval_ppl(run, split="val")
    assert res["loss"] == pytest.approx(EXPECTED["val_loss_step_6"], abs=1e-5)


def test_a_run_of_longmem_0_1_resumes_exactly(tmp_path):
    run_dir = tmp_path / "RUN"
    shutil.copytree(FIXTURE, run_dir)
    assert main(["train", "--resume", str(run_dir), "--train.max_steps", "8", "--train.progress", "false"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for step, want in EXPECTED["resumed"].items():
        got = [r for r in rows if r.get("step") == int(step) and "loss" in r]
        assert len(got) == 1, rows
        assert got[0]["loss"] == pytest.approx(want["loss"], abs=1e-6)
        assert got[0]["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-5)
    val = [r for r in rows if r.get("step") == 8 and "val_loss" in r]
    assert val and val[0]["val_loss"] == pytest.approx(EXPECTED["val_loss_step_8"], abs=1e-5)
