"""``longmem bench`` writes its page and pictures into a run folder; only an explicit --out BENCHMARKS.md
replaces the published page (whose pictures live in benchmarks/). The three modules that draw run for real
here, with their measurements replaced by made-up numbers."""
from __future__ import annotations

import hashlib

import pytest

import longmem.bench as B
from longmem.cli import main

from conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

DRAWING = ("profiles", "knn_recall", "rmt_probes")


def published() -> dict[str, str]:
    files = [REPO_ROOT / "BENCHMARKS.md", *sorted((REPO_ROOT / "benchmarks").glob("*.png"))]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fake_measurements(monkeypatch):
    """Load the real modules, their measuring functions replaced (seconds instead of minutes)."""
    real = B._load

    def load(name, folder):
        module = real(name, folder)
        if name == "profiles":
            module.measure = lambda *, quick, **_: [{"kind": "xl", "length": n, "seconds": n / 1e4,
                                                "peak_growth_mib": 1.0, "tokens_per_s": 1e4} for n in (512, 1024)]
        elif name == "knn_recall":
            module.train_and_eval = lambda kind, *, steps, fillers: {
                "steps": steps, "train_s": 1.0, "final_loss": 0.5,
                "eval": {f: {"mean_distance": 10.0 + f, "accuracy": 0.5, "bins": []} for f in fillers}}
        elif name == "rmt_probes":
            module.bench = lambda task, kind, *, steps, n, lengths, **kw: {
                "task": task, "kind": kind, "n": n, "steps": steps, "train_seconds": None,
                "train_peak_rss_mib": None, "reused": False, "command": "longmem train ...",
                "results": [{"length": length, "depth": d, "accuracy": 0.5}
                            for length in (4 * module.SEG, *lengths) for d in module.DEPTHS]}
        return module
    monkeypatch.setattr(B, "_load", load)


def test_bench_writes_a_run_folder_and_leaves_the_published_page_alone(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    fake_measurements(monkeypatch)
    monkeypatch.chdir(tmp_path)
    before = published()
    assert main(["bench", "--quick", "--only", ",".join(DRAWING)]) == 0
    page = tmp_path / "runs" / "bench" / "BENCHMARKS.md"
    text = page.read_text()
    for png in ("profiles.png", "knn_recall.png", "rmt_probes.png"):
        assert (page.parent / png).is_file() and f"]({png})" in text
    assert published() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_bench_out_the_published_page_keeps_its_pictures_in_benchmarks(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    fake_measurements(monkeypatch)
    monkeypatch.setattr(B, "PUBLISHED", tmp_path / "BENCHMARKS.md")       # a stand-in for the checkout's page
    monkeypatch.setattr(B, "BENCH_DIR", tmp_path / "benchmarks")
    (tmp_path / "benchmarks").mkdir()
    assert main(["bench", "--quick", "--only", "profiles", "--out", str(tmp_path / "BENCHMARKS.md")]) == 0
    assert "](benchmarks/profiles.png)" in (tmp_path / "BENCHMARKS.md").read_text()
    assert (tmp_path / "benchmarks" / "profiles.png").is_file()
