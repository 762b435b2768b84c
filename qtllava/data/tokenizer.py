"""Tokenizers: train one offline on the generated corpus, or load a real LLM's tokenizer from a local folder.

The trained tokenizer is a byte-level BPE (GPT-2 / Qwen2 pre-tokenisation, so text round-trips exactly, newlines
included) whose merges are learned until the vocabulary budget is used up. The generated corpus is small and
word-like (a few hundred distinct words), so with the presets' budgets almost every word ends up as one token:
sequences are as short as with a word-level model, but an unseen word still splits into known pieces instead of
becoming ``<unk>``. Only characters never seen in training (outside printable ASCII) map to ``<unk>``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .errors import DataError

__all__ = [
    "PAD",
    "UNK",
    "EOS",
    "IM_START",
    "IM_END",
    "IMAGE",
    "SPECIAL_TOKENS",
    "train_tokenizer",
    "load_tokenizer",
    "resolve_tokenizer",
    "tokenizer_folder",
    "image_token_id",
]

log = logging.getLogger(__name__)

PAD = "<pad>"
UNK = "<unk>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE = "<image>"
SPECIAL_TOKENS = (PAD, UNK, EOS, IM_START, IM_END, IMAGE)  # ids 0..5 in this order

# printable ASCII, plus space and newline in GPT-2's byte-to-unicode spelling
_ALPHABET = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` with `vocab_size` entries at most (special tokens included).

    Deterministic for the same texts. With `out_dir`, saves there (`tokenizer.json` + `tokenizer_config.json`)."""
    if vocab_size < len(SPECIAL_TOKENS) + len(_ALPHABET) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: at least {len(SPECIAL_TOKENS) + len(_ALPHABET) + 1}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=_ALPHABET, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = _wrap(tok)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    """Id of the `<image>` placeholder token (raises DataError if the tokenizer lacks it)."""
    tid = getattr(tok, "image_token_id", None)
    if isinstance(tid, int) and tid >= 0:
        return tid
    tid = tok.convert_tokens_to_ids(IMAGE)
    if not isinstance(tid, int) or tid < 0 or tid == tok.unk_token_id:
        raise DataError(getattr(tok, "name_or_path", "tokenizer"), "schema", f"tokenizer has no {IMAGE} token")
    return tid


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder without network access.

    The folder may be one written by :func:`train_tokenizer` or a real LLM's (e.g. Qwen2); `<image>` is added as a
    special token when missing (the model's embedding table must then be resized to ``len(tokenizer)``), and a pad
    token is set (to eos) when the tokenizer has none. Raises DataError if the folder holds no tokenizer."""
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise DataError(path, "missing_tokenizer", "no tokenizer.json or tokenizer_config.json in this folder")
    if (path / "tokenizer.json").exists() and _is_ours(path):
        tok: PreTrainedTokenizerBase = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.convert_tokens_to_ids(IMAGE) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
        log.info("added %s to the tokenizer in %s (now %d tokens)", IMAGE, path, len(tok))
    if getattr(tok, "image_token", None) is None:
        try:
            tok.image_token = IMAGE  # transformers 5 model-specific special token attribute
        except (AttributeError, ValueError, TypeError):  # pragma: no cover - older/other tokenizer classes
            pass
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _is_ours(path: Path) -> bool:
    try:
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
    except OSError:
        return False
    return all(s in text for s in SPECIAL_TOKENS)


def tokenizer_folder(cfg: object, root: str | Path | None = None) -> Path:
    """The tokenizer folder a qtllava Config (or a bare DataConfig) selects: `llm.pretrained` (a pretrained LLM
    brings its own), else `data.tokenizer`, else `<root or data.root>/tokenizer` (the one trained with the generated
    data). Raises ValueError when `data.tokenizer` names another folder than `llm.pretrained`."""
    data = getattr(cfg, "data", cfg)
    pretrained, named = getattr(getattr(cfg, "llm", None), "pretrained", ""), data.tokenizer
    if pretrained:
        if named and Path(named).resolve() != Path(pretrained).resolve():
            raise ValueError(f"data.tokenizer ({named!r}) differs from llm.pretrained ({pretrained!r}): a pretrained "
                             "LLM's tokenizer comes from its own folder; leave data.tokenizer empty")
        return Path(pretrained)
    if named:
        return Path(named)
    return Path(root if root is not None else data.root) / "tokenizer"


def resolve_tokenizer(cfg: object, root: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer a qtllava Config selects (see `tokenizer_folder`), loaded without network access."""
    return load_tokenizer(tokenizer_folder(cfg, root))
