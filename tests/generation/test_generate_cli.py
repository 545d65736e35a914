"""``longmem generate`` flags (in-process): the new sampling controls reach the library."""
from __future__ import annotations

import re

import pytest

from longmem.cli import main
from longmem.generation.generate import TextStream
from longmem.generation.processors import SamplingConfig

from conftest import make_tiny_run

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("gen") / "RUN", kind="none", mem_len=0, segment_len=16)


def test_generate_flags_match_the_library(run, capsys):
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, min_p=0.02, repetition_penalty=1.2,
              presence_penalty=0.3, frequency_penalty=0.2, logit_bias={65: 3.0, 66: -100.0}, seed=4)
    ref = TextStream(run.model, run.tokenizer, "ab", sampling=SamplingConfig(**kw), attention_sink=2)
    expected = "".join(ref)
    rc = main(["generate", str(run.path), "--prompt", "ab", "--max-new-tokens", "24", "--temperature", "0.9",
               "--top-p", "0.95", "--min-p", "0.02", "--repetition-penalty", "1.2", "--presence-penalty", "0.3",
               "--frequency-penalty", "0.2", "--logit-bias", "65=3", "--logit-bias", "66=-100", "--seed", "4",
               "--attention-sink", "2"])
    assert rc == 0
    assert capsys.readouterr().out == expected + "\n"
    stop = expected[3:5]
    rc = main(["generate", str(run.path), "--prompt", "ab", "--max-new-tokens", "24", "--temperature", "0.9",
               "--top-p", "0.95", "--min-p", "0.02", "--repetition-penalty", "1.2", "--presence-penalty", "0.3",
               "--frequency-penalty", "0.2", "--logit-bias", "65=3", "--logit-bias", "66=-100", "--seed", "4",
               "--attention-sink", "2", "--stop", stop])
    assert rc == 0 and capsys.readouterr().out == expected[:expected.find(stop)] + "\n"


@pytest.mark.parametrize("args,match", [(["--logit-bias", "x"], "ID=BIAS"), (["--top-p", "0"], "top_p"),
                                        (["--logit-bias", "300=1"], "logit_bias"),
                                        (["--max-new-tokens", "-2"], "max_new_tokens"),
                                        (["--logit-bias", "10=nan"], r"logit_bias values must be finite"),
                                        (["--logit-bias", "10=inf"], r"logit_bias values must be finite"),
                                        (["--logit-bias", "10=-1e39"], r"in \[-100, 100\]"),
                                        (["--temperature", "nan"], "temperature must be a finite number"),
                                        (["--top-p", "nan"], "top_p must be a finite number"),
                                        (["--seed", "-1"], "seed")])
def test_generate_flag_errors_are_clear(run, capsys, args, match):
    assert main(["generate", str(run.path), *args]) == 2
    err = capsys.readouterr().err
    assert "longmem generate: error:" in err and re.search(match, err) and "Traceback" not in err


def test_a_tiny_temperature_generates_greedily(run, capsys):
    assert main(["generate", str(run.path), "--prompt", "ab", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", str(run.path), "--prompt", "ab", "--max-new-tokens", "12", "--temperature",
                 "1e-39"]) == 0
    assert capsys.readouterr().out == greedy


def test_attention_sink_of_a_run_with_memory_is_refused_not_ignored(tmp_path, capsys, monkeypatch):
    xl = make_tiny_run(tmp_path / "XL", kind="xl", mem_len=16, segment_len=16)
    pytest.importorskip("fastapi")
    import longmem.serving.server as server
    served = []
    monkeypatch.setattr(server, "serve", lambda run, cfg: served.append(cfg.attention_sink))
    assert main(["serve", str(xl.path), "--attention-sink", "2"]) == 2 and not served   # before any socket
    assert "--memory.n_sinks" in capsys.readouterr().err
    assert main(["serve", str(xl.path)]) == 0 and served == [4]
    assert main(["generate", str(xl.path), "--prompt", "ab", "--max-new-tokens", "2", "--attention-sink", "2"]) == 2
    err = capsys.readouterr().err
    assert "--memory.n_sinks" in err and "'xl'" in err and "Traceback" not in err
    assert main(["generate", str(xl.path), "--prompt", "ab", "--max-new-tokens", "2"]) == 0
    # with its memory off the model decodes through the sliding cache, which takes the sinks
    assert main(["generate", str(xl.path), "--prompt", "ab", "--max-new-tokens", "2", "--memory.mem_len", "0",
                 "--attention-sink", "2"]) == 0
