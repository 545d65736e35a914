"""``longmem bench``: run the modules of ``benchmarks/`` and write their page (``runs/bench/BENCHMARKS.md`` by
default; ``--out BENCHMARKS.md`` replaces the published one).

A module defines ``run(quick: bool) -> str``, a markdown section; one that draws pictures also takes the page's
folder and the pictures' folder, ``run(quick, *, out_dir: Path, figures: Path)``, and links them relative to the
page: beside the page, or in ``benchmarks/`` for the published BENCHMARKS.md (its layout). The suite needs a checkout
of the repository: pip installs the package, not ``benchmarks/``."""
from __future__ import annotations

import importlib.util
import inspect
import logging
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from longmem.io import atomic_write_text

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
PUBLISHED = BENCH_DIR.parent / "BENCHMARKS.md"           # its pictures live in benchmarks/
SUITE = ("xl_speed", "shakespeare", "profiles", "rmt_probes", "knn_speed", "knn_recall", "gen_memory",
         "serve_load", "babi", "seq2seq_passage")
EXTRA = ("ntm_copy",)          # run with --only: too long for the default suite


def train_rates(runs: dict, data: torch.Tensor, *, repeats: int) -> dict[str, float]:
    """Median training tokens/s of each ``name -> (model, optimizer, state)``, measured side by side:
    every run steps once through ``data`` (steps, B, T + 1) to warm up (and fill its memory), then
    the runs take turns ``repeats`` times. Each run's memory state is carried from turn to turn."""
    runs = {name: list(r) for name, r in runs.items()}
    steps, batch, seg = data.shape[0], data.shape[1], data.shape[2] - 1

    def turn(name: str) -> float:
        model, opt, state = runs[name]
        t0 = time.perf_counter()
        for s in range(steps):
            out = model(data[s, :, :-1], state=state, targets=data[s, :, 1:])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            state = out.state.detach()
        runs[name][2] = state
        return steps * batch * seg / (time.perf_counter() - t0)

    return interleaved_rates(turn, list(runs), repeats=repeats)


def interleaved_rates(turn, names: list[str], *, repeats: int) -> dict[str, float]:
    """Median of ``turn(name)`` (a rate) per name: one warm-up turn each, then the names take turns
    ``repeats`` times, so a machine whose speed drifts slows every name alike."""
    for name in names:
        turn(name)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            rates[name].append(turn(name))
    return {name: statistics.median(v) for name, v in rates.items()}


def _load(name: str, folder: Path):
    path = folder / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {path} not found")
    spec = importlib.util.spec_from_file_location(f"longmem_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmarks(*, out: str | Path, quick: bool, argv: list[str] | None = None,
                   folder: Path = BENCH_DIR, suite=SUITE) -> str:
    if not folder.is_dir():
        raise FileNotFoundError(f"longmem bench needs a checkout of the longmem repository: the suite is its "
                                f"benchmarks/ folder, which pip does not install (looked for {folder}); clone the "
                                f"repository, `pip install -e .` there and run `longmem bench` (or `make bench`)")
    command = "longmem " + " ".join(argv) if argv else f"longmem bench{' --quick' if quick else ''} --out {out}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = BENCH_DIR if out.resolve() == PUBLISHED else out.parent
    sections = []
    t0 = time.perf_counter()
    for name in suite:
        log.info("%s ...", name)
        run = _load(name, folder).run
        draws = "out_dir" in inspect.signature(run).parameters
        sections.append(run(quick, out_dir=out.parent, figures=figures) if draws else run(quick))
    seconds = time.perf_counter() - t0
    header = [
        "# longmem benchmarks", "",
        f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d} in {seconds:.0f}s: "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads{', GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ', no GPU'}.",
        "Ratios are measured side by side in one run; absolute CPU times are indicative only.", "",
    ]
    text = "\n".join(header + sections)
    atomic_write_text(out, text)
    log.info("wrote %s (%.0fs)", out, seconds)
    return text
