"""Evaluation runners, decoupled from the model.

The model side supplies `answer_fn(questions: list[dict]) -> list[str]`: it receives a batch of question records
as read from a questions.jsonl (`question_id`, `image`, `text`, ...; `image` is as written in the file, for the
generated suites relative to `<data_root>/images`) and returns one free-text answer per record, in order
(typically batched greedy generation).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .jsonl import read_jsonl
from .suites import METRICS, SUITES, baselines, score_suite

__all__ = ["AnswerFn", "evaluate", "format_table", "write_results", "answer_question_file", "answer_batches"]

log = logging.getLogger(__name__)

AnswerFn = Callable[[list[dict[str, Any]]], Sequence[str]]


def _iter_answers(questions: Sequence[dict[str, Any]], answer_fn: AnswerFn, batch_size: int, desc: str):
    """Yield (batch, answers) for consecutive batches, checking what `answer_fn` returns."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = math.ceil(len(questions) / batch_size)
    for b in tqdm(range(n_batches), desc=desc, unit="batch", disable=None):
        batch = [dict(q) for q in questions[b * batch_size:(b + 1) * batch_size]]
        out = list(answer_fn(batch))
        if len(out) != len(batch):
            raise ValueError(f"{desc}: answer_fn returned {len(out)} answers for a batch of {len(batch)} questions")
        for q, a in zip(batch, out):
            if not isinstance(a, str):
                raise TypeError(f"{desc}: answer_fn returned {type(a).__name__} for question "
                                f"{q.get('question_id')!r}, expected str")
        yield batch, out


def answer_batches(questions: Sequence[dict[str, Any]], answer_fn: AnswerFn, batch_size: int = 32,
                   desc: str = "answering") -> list[str]:
    """Call `answer_fn` on consecutive batches (copies of the records) and return all answers in question order.

    Raises ValueError when a batch comes back with the wrong number of answers, TypeError on a non-string.
    """
    answers: list[str] = []
    for _, out in _iter_answers(questions, answer_fn, batch_size, desc):
        answers.extend(out)
    return answers


def _suite_dir(data_root: Path, name: str) -> Path:
    for d in (data_root / "suites" / name, data_root / name):
        if (d / "questions.jsonl").exists():
            return d
    raise FileNotFoundError(f"suite {name!r} not found: no {data_root / 'suites' / name / 'questions.jsonl'}")


def evaluate(data_root: str | Path, answer_fn: AnswerFn, suites: Sequence[str] = SUITES, limit: int = 0,
             batch_size: int = 32) -> dict[str, dict[str, Any]]:
    """Answer and score the benchmark suites under `<data_root>/suites/`.

    limit: questions per suite (the first ones of questions.jsonl); 0 = all. Returns, per suite in the order
    given, {"metric", "ours", "chance", "majority", "details", "answers"}; chance and majority are computed on the
    same questions as ours (see `suites.baselines`); `answers` maps each question id (as a string) to the model's
    answer.
    """
    root = Path(data_root)
    if isinstance(suites, str):
        suites = [suites]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    results: dict[str, dict[str, Any]] = {}
    for name in suites:
        d = _suite_dir(root, name)
        questions = read_jsonl(d / "questions.jsonl", required=("question_id", "text"), str_keys=("text",),
                               unique_key="question_id")
        if limit:
            questions = questions[:limit]
        if not questions:
            raise ValueError(f"{d / 'questions.jsonl'}: no questions")
        answers = answer_batches(questions, answer_fn, batch_size, desc=name)
        predictions = {q["question_id"]: a for q, a in zip(questions, answers)}
        scored = score_suite(d, predictions)
        base = baselines(d, question_ids=list(predictions))
        # the answers go with the scores (like lmms-eval's logged samples): a result can be scored again, or
        # two models compared question by question, without generating again
        results[name] = {"metric": METRICS[name], "ours": scored["headline"], "chance": base["chance"],
                         "majority": base["majority"], "details": scored["details"],
                         "answers": {str(q): a for q, a in predictions.items()}}
        log.info("%s: %s ours %.2f chance %.2f majority %.2f (n=%d)", name, METRICS[name], scored["headline"],
                 base["chance"], base["majority"], scored["details"]["n"])
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain aligned text table: suite, metric, n, ours, chance, majority (one row per suite)."""
    header = ("suite", "metric", "n", "ours", "chance", "majority")
    rows = [header]
    for name, r in results.items():
        n = r.get("details", {}).get("n", "")
        rows.append((name, str(r.get("metric", "")), str(n),
                     *(f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "-"
                       for k in ("ours", "chance", "majority"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write results as indented JSON (parent folders are created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def answer_question_file(questions_path: str | Path, answer_fn: AnswerFn, answers_path: str | Path,
                         batch_size: int = 32, model_id: str = "qtllava") -> int:
    """Answer a question file in the LLaVA evaluation format, like LLaVA's `model_vqa.py`.

    Input: JSONL lines with `question_id` (string or integer, unique), `image` and `text` (strings); other keys
    are passed on to `answer_fn`. A bad line raises ValueError naming the file and line. Output: one JSONL line
    per question, in input order: {"question_id", "prompt" (the question text), "text" (the answer),
    "answer_id" (random), "model_id", "metadata": {}}. Returns the number of answers written.
    """
    qpath = Path(questions_path)
    questions = read_jsonl(qpath, required=("question_id", "image", "text"), str_keys=("image", "text"),
                           unique_key="question_id")
    out = Path(answers_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        for batch, answers in _iter_answers(questions, answer_fn, batch_size, qpath.name):
            for q, a in zip(batch, answers):
                fh.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": a,
                                     "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}},
                                    ensure_ascii=False) + "\n")
                n += 1
            fh.flush()
    log.info("wrote %d answers to %s", n, out)
    return n
