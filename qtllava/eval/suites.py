"""Scoring of the five benchmark suites (docs/formats.md) and their chance / majority-answer baselines.

| suite        | headline (`METRICS`)                  | details                                        |
| ------------ | ------------------------------------- | ---------------------------------------------- |
| `soc-vqa`    | VQA soft accuracy, %                  | `relational`, `non-relational`, per type        |
| `soc-mc`     | option-letter accuracy, %             | unparsed answers, per type                      |
| `glyph-vqa`  | VQA soft accuracy, %                  | per type                                        |
| `shape-pope` | mean F1 over the splits, %            | accuracy, precision, recall, F1, yes-ratio (%)  |
|              |                                       | and the confusion counts per split              |
| `shape-mme`  | summed MME score over the subtasks    | acc, acc+ (%) and score (max 200) per subtask   |

A suite is scored on the questions that have a prediction (so a `limit`ed run scores its subset; `details`
records `n` and `n_total`). Question ids are matched as strings, so 3 and "3" are the same question.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtllava.data.generator import SUITES

from .jsonl import read_jsonl
from .metrics import (
    OPTION_LETTERS,
    mme_scores,
    mme_yes_no,
    parse_choice,
    pope_scores,
    pope_yes_no,
    vqa_soft_accuracy,
)

__all__ = ["SUITES", "METRICS", "SuiteData", "load_suite", "score_suite", "baselines", "majority_answers"]

log = logging.getLogger(__name__)


# Name of each suite's headline number. All are percentages except shape-mme (sum of 0..200 per subtask).
METRICS: dict[str, str] = {
    "soc-vqa": "vqa_acc_%",
    "soc-mc": "mc_acc_%",
    "glyph-vqa": "vqa_acc_%",
    "shape-pope": "mean_f1_%",
    "shape-mme": "mme_score_sum",
}

_POPE_SPLITS = ("random", "popular", "adversarial")
_MME_SUBTASKS = ("existence", "count", "position", "color")
_SOC_CATEGORIES = ("relational", "non-relational")

_REQUIRED = ("question_id", "type", "answer")
_EXTRA_REQUIRED = {
    "soc-vqa": ("category",),
    "soc-mc": ("choices",),
    "glyph-vqa": (),
    "shape-pope": ("split",),
    "shape-mme": ("subtask", "image_id"),
}


@dataclass
class SuiteData:
    """One suite folder: its name, meta.json and answers.jsonl records (file order), keyed by str(question_id)."""

    name: str
    path: Path
    meta: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def by_id(self) -> dict[str, dict[str, Any]]:
        return {str(r["question_id"]): r for r in self.records}

    def answer_space(self, qtype: str) -> list[str]:
        """Candidate answers of a question type: meta's `answer_space[qtype]`, else (with a warning) the distinct
        canonical answers of that type in this suite."""
        space = (self.meta.get("answer_space") or {}).get(qtype)
        if space:
            return [str(a) for a in space]
        seen = sorted({str(r["answer"]) for r in self.records if r["type"] == qtype})
        if not seen:
            raise ValueError(f"{self.path}: no answer space for question type {qtype!r}")
        log.warning("%s: meta.json has no answer_space[%r]; using the suite's own answers %s", self.path, qtype, seen)
        return seen


def load_suite(suite_dir: str | Path) -> SuiteData:
    """Read `meta.json` and `answers.jsonl` of a suite folder; the suite is meta's `suite`, else the folder name."""
    d = Path(suite_dir)
    meta_path = d / "meta.json"
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: invalid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object")
    name = str(meta.get("suite") or d.name)
    if name not in SUITES:
        raise ValueError(f"{d}: unknown suite {name!r}; known: {', '.join(SUITES)}")
    records = read_jsonl(d / "answers.jsonl", required=_REQUIRED + _EXTRA_REQUIRED[name],
                         str_keys=("type", "answer"), unique_key="question_id")
    if not records:
        raise ValueError(f"{d / 'answers.jsonl'}: no questions")
    return SuiteData(name=name, path=d, meta=meta, records=records)


# --- per-suite scoring (records and predictions already aligned) ----------------------------------------------


def _gt_answers(rec: Mapping[str, Any]) -> list[str]:
    answers = rec.get("answers")
    if not answers:
        return [rec["answer"]]
    return [str(a) for a in answers]


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _per_type(records: Sequence[Mapping[str, Any]], scores: Sequence[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r, s in zip(records, scores):
        groups[r["type"]].append(s)
    return {t: 100.0 * float(np.mean(v)) for t, v in groups.items()}


def _ordered(keys: Iterable[str], preferred: Sequence[str]) -> list[str]:
    keys = set(keys)
    return [k for k in preferred if k in keys] + sorted(keys - set(preferred))


def _pope_label(rec: Mapping[str, Any]) -> str:
    return str(rec.get("label", rec["answer"]))


def _score_vqa(name: str, records: Sequence[Mapping[str, Any]], preds: Sequence[str]) -> tuple[float, dict]:
    scores = [vqa_soft_accuracy(p, _gt_answers(r)) for r, p in zip(records, preds)]
    details: dict[str, Any] = {"accuracy": 100.0 * float(np.mean(scores))}
    if name == "soc-vqa":
        for cat in _SOC_CATEGORIES:
            details[cat] = _pct(_mean([s for r, s in zip(records, scores) if r["category"] == cat]))
    details["per_type"] = _per_type(records, scores)
    return details["accuracy"], details


def _score_mc(records: Sequence[Mapping[str, Any]], preds: Sequence[str]) -> tuple[float, dict]:
    """Letter accuracy under ScienceQA's official parse (the headline), and under a lenient parse beside it."""
    scores, lenient, unparsed = [], [], 0
    for r, p in zip(records, preds):
        n = min(max(len(r["choices"]), 1), len(OPTION_LETTERS))
        truth = str(r["answer"]).strip().upper()
        letter = parse_choice(p, n)
        unparsed += letter is None
        scores.append(float(letter is not None and letter == truth))
        loose = parse_choice(p, n, lenient=True)
        lenient.append(float(loose is not None and loose == truth))
    acc = 100.0 * float(np.mean(scores))
    return acc, {"accuracy": acc, "unparsed": unparsed, "lenient_accuracy": 100.0 * float(np.mean(lenient)),
                 "per_type": _per_type(records, scores)}


def _score_pope(records: Sequence[Mapping[str, Any]], preds: Sequence[str]) -> tuple[float, dict]:
    groups: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for r, p in zip(records, preds):
        g = groups[str(r["split"])]
        g[0].append(p)
        g[1].append(_pope_label(r))
    splits = {}
    for s in _ordered(groups, _POPE_SPLITS):
        m = pope_scores(*groups[s])
        splits[s] = {k: (100.0 * v if k in ("accuracy", "precision", "recall", "f1", "yes_ratio") else v)
                     for k, v in m.items()}
    mean_f1 = float(np.mean([v["f1"] for v in splits.values()]))
    return mean_f1, {"mean_f1": mean_f1, "splits": splits}


def _score_mme(records: Sequence[Mapping[str, Any]], preds: Sequence[str]) -> tuple[float, dict]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r, p in zip(records, preds):
        groups[str(r["subtask"])].append({"image_id": r["image_id"], "prediction": p, "label": _pope_label(r)})
    subtasks = {}
    for s in _ordered(groups, _MME_SUBTASKS):
        m = mme_scores(groups[s])
        subtasks[s] = {"acc": 100.0 * m["acc"], "acc_plus": 100.0 * m["acc_plus"], "score": m["score"]}
    total = float(sum(v["score"] for v in subtasks.values()))
    return total, {"score_sum": total, "max": 200.0 * len(subtasks), "subtasks": subtasks}


def _score(name: str, records: Sequence[Mapping[str, Any]], preds: Sequence[str]) -> tuple[float, dict]:
    if name in ("soc-vqa", "glyph-vqa"):
        return _score_vqa(name, records, preds)
    if name == "soc-mc":
        return _score_mc(records, preds)
    if name == "shape-pope":
        return _score_pope(records, preds)
    if name == "shape-mme":
        return _score_mme(records, preds)
    raise ValueError(f"unknown suite {name!r}")


def _select(suite: SuiteData, question_ids: Iterable[Any] | None) -> list[dict[str, Any]]:
    if question_ids is None:
        return list(suite.records)
    wanted = {str(q) for q in question_ids}
    known = suite.by_id
    unknown = sorted(wanted - known.keys())
    if unknown:
        raise ValueError(f"{suite.path}: {len(unknown)} question id(s) not in answers.jsonl, e.g. "
                         f"{', '.join(unknown[:5])}")
    selected = [r for r in suite.records if str(r["question_id"]) in wanted]
    if not selected:
        raise ValueError(f"{suite.path}: no questions selected")
    return selected


def score_suite(suite_dir: str | Path, predictions: Mapping[Any, str]) -> dict[str, Any]:
    """Score predictions (question_id -> free-text answer) against a suite folder's `answers.jsonl`.

    Returns {"suite", "metric", "headline", "details"}; `details` always has `n` (questions scored) and `n_total`.
    Only the questions present in `predictions` are scored (a warning is logged when that is not all of them);
    an id that is not in the suite raises ValueError.
    """
    suite = load_suite(suite_dir)
    for qid, p in predictions.items():
        if not isinstance(p, str):
            raise TypeError(f"{suite.path}: prediction for question {qid!r} is {type(p).__name__}, not str")
    records = _select(suite, predictions.keys())
    preds_by_str = {str(k): v for k, v in predictions.items()}
    preds = [preds_by_str[str(r["question_id"])] for r in records]
    if len(records) < len(suite.records):
        log.warning("%s: scoring %d of %d questions", suite.name, len(records), len(suite.records))
    headline, details = _score(suite.name, records, preds)
    details = {"n": len(records), "n_total": len(suite.records), **details}
    return {"suite": suite.name, "metric": METRICS[suite.name], "headline": headline, "details": details}


# --- baselines --------------------------------------------------------------------------------------------------


def majority_answers(suite: SuiteData) -> dict[str, str]:
    """Most frequent canonical `answer` per question type, counted over the whole suite's answers.jsonl.

    Ties go to the answer listed first in meta's `answer_space[type]`, else to the alphabetically first.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in suite.records:
        counts[r["type"]][str(r["answer"])] += 1
    out = {}
    for qtype, c in counts.items():
        space = (suite.meta.get("answer_space") or {}).get(qtype) or []
        rank = {str(a): i for i, a in enumerate(space)}
        out[qtype] = min(c, key=lambda a: (-c[a], rank.get(a, len(rank)), a))
    return out


def _poisson_binomial(ps: Sequence[float]) -> np.ndarray:
    """pmf of the number of successes of independent Bernoulli(p_i) trials."""
    pmf = np.zeros(len(ps) + 1)
    pmf[0] = 1.0
    for i, p in enumerate(ps):
        pmf[1:i + 2] = pmf[1:i + 2] * (1.0 - p) + pmf[0:i + 1] * p
        pmf[0] *= 1.0 - p
    return pmf


def _pope_expected_f1(p_yes_pos: Sequence[float], p_yes_neg: Sequence[float]) -> float:
    """Exact E[F1] (as pope_scores computes it) when each question independently says yes with its p_yes."""
    n_pos = len(p_yes_pos)
    tp = _poisson_binomial(p_yes_pos)
    fp = _poisson_binomial(p_yes_neg)
    t = np.arange(n_pos + 1)[:, None].astype(float)
    f = np.arange(len(p_yes_neg) + 1)[None, :].astype(float)
    denom = t + f + n_pos  # F1 = 2PR/(P+R) = 2TP / (TP + FP + #positives), and 0 when TP = 0
    f1 = np.where(t > 0, 2.0 * t / np.maximum(denom, 1.0), 0.0)
    return float(tp @ f1 @ fp)


def _chance(suite: SuiteData, records: Sequence[Mapping[str, Any]]) -> float:
    name = suite.name
    if name in ("soc-vqa", "glyph-vqa"):
        per_q = []
        for r in records:
            space = suite.answer_space(r["type"])
            gts = _gt_answers(r)
            per_q.append(float(np.mean([vqa_soft_accuracy(c, gts) for c in space])))
        return 100.0 * float(np.mean(per_q))
    if name == "soc-mc":
        # Uniform over the question's own options (the usual multiple-choice chance; the number of options
        # varies per question, so a type-wide answer space would not describe it).
        return 100.0 * float(np.mean([1.0 / max(len(r["choices"]), 1) for r in records]))
    if name == "shape-pope":
        groups: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for r in records:
            space = suite.answer_space(r["type"])
            p_yes = sum(pope_yes_no(c) == "yes" for c in space) / len(space)
            groups[str(r["split"])][0 if _pope_label(r).strip().lower() == "yes" else 1].append(p_yes)
        return 100.0 * float(np.mean([_pope_expected_f1(pos, neg) for pos, neg in groups.values()]))
    if name == "shape-mme":
        total = 0.0
        by_sub: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            space = suite.answer_space(r["type"])
            label = _pope_label(r).strip().lower()
            by_sub[str(r["subtask"])][r["image_id"]].append(
                sum(mme_yes_no(c) == label for c in space) / len(space))
        for images in by_sub.values():
            ps = [p for v in images.values() for p in v]
            acc = float(np.mean(ps))
            acc_plus = float(np.mean([np.prod(v) for v in images.values()]))
            total += 100.0 * (acc + acc_plus)
        return total
    raise ValueError(f"unknown suite {name!r}")


def baselines(suite_dir: str | Path, question_ids: Iterable[Any] | None = None) -> dict[str, float]:
    """Chance and majority-answer scores of a suite, in the unit of its headline metric.

    chance: the exact expected score of answering each question uniformly at random from
    `answer_space[type]` (meta.json), independently per question; for soc-mc, uniformly among the question's own
    option letters. VQA accuracy, letter accuracy and MME acc/acc+ are computed in closed form; POPE's F1 from the
    exact (Poisson-binomial) distribution of true and false positives.

    majority: the score of always answering the most frequent canonical answer of the question's type, where
    "most frequent" is counted over this suite's own answers.jsonl (`majority_answers`). This is an optimistic
    "prior" baseline: it knows the test set's answer distribution, which no model is told.

    question_ids: score only these questions (the majority answers still come from the whole suite).
    """
    suite = load_suite(suite_dir)
    records = _select(suite, question_ids)
    majority = majority_answers(suite)
    maj_head, _ = _score(suite.name, records, [majority[r["type"]] for r in records])
    return {"chance": _chance(suite, records), "majority": maj_head}
