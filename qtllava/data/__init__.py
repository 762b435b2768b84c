"""Data: the offline generator of the synthetic corpora and benchmark suites, the tokenizer, chat templates,
LLaVA-JSON datasets and batching. File formats: docs/formats.md."""

from .errors import DataError
from .generator import GENERATOR_VERSION, SUITE_METRICS, SUITES, make_data, prepare_data, read_manifest, suite_size
from .llava_json import REASONS, EvalQuestions, LlavaDataset, collate, load_answers, load_image, load_meta, \
    load_questions
from .templates import IGNORE_INDEX, TEMPLATES, Template, expand_image_tokens, get_template, register_template
from .tokenizer import IMAGE, SPECIAL_TOKENS, image_token_id, load_tokenizer, resolve_tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "GENERATOR_VERSION",
    "SUITES",
    "SUITE_METRICS",
    "make_data",
    "prepare_data",
    "read_manifest",
    "suite_size",
    "REASONS",
    "LlavaDataset",
    "EvalQuestions",
    "collate",
    "load_image",
    "load_questions",
    "load_answers",
    "load_meta",
    "IGNORE_INDEX",
    "TEMPLATES",
    "Template",
    "expand_image_tokens",
    "get_template",
    "register_template",
    "IMAGE",
    "SPECIAL_TOKENS",
    "image_token_id",
    "load_tokenizer",
    "resolve_tokenizer",
    "train_tokenizer",
]
