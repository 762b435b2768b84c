"""LLaVA-JSON training data, LLaVA evaluation question files, and batching.

Constructors only store their arguments; file I/O happens in ``validate()`` (or the ``load`` classmethods, which
construct and validate). Validation reads the whole file, checks every record (schema, role order, placeholders,
answers, image files, length) and tokenises it once, so a bad record fails fast with a ``DataError`` that names the
file, the record index and its id -- or, with ``skip_bad=True``, is skipped, counted in ``dataset.skipped`` (a
Counter by reason) and reported in one log line.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import DataError
from .templates import IGNORE_INDEX, Template, get_template
from .tokenizer import IMAGE, image_token_id

__all__ = [
    "LlavaDataset",
    "EvalQuestions",
    "collate",
    "load_image",
    "load_questions",
    "load_answers",
    "load_meta",
    "REASONS",
]

log = logging.getLogger(__name__)

REASONS = ("missing_image", "corrupt_image", "image_too_large", "outside_image_folder", "schema",
           "placeholder_mismatch", "empty_answer", "too_long")
# the most pixels an input image may have (width x height), checked from its header before it is decoded: a small
# file can decode to gigabytes (a 20000 x 20000 PNG); LLaVA's images are under 1 M pixels
MAX_IMAGE_PIXELS = 40_000_000


class ImageTooLarge(ValueError):
    """An image's header announces more than MAX_IMAGE_PIXELS pixels."""


def _open_image(path: str | Path) -> Image.Image:
    """Image.open with the size checked from the header first (and PIL's own decompression-bomb error mapped)."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise ImageTooLarge(f"{w} x {h} pixels, more than {MAX_IMAGE_PIXELS}")
    return im


def load_image(path: str | Path, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB image -> bicubic resize to image_size x image_size -> (x/255 - mean)/std as a float32 (3, H, W) tensor.
    Raises ImageTooLarge (a ValueError) for an image of more than MAX_IMAGE_PIXELS pixels, before decoding it."""
    with _open_image(path) as im:
        try:
            return image_to_tensor(im, image_size, mean, std)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(str(e)) from e


def image_to_tensor(img: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The client's preprocessing of a PIL image (see `load_image`)."""
    img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _check_image_file(p: Path) -> str | None:
    """None if the file is a readable image, else the reason."""
    if not p.is_file():
        return "missing_image"
    try:
        with _open_image(p) as im:
            im.verify()
    except ImageTooLarge as e:
        log.debug("image %s too large: %s", p, e)
        return "image_too_large"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # PIL raises all of these
        log.debug("corrupt image %s: %s", p, e)
        return "corrupt_image"
    return None


@dataclass
class _Item:
    id: str
    images: tuple[Path, ...]
    input_ids: np.ndarray  # int64
    labels: np.ndarray | None


class _Base(Dataset):
    """Shared validation bookkeeping."""

    _items: list[_Item] | None

    def __init__(self, path: str | Path, image_folder: str | Path, tokenizer: PreTrainedTokenizerBase,
                 template: str | Template, image_size: int, num_image_tokens: int, max_length: int | None,
                 image_mean: Sequence[float], image_std: Sequence[float], skip_bad: bool,
                 check_images: bool, allow_outside_images: bool = False) -> None:
        self.path = Path(path)
        self.image_folder = Path(image_folder)
        # image paths must resolve inside image_folder ("../" or absolute paths are refused) unless allowed
        self.allow_outside_images = allow_outside_images
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer)
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = max_length
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.skip_bad = skip_bad
        self.check_images = check_images
        self.skipped: Counter[str] = Counter()
        self._items = None

    # --- validation ----------------------------------------------------------------------------------------

    def _err(self, reason: str, detail: str, index: int | None = None, rid: object = None) -> DataError:
        return DataError(self.path, reason, detail, index, rid)

    def _records(self) -> list[Any]:
        raise NotImplementedError

    def _check(self, index: int, rec: Any) -> _Item:
        raise NotImplementedError

    def validate(self):
        """Read and check every record; build the index. Returns self. Raises DataError (see module doc)."""
        records = self._records()
        items: list[_Item] = []
        self.skipped = Counter()
        first: DataError | None = None
        for i, rec in enumerate(records):
            try:
                items.append(self._check(i, rec))
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.skipped[e.reason] += 1
                first = first or e
        if self.skipped:
            log.warning("%s: skipped %d of %d records (%s); first: %s", self.path, sum(self.skipped.values()),
                        len(records), ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())), first)
        self._items = items
        return self

    def _resolve_images(self, index: int, rid: object, rels: list[str]) -> tuple[Path, ...]:
        paths = tuple(self.image_folder / r for r in rels)
        root = os.path.normpath(self.image_folder)
        for rel, p in zip(rels, paths):
            # by the names the record gives (absolute, "../"); links the folder's owner put inside it are followed
            inside = not os.path.isabs(rel) and os.path.normpath(p).startswith(root + os.sep)
            if not self.allow_outside_images and not inside:
                raise self._err("outside_image_folder", f"image {rel[:200]!r} resolves outside the image folder "
                                f"{self.image_folder} (allow_outside_images=True permits it)", index, rid)
            if self.check_images:
                reason = _check_image_file(p)
            else:
                reason = None if p.is_file() else "missing_image"
            if reason:
                raise self._err(reason, f"image {rel!r} ({p})", index, rid)
        return paths

    # --- access --------------------------------------------------------------------------------------------

    @property
    def items(self) -> list[_Item]:
        if self._items is None:
            raise RuntimeError(f"{type(self).__name__} for {self.path} is not validated: call .validate() or use "
                               f"{type(self).__name__}.load(...)")
        return self._items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def lengths(self) -> list[int]:
        """Token length of every sample (image tokens included), e.g. for length-grouped sampling."""
        return [len(it.input_ids) for it in self.items]

    def _pixels(self, index: int, it: _Item) -> torch.Tensor:
        if not it.images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        out = []
        for p in it.images:
            try:
                out.append(load_image(p, self.image_size, self.image_mean, self.image_std))
            except ImageTooLarge as e:
                raise self._err("image_too_large", f"image {p}: {e}", index, it.id) from e
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                raise self._err("corrupt_image", f"image {p}: {e}", index, it.id) from e
        return torch.stack(out)

    def __getitem__(self, index: int) -> dict[str, Any]:
        it = self.items[index]
        out: dict[str, Any] = {"id": it.id, "input_ids": torch.from_numpy(it.input_ids),
                               "pixel_values": self._pixels(index, it)}
        if it.labels is not None:
            out["labels"] = torch.from_numpy(it.labels)
        return out


class LlavaDataset(_Base):
    """A LLaVA-JSON file: a list of ``{"id", "image"?, "conversations": [{"from", "value"}, ...]}`` records.

    ``image`` is a path relative to ``image_folder`` (or a list of them); records without it are text-only. Each
    ``<image>`` in the human turns stands for one image, in order; it is expanded to ``num_image_tokens`` copies
    of the image token id. Samples are truncated to ``max_length`` tokens; a record whose image tokens would be cut,
    or that keeps no answer token, is bad ("too_long").

    ``dataset[i]`` is ``{"id": str, "input_ids": (T,) long, "labels": (T,) long (-100 except answers),
    "pixel_values": (n_images, 3, H, W) float}``.
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path, tokenizer: PreTrainedTokenizerBase,
                 template: str | Template, image_size: int, num_image_tokens: int, max_length: int,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 skip_bad: bool = False, check_images: bool = True, allow_outside_images: bool = False) -> None:
        super().__init__(json_path, image_folder, tokenizer, template, image_size, num_image_tokens, max_length,
                         image_mean, image_std, skip_bad, check_images, allow_outside_images)

    @classmethod
    def load(cls, *args: Any, **kwargs: Any) -> "LlavaDataset":
        """Construct with the same arguments and validate."""
        return cls(*args, **kwargs).validate()

    @classmethod
    def for_config(cls, cfg: Any, json_path: str | Path, image_folder: str | Path, tokenizer: PreTrainedTokenizerBase,
                   template: str | Template, skip_bad: bool = False) -> "LlavaDataset":
        """`load` with the image size, image tokens, normalisation and max length of a qtllava `Config`."""
        v = cfg.vision
        return cls.load(json_path, image_folder, tokenizer, template=template, image_size=v.image_size,
                        num_image_tokens=v.num_image_tokens, max_length=cfg.data.max_length, image_mean=v.image_mean,
                        image_std=v.image_std, skip_bad=skip_bad)

    def _records(self) -> list[Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise self._err("missing_file", "file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise self._err("invalid_json", f"cannot read: {e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise self._err("invalid_json", f"not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise self._err("invalid_json", f"expected a JSON list of records, got {type(data).__name__}")
        return data

    def _check(self, index: int, rec: Any) -> _Item:
        rid = rec.get("id") if isinstance(rec, dict) else None

        def bad(reason: str, detail: str) -> DataError:
            return self._err(reason, detail, index, rid)

        if not isinstance(rec, dict):
            raise bad("schema", f"record is a {type(rec).__name__}, not an object")
        if "id" not in rec or not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise bad("schema", "missing or non-string 'id'")
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise bad("schema", "missing or empty 'conversations' list")
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise bad("schema", f"turn {t} needs 'from' and 'value'")
            if not isinstance(turn["from"], str) or not isinstance(turn["value"], str):
                raise bad("schema", f"turn {t}: 'from' and 'value' must be strings")
            want = "human" if t % 2 == 0 else "gpt"
            if turn["from"] != want:
                raise bad("schema", f"turn {t} is from {turn['from']!r}, expected {want!r} (human/gpt alternate, "
                                    f"starting with human)")
        if len(conv) % 2:
            raise bad("schema", "conversation ends with a human turn (no answer)")
        image = rec.get("image")
        if image is None:
            rels: list[str] = []
        elif isinstance(image, str) and image:
            rels = [image]
        elif isinstance(image, list) and image and all(isinstance(x, str) and x for x in image):
            rels = list(image)
        else:
            raise bad("schema", "'image' must be a non-empty string or a list of them")
        n_ph = sum(turn["value"].count(IMAGE) for turn in conv[0::2])
        if any(IMAGE in turn["value"] for turn in conv[1::2]):
            raise bad("placeholder_mismatch", f"{IMAGE} in an answer")
        if n_ph != len(rels):
            raise bad("placeholder_mismatch", f"{n_ph} {IMAGE} placeholder(s) for {len(rels)} image(s)")
        for t, turn in enumerate(conv[1::2]):
            if not turn["value"].strip():
                raise bad("empty_answer", f"answer {t} (turn {2 * t + 1}) is empty")
        paths = self._resolve_images(index, rid, rels)
        ids, labels = self.template.encode(conv, self.tokenizer, self.num_image_tokens)
        ids, labels = self._truncate(ids, labels, bad)
        return _Item(str(rid), paths, np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64))

    def _truncate(self, ids: list[int], labels: list[int], bad) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(ids) <= self.max_length:
            if all(lab == IGNORE_INDEX for lab in labels):
                raise bad("too_long", "no answer tokens")
            return ids, labels
        img = image_token_id(self.tokenizer)
        last_img = max((i for i, t in enumerate(ids) if t == img), default=-1)
        if last_img >= self.max_length:
            raise bad("too_long", f"{len(ids)} tokens; the image tokens end at {last_img + 1} > max_length "
                                  f"{self.max_length}")
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise bad("too_long", f"no answer token within max_length {self.max_length}")
        return ids, labels


# --- evaluation question files -----------------------------------------------------------------------------


def _questions_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "questions.jsonl" if p.is_dir() else p


def _read_jsonl(p: Path) -> list[Any]:
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(p, "missing_file", "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(p, "invalid_json", f"cannot read: {e}") from e
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(p, "invalid_json", f"line {i + 1} is not valid JSON: {e}") from e
    return out


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """Lines of a LLaVA eval question file (or `<suite_dir>/questions.jsonl`): dicts with question_id, text and
    optionally image and category. Raises DataError on invalid JSON or a line without question_id / text."""
    p = _questions_file(path)
    rows = _read_jsonl(p)
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("text"), str):
            raise DataError(p, "schema", "needs 'question_id' and a string 'text'", i,
                            r.get("question_id") if isinstance(r, dict) else None)
    return rows


def load_answers(suite_dir: str | Path) -> dict[Any, dict[str, Any]]:
    """Ground truth of a generated suite: question_id -> answers.jsonl record."""
    p = Path(suite_dir) / "answers.jsonl"
    return {r["question_id"]: r for r in _read_jsonl(p)}


def load_meta(suite_dir: str | Path) -> dict[str, Any]:
    p = Path(suite_dir) / "meta.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(p, "missing_file", "file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(p, "invalid_json", str(e)) from e


class EvalQuestions(_Base):
    """A LLaVA eval question file as generation prompts: the chat template with one human turn (the question;
    ``<image>\\n`` is put in front when the line has an image and the text has no placeholder, as LLaVA's
    ``model_vqa`` does) and an open assistant turn. No labels; collate with ``padding_side="left"``.

    ``dataset[i]`` is ``{"id": question_id, "input_ids", "pixel_values", "text", "category"}``."""

    def __init__(self, questions: str | Path, image_folder: str | Path, tokenizer: PreTrainedTokenizerBase,
                 template: str | Template, image_size: int, num_image_tokens: int,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 max_length: int | None = None, skip_bad: bool = False, check_images: bool = True,
                 allow_outside_images: bool = False) -> None:
        super().__init__(_questions_file(questions), image_folder, tokenizer, template, image_size,
                         num_image_tokens, max_length, image_mean, image_std, skip_bad, check_images,
                         allow_outside_images)
        self._meta: list[dict[str, Any]] = []

    @classmethod
    def load(cls, *args: Any, **kwargs: Any) -> "EvalQuestions":
        return cls(*args, **kwargs).validate()

    def _records(self) -> list[Any]:
        return _read_jsonl(self.path)

    def validate(self):
        self._meta = []
        super().validate()
        return self

    def _check(self, index: int, rec: Any) -> _Item:
        qid = rec.get("question_id") if isinstance(rec, dict) else None

        def bad(reason: str, detail: str) -> DataError:
            return self._err(reason, f"line {index + 1}: {detail}", index, qid)

        if not isinstance(rec, dict) or "question_id" not in rec or not isinstance(rec.get("text"), str):
            raise bad("schema", "needs 'question_id' and a string 'text'")
        image = rec.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise bad("schema", "'image' must be a non-empty string")
        text = rec["text"]
        if image and IMAGE not in text:
            text = f"{IMAGE}\n{text}"
        if text.count(IMAGE) != (1 if image else 0):
            raise bad("placeholder_mismatch", f"{text.count(IMAGE)} {IMAGE} placeholder(s) for "
                                              f"{1 if image else 0} image(s)")
        paths = self._resolve_images(index, qid, [image] if image else [])
        ids = self.template.encode_prompt([{"from": "human", "value": text}], self.tokenizer, self.num_image_tokens)
        if self.max_length is not None and len(ids) > self.max_length:
            raise bad("too_long", f"prompt has {len(ids)} tokens > max_length {self.max_length}")
        self._meta.append({"text": rec["text"], "category": rec.get("category", "")})
        return _Item(qid, paths, np.asarray(ids, dtype=np.int64), None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = super().__getitem__(index)
        out.update(self._meta[index])
        return out


# --- batching ----------------------------------------------------------------------------------------------


def collate(samples: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad a list of samples into a batch.

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels`` (B, T) long with -100 at pads
    (only when every sample has labels), ``pixel_values`` (n_images, 3, H, W) float with the images in sample
    order (samples without images contribute none), and ``ids`` (list). Use padding_side="left" for generation."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    B = len(samples)
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    with_labels = all("labels" in s for s in samples)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, sl] = s["input_ids"]
        attention[b, sl] = 1
        if labels is not None:
            labels[b, sl] = s["labels"]
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
    if labels is not None:
        out["labels"] = labels
    out["pixel_values"] = torch.cat([s["pixel_values"] for s in samples], dim=0)
    out["ids"] = [s["id"] for s in samples]
    return out
