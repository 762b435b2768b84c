"""Evaluation: benchmark metrics (VQA soft accuracy, POPE, MME acc/acc+, option letters), suite scoring with
chance and majority baselines, and model-agnostic runners (`evaluate`, `answer_question_file`)."""

from .jsonl import JsonlError, read_jsonl
from .metrics import (
    mme_scores,
    mme_yes_no,
    normalize_answer,
    parse_choice,
    pope_scores,
    pope_yes_no,
    vqa_soft_accuracy,
)
from .runner import answer_batches, answer_question_file, evaluate, format_table, write_results
from .suites import METRICS, SUITES, baselines, load_suite, majority_answers, score_suite

__all__ = [
    "normalize_answer",
    "vqa_soft_accuracy",
    "pope_yes_no",
    "pope_scores",
    "mme_yes_no",
    "mme_scores",
    "parse_choice",
    "SUITES",
    "METRICS",
    "load_suite",
    "score_suite",
    "baselines",
    "majority_answers",
    "evaluate",
    "answer_batches",
    "format_table",
    "write_results",
    "answer_question_file",
    "read_jsonl",
    "JsonlError",
]
