"""bAbI question answering (Weston et al. 2015): a reader for the real files and a
seeded generator of bAbI-like stories for tasks 1-3.

File format: each line is ``ID TEXT``; IDs restart at 1 where a new story
begins. A question line is ``ID QUESTION<TAB>ANSWER<TAB>SUPPORTING_IDS`` (a space
may stand before the first tab; answers of tasks 8 and 19 are comma-separated
lists). The statements before a question, in the same story, are its context.
The generator writes that same format and parses it back, so both paths share
one reader.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_FILE_RE = re.compile(r"qa(\d+)_.*_(train|test|valid)\.txt$")
_WORD_RE = re.compile(r"[A-Za-z0-9']+(?:,[A-Za-z0-9']+)*")


@dataclass
class BabiExample:
    task: int                    # 1..20 (0 when a file's name does not say)
    story: list[str]             # context statements, oldest first
    question: str
    answer: str                  # as in the file: "kitchen", or "apple,football" (tasks 8, 19)
    supporting: list[int]        # indices into ``story`` of the supporting statements

    @property
    def answers(self) -> list[str]:
        return self.answer.split(",")


def words(text: str) -> list[str]:
    """Lower-case words without punctuation: 'Where is Mary?' -> ['where', 'is', 'mary']."""
    return [w.lower() for w in _WORD_RE.findall(text)]


def parse_babi(lines, *, task: int = 0, source: str = "<text>") -> list[BabiExample]:
    """Examples of bAbI-format lines (an iterable of str)."""
    out: list[BabiExample] = []
    story: list[str] = []
    line_to_index: dict[int, int] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        head, _, rest = line.lstrip().partition(" ")
        if not head.isdigit():
            raise ValueError(f"{source}:{n}: a bAbI line starts with its ID, got {line[:40]!r}")
        line_id = int(head)
        if line_id == 1:                                   # a new story
            story, line_to_index = [], {}
        if "\t" in rest:
            parts = rest.split("\t")
            if len(parts) < 2 or not parts[1].strip():
                raise ValueError(f"{source}:{n}: a question line needs QUESTION<TAB>ANSWER[<TAB>IDS]")
            question, answer = parts[0].strip(), parts[1].strip()
            ids = parts[2].split() if len(parts) > 2 else []
            try:
                supporting = [line_to_index[int(i)] for i in ids]
            except (KeyError, ValueError):
                raise ValueError(f"{source}:{n}: supporting ids {ids} do not name statements of this story") from None
            out.append(BabiExample(task=task, story=list(story), question=question, answer=answer,
                                   supporting=supporting))
        else:
            line_to_index[line_id] = len(story)
            story.append(rest.strip())
    return out


def read_babi_file(path: str | Path) -> list[BabiExample]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bAbI file not found: {path}")
    m = _FILE_RE.search(path.name)
    with path.open(encoding="utf-8") as f:
        return parse_babi(f, task=int(m.group(1)) if m else 0, source=str(path))


def babi_files(path: str | Path, *, split: str, tasks: list[int] | None = None) -> dict[int, Path]:
    """{task: file} of a bAbI folder (files ``qa{N}_..._{split}.txt``), or of one file."""
    path = Path(path)
    if path.is_file():
        m = _FILE_RE.search(path.name)
        if split != "train" and m:                         # a train file given: its test file sits beside it
            path = path.with_name(path.name[:m.start(2)] + split + ".txt")
            if not path.is_file():
                raise FileNotFoundError(f"bAbI {split} file not found: {path}")
        return {int(m.group(1)) if m else 0: path}
    if not path.is_dir():
        raise FileNotFoundError(f"bAbI data not found: {path}")
    found = {}
    for p in sorted(path.iterdir()):
        m = _FILE_RE.search(p.name)
        if m and m.group(2) == split:
            found[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"no bAbI {split} files (qa<N>_..._{split}.txt) in {path}")
    if tasks:
        missing = sorted(set(tasks) - set(found))
        if missing:
            raise FileNotFoundError(f"bAbI task(s) {missing} have no {split} file in {path}")
        found = {t: found[t] for t in tasks}
    return dict(sorted(found.items()))


def load_babi(path: str | Path, *, split: str, tasks: list[int] | None = None) -> list[BabiExample]:
    """Examples of the chosen tasks (all found when ``tasks`` is empty) of a folder or file."""
    return [ex for f in babi_files(path, split=split, tasks=tasks).values() for ex in read_babi_file(f)]


# -- generator ---------------------------------------------------------------------------------------------
ACTORS = ["Mary", "John", "Daniel", "Sandra"]
PLACES = ["bathroom", "bedroom", "kitchen", "hallway", "garden", "office"]
OBJECTS = ["football", "apple", "milk"]
MOVES = ["moved to", "went to", "journeyed to", "travelled to", "went back to"]
TAKES = ["picked up", "got", "grabbed", "took"]
DROPS = ["dropped", "put down", "discarded", "left"]
GENERATED_TASKS = (1, 2, 3)


def _story(task: int, rng: random.Random, n_questions: int) -> list[str]:
    """One story in file format (lines without IDs yet): statements and questions."""
    where = {a: None for a in ACTORS}                      # actor -> place
    holder = {o: None for o in OBJECTS}                    # object -> actor or None
    obj_at = {o: None for o in OBJECTS}                    # object -> place (None until placed)
    obj_trail = {o: [] for o in OBJECTS}                   # (place, line that puts it there) per object
    lines: list[tuple[str, str | None, list[int]]] = []    # (text, answer, supporting line numbers)
    last_line = {}                                         # key -> line number of the fact that set it

    def say(text: str) -> int:
        lines.append((text, None, []))
        return len(lines)

    def move(actor: str) -> None:
        place = rng.choice([p for p in PLACES if p != where[actor]])
        where[actor] = place
        n = say(f"{actor} {rng.choice(MOVES)} the {place}.")
        last_line[actor] = n
        for o in OBJECTS:
            if holder[o] == actor:
                obj_at[o] = place
                obj_trail[o].append((place, n))

    def statement() -> None:
        placed = [a for a in ACTORS if where[a]]
        if task == 1 or len(placed) < 2 or rng.random() < 0.5:
            move(rng.choice(ACTORS))
            return
        actor = rng.choice(placed)
        held = [o for o in OBJECTS if holder[o] == actor]
        free = [o for o in OBJECTS if holder[o] is None and (obj_at[o] in (None, where[actor]))]
        if held and (not free or rng.random() < 0.4):
            o = rng.choice(held)
            holder[o] = None
            last_line[o] = say(f"{actor} {rng.choice(DROPS)} the {o}.")
        elif free:
            o = rng.choice(free)
            holder[o] = actor
            n = say(f"{actor} {rng.choice(TAKES)} the {o}.")
            last_line[o] = n
            if obj_at[o] != where[actor]:                  # the place is known from the actor's last move
                obj_at[o] = where[actor]
                obj_trail[o].append((where[actor], last_line[actor]))
        else:
            move(actor)

    def question() -> bool:
        if task == 1:
            placed = [a for a in ACTORS if where[a]]
            if not placed:
                return False
            a = rng.choice(placed)
            lines.append((f"Where is {a}?", where[a], [last_line[a]]))
            return True
        if task == 2:
            known = [o for o in OBJECTS if obj_at[o] and o in last_line]
            if not known:
                return False
            o = rng.choice(known)
            if holder[o]:                                   # carried: where its holder is
                a = holder[o]
                sup = [last_line[o], last_line[a]]
                ans = where[a]
            else:                                           # dropped: where it was dropped
                ans = obj_at[o]
                sup = [last_line[o], obj_trail[o][-1][1]]   # the drop and the move that brought it there
            lines.append((f"Where is the {o}?", ans, sorted(set(sup))))
            return True
        # task 3: where was the object before its current place (the place before the last move)
        known = [o for o in OBJECTS if len(obj_trail[o]) >= 2 and obj_trail[o][-1][0] != obj_trail[o][-2][0]]
        if not known:
            return False
        o = rng.choice(known)
        (prev, n_prev), (cur, n_cur) = obj_trail[o][-2], obj_trail[o][-1]
        lines.append((f"Where was the {o} before the {cur}?", prev, [n_prev, n_cur]))
        return True

    asked, per_question = 0, {1: 2, 2: 4, 3: 8}[task]
    for _ in range(40 * n_questions):
        for _ in range(rng.randint(1, per_question)):
            statement()
        if question():
            asked += 1
            if asked == n_questions:
                break
    out = []
    for i, (text, answer, sup) in enumerate(lines, 1):
        out.append(f"{i} {text}" if answer is None else f"{i} {text}\t{answer}\t{' '.join(map(str, sup))}")
    return out


def generate_babi(*, task: int, n: int, seed: int, questions_per_story: int = 5) -> list[BabiExample]:
    """``n`` examples of a bAbI-like task (1: single supporting fact, 2: two, 3: three), seeded."""
    if task not in GENERATED_TASKS:
        raise ValueError(f"generated bAbI tasks are {', '.join(map(str, GENERATED_TASKS))}; got {task} "
                         f"(use the real files through data.path for the others)")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"babi/{task}/{seed}")
    out: list[BabiExample] = []
    while len(out) < n:
        out += parse_babi(_story(task, rng, questions_per_story), task=task, source=f"generated task {task}")
    return out[:n]


# -- tensors for MemN2N ------------------------------------------------------------------------------------
@dataclass
class EncodedBabi:
    """Examples as word ids: per example its statements (n_i, J_i), question and answer id."""
    stories: list[np.ndarray]
    questions: list[np.ndarray]
    answers: np.ndarray          # (N,)
    tasks: np.ndarray            # (N,)

    def __len__(self) -> int:
        return len(self.answers)


def babi_texts(examples: list[BabiExample]) -> list[str]:
    """Every text of the examples (to fit a word vocabulary)."""
    return [t for ex in examples for t in (*ex.story, ex.question, ex.answer)]


def _pad_rows(rows: list[list[int]]) -> np.ndarray:
    width = max([len(r) for r in rows] + [1])
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def encode_babi(examples: list[BabiExample], tokenizer) -> EncodedBabi:
    """Word ids of the examples; an answer is one vocabulary entry ("s,e" of task 19 included)."""
    if not examples:
        raise ValueError("no bAbI examples to encode")
    answers = []
    for ex in examples:
        ids = tokenizer.encode(ex.answer)
        answers.append(ids[0] if len(ids) == 1 else 1)                # 1: unknown word
    return EncodedBabi(stories=[_pad_rows([tokenizer.encode(s) for s in ex.story]) for ex in examples],
                       questions=[np.asarray(tokenizer.encode(ex.question), dtype=np.int64) for ex in examples],
                       answers=np.asarray(answers, dtype=np.int64),
                       tasks=np.asarray([ex.task for ex in examples], dtype=np.int64))


def babi_batch(data: EncodedBabi, idx, *, memory_size: int, noise: float = 0.0,
               rng: random.Random | None = None) -> dict[str, torch.Tensor]:
    """A MemN2N batch of the examples ``idx``: story (B, M, J), n_memories (B,), question (B, J'),
    answer (B,). Only the last ``memory_size`` statements are kept. ``noise`` > 0 inserts that
    fraction of empty memories at random places (random noise, Sukhbaatar et al. 2015 §4.1)."""
    stories = []
    for i in idx:
        rows = list(data.stories[i])
        if noise > 0 and rows:
            n_empty = sum(rng.random() < noise for _ in rows)
            for _ in range(n_empty):
                rows.insert(rng.randint(0, len(rows)), np.zeros(0, dtype=np.int64))
        stories.append(rows[-memory_size:])
    M = max([len(s) for s in stories] + [1])
    J = max([len(r) for s in stories for r in s] + [1])
    story = np.zeros((len(stories), M, J), dtype=np.int64)
    for b, rows in enumerate(stories):
        for m, r in enumerate(rows):
            story[b, m, :len(r)] = r
    return {"story": torch.from_numpy(story),
            "n_memories": torch.tensor([len(s) for s in stories], dtype=torch.long),
            "question": torch.from_numpy(_pad_rows([data.questions[i].tolist() for i in idx])),
            "answer": torch.from_numpy(data.answers[list(idx)])}
