"""Offline, deterministic generator of the training corpora, the five benchmark suites and the tokenizer.

``make_data(cfg, image_size)`` writes everything described in docs/formats.md under ``cfg.root`` (or ``root``).
All randomness comes from numpy Generators seeded from ``cfg.seed`` with one independent stream per split; on top
of that, a scene whose signature (content at grid-cell resolution, see ``world.Scene.signature``) already occurs in
another split group (training = captions + instruct_train; validation; each suite) is rejected and redrawn, so
benchmark scenes never repeat training scenes. ``manifest.json`` (written last) makes a second call with the same
settings return at once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import questions as Q
from .templates import get_template
from .errors import DataError
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from .world import Layout, Scene, sample_glyph, sample_shape, sample_soc, render

__all__ = ["GENERATOR_VERSION", "SUITES", "SUITE_METRICS", "make_data", "read_manifest", "suite_size", "TEXT_BUDGET",
           "estimate_tokens"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # 2: captions list objects by colour (questions.caption_order); 3: more multiple-choice turns
SUITES = ("soc-vqa", "soc-mc", "glyph-vqa", "shape-pope", "shape-mme")
SUITE_METRICS = {"soc-vqa": "vqa_accuracy", "soc-mc": "mc_accuracy", "glyph-vqa": "vqa_accuracy",
                 "shape-pope": "pope", "shape-mme": "mme"}
QUESTIONS_PER_IMAGE = {"soc-vqa": 2, "soc-mc": 1, "glyph-vqa": 1, "shape-pope": 6, "shape-mme": 8}
# Text tokens (under the data's chat template, the `<image>` placeholder counted as one token) an instruction
# conversation may use: max_length - image tokens of the micro preset (96 - 16); the tiny preset has 160 - 64 = 96.
# Turns are picked by an estimate (TEXT_BUDGET - 4, with ChatML's overhead per turn, the largest of the templates),
# then trailing turns dropped while the trained tokenizer says too long.
TEXT_BUDGET = 80
_CHATML_TURN_OVERHEAD = 10
_STREAMS = {"captions": 1, "instruct_train": 2, "instruct_val": 3, "lookup": 4, "lookup_val": 5,
            **{s: 10 + i for i, s in enumerate(SUITES)}}
_GROUP = {"captions": "train", "instruct_train": "train", "instruct_val": "val", **{s: s for s in SUITES}}
_PREFIX = {"captions": "cap", "instruct_train": "ins", "instruct_val": "val", **{s: s for s in SUITES}}
_MAX_TRIES = 10000
# scene mixes: (soc, glyph, shape)
_CAPTION_MIX = (0.4, 0.2, 0.4)
_INSTRUCT_MIX = (0.45, 0.2, 0.35)
_P_CAPTION_TURN = 0.3
_WORLD_WORD_WEIGHT = 20
# Multiple-choice turns: the letter is a second look-up (which option holds my answer) that the from-scratch decoder
# learns late (docs/experiments.md); at 0.3 they were 8 % of the turns and soc-mc stayed below its majority. With
# probability _P_MC_PAIRED, where both fit the text budget (about a fifth of them on the tiny data), the same question
# comes first in free form, so the letter look-up is also seen with the answer in the text.
_P_MC_LEAD = 0.7
_P_MC_PAIRED = 0.5
_LOOKUP_TURNS = 4  # turns per option look-up record (data.lookup_records), as max_length allows
_WRITERS = 2  # threads that render, encode and write PNGs (Pillow and file I/O release the GIL)

_TOKEN_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


def estimate_tokens(text: str) -> int:
    """Pre-token count of `text` under GPT-2-style splitting (what the trained tokenizer gives for known words)."""
    return len(_TOKEN_RE.findall(text.replace("<image>", "#")))


def _gen_settings(cfg: Any, image_size: int) -> dict[str, Any]:
    return {"seed": int(cfg.seed), "n_caption": int(cfg.n_caption), "n_instruct": int(cfg.n_instruct),
            "n_val": int(cfg.n_val), "n_per_suite": int(cfg.n_per_suite), "vocab_size": int(cfg.vocab_size),
            "image_size": int(image_size),
            # knobs added later enter only when set, so that data made before they existed stays valid
            **({"mc_fraction": float(cfg.mc_fraction)} if cfg.mc_fraction else {}),
            **({"mc_max_options": int(cfg.mc_max_options)} if cfg.mc_max_options != 5 else {}),
            **({"lookup_records": int(cfg.lookup_records)} if cfg.lookup_records else {}),
            **({"template": str(cfg.template)} if cfg.template != "qwen2" else {})}


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of a data root, or None when there is none (or it is unreadable)."""
    p = Path(root) / "manifest.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_valid(root: Path, settings: dict[str, Any]) -> bool:
    """True when `root` holds the data of `settings` as generated; False when it holds other settings (or none).
    Raises DataError when it holds these settings but its files were changed since (a hand edit is never
    overwritten silently)."""
    man = read_manifest(root)
    if not man or man.get("generator_version") != GENERATOR_VERSION or man.get("settings") != settings:
        return False
    for rel, digest in man.get("files", {}).items():
        p = root / rel
        if not p.is_file() or _sha256(p) != digest:
            raise _edited(root, rel, "missing" if not p.is_file() else "changed")
    for split, count in man.get("images", {}).get("per_split", {}).items():
        d = root / "images" / split
        found = sum(1 for e in d.iterdir() if e.suffix == ".png") if d.is_dir() else 0
        if found != count:
            raise _edited(root, f"images/{split}", f"{found} images where {count} were generated")
    return True


def _edited(root: Path, rel: str, what: str) -> DataError:
    return DataError(root / rel, "edited_data", f"{what} since the data was generated (manifest.json); qtllava "
                     "does not overwrite hand edits: restore the file, or regenerate everything with `qtllava data "
                     f"make --force` (or choose another data root)")


_OUTPUTS = ("manifest.json", "captions.json", "instruct_train.json", "instruct_val.json", "scenes.jsonl",
            "images", "suites", "tokenizer")


_MARKER = ".qtllava-data"  # written first: marks a folder as the generator's, so clearing it is safe


def _clear(root: Path) -> None:
    """Remove what a previous run wrote (only the generator's own names; other files in root are kept).

    Refuses (ValueError) to touch a folder that holds such names but was not written by the generator."""
    ours = (root / _MARKER).exists() or (root / "manifest.json").exists()
    found = [n for n in _OUTPUTS if (root / n).exists()]
    if found and not ours:
        raise ValueError(f"{root} holds {', '.join(found)} but was not written by the data generator; "
                         f"refusing to overwrite (choose another data root)")
    for name in _OUTPUTS:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _dump_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@dataclass
class _Ctx:
    root: Path
    lay: Layout
    seed: int
    seen: dict[str, str]  # scene signature -> group
    pool: ThreadPoolExecutor
    per_split: dict[str, int] = field(default_factory=dict)
    scenes: list[dict[str, Any]] = field(default_factory=list)
    pending: list[tuple[str, Future]] = field(default_factory=list)

    def rng(self, split: str) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(entropy=self.seed, spawn_key=(_STREAMS[split],)))

    def draw(self, split: str, rng: np.random.Generator,
             make: Callable[[np.random.Generator], tuple[Scene, Any] | None]) -> tuple[Scene, Any]:
        """Draw (scene, payload) with `make` until it succeeds and the scene is new to the other split groups."""
        group = _GROUP[split]
        for _ in range(_MAX_TRIES):
            out = make(rng)
            if out is None:
                continue
            sig = out[0].signature()
            owner = self.seen.get(sig)
            if owner is not None and owner != group:
                continue
            self.seen[sig] = group
            return out
        raise RuntimeError(f"could not draw a new scene for split {split!r} in {_MAX_TRIES} tries")

    def save(self, split: str, index: int, scene: Scene) -> tuple[str, str]:
        """Queue rendering and writing of the PNG (on a thread pool); returns (image id, path relative to images/).

        Scenes are drawn on the calling thread, so the output does not depend on thread scheduling."""
        image_id = f"{_PREFIX[split]}-{index:06d}"
        rel = f"{split}/{image_id}.png"
        self.pending.append((rel, self.pool.submit(_write_png, scene, self.lay, self.root / "images" / rel)))
        self.per_split[split] = self.per_split.get(split, 0) + 1
        self.scenes.append({"image": rel, "group": _GROUP[split], "kind": scene.kind,
                            "signature": scene.signature(), "content": scene.describe()})
        return image_id, rel

    def finish(self) -> str:
        """Wait for every queued image; returns the combined sha256 of all images (in generation order)."""
        h = hashlib.sha256()
        for rel, fut in self.pending:
            h.update(rel.encode() + b"\0" + fut.result())
        self.pending.clear()
        return h.hexdigest()


def _write_png(scene: Scene, lay: Layout, path: Path) -> bytes:
    buf = io.BytesIO()
    render(scene, lay).save(buf, format="PNG")
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).digest()


def _pick_kind(rng: np.random.Generator, mix: tuple[float, float, float]) -> str:
    return ("soc", "glyph", "shape")[int(rng.choice(3, p=np.asarray(mix)))]


def _sample(kind: str, rng: np.random.Generator, lay: Layout) -> Scene:
    if kind == "soc":
        return sample_soc(rng, lay)
    if kind == "glyph":
        return sample_glyph(rng, lay)
    return sample_shape(rng, lay)


# --- training corpora -------------------------------------------------------------------------------------


def _caption_record(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    prompt = Q.CAPTION_PROMPTS[int(rng.integers(0, len(Q.CAPTION_PROMPTS)))]
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": Q.caption(scene)}]


def _turn_pool(scene: Scene, rng: np.random.Generator, mc_fraction: float = 0.0,
               mc_max_options: int = 5) -> list[tuple[str, str]]:
    """Candidate (prompt, answer) turns covering every suite question type of the scene's kind; each question in its
    multiple-choice form (at most `mc_max_options` options) with probability `mc_fraction`."""
    pool: list[Q.QA | None] = []
    if scene.kind == "soc":
        for t in Q.SOC_NONREL + Q.SOC_REL:
            pool.append(Q.soc_question(scene, t, rng))
        pool.append(Q.soc_question(scene, ("closest_color", "furthest_color")[int(rng.integers(0, 2))], rng))
        pool.append(Q.soc_mc_question(scene, Q.SOC_MC_TYPES[int(rng.integers(0, len(Q.SOC_MC_TYPES)))], rng,
                                      mc_max_options))
    elif scene.kind == "glyph":
        for i in range(len(scene.words)):
            pool.append(Q.glyph_question(scene, i))
            pool.append(Q.glyph_color_question(scene, i))
    else:
        pope = Q.pope_questions(scene, Q.POPE_SPLITS[int(rng.integers(0, 3))], rng)
        if pope:
            pool += pope[:3]
        for sub in Q.MME_SUBTASKS:
            pair = Q.mme_subtask(scene, sub, rng)
            if pair:
                pool.append(pair[int(rng.integers(0, 2))])
    qas = [qa for qa in pool if qa is not None]
    if mc_fraction:  # no draw at 0, so the records of earlier versions come out unchanged
        qas = [Q.as_multiple_choice(qa, scene, rng, mc_max_options)
               if "choices" not in qa.extra and rng.random() < mc_fraction
               else qa for qa in qas]
    return [(qa.text, qa.answer) for i in rng.permutation(len(qas)) for qa in [qas[int(i)]]]


def _instruct_record(scene: Scene, rng: np.random.Generator, mc_fraction: float = 0.0,
                     mc_max_options: int = 5) -> list[dict[str, str]]:
    turns: list[tuple[str, str]] = []
    u = rng.random()
    if u < _P_CAPTION_TURN:
        turns.append((Q.CAPTION_PROMPTS[int(rng.integers(0, len(Q.CAPTION_PROMPTS)))], Q.caption(scene)))
    elif scene.kind == "soc" and u < _P_CAPTION_TURN + _P_MC_LEAD:
        # multiple-choice turns are long; leading with one makes sure enough of them fit the budget
        free = Q.soc_question(scene, Q.SOC_MC_TYPES[int(rng.integers(0, len(Q.SOC_MC_TYPES)))], rng)
        if free is not None:
            mc = Q.as_multiple_choice(free, scene, rng, mc_max_options)
            pair = sum(map(estimate_tokens, (free.text, free.answer, mc.text, mc.answer))) + 2 * _CHATML_TURN_OVERHEAD
            if rng.random() < _P_MC_PAIRED and 2 + pair <= TEXT_BUDGET - 4:  # else the budget drops the letter turn
                turns.append((free.text, free.answer))
            turns.append((mc.text, mc.answer))
    max_turns = int(rng.integers(2, 5))
    used = 2  # "<image>\n"
    conv: list[dict[str, str]] = []
    for prompt, answer in turns + _turn_pool(scene, rng, mc_fraction, mc_max_options):
        cost = estimate_tokens(prompt) + estimate_tokens(answer) + _CHATML_TURN_OVERHEAD
        if conv and (used + cost > TEXT_BUDGET - 4 or len(conv) // 2 >= max_turns):
            continue
        if not conv:
            prompt = f"<image>\n{prompt}"
        conv += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        used += cost
    return conv


def _lookup_records(rng: np.random.Generator, n: int, max_options: int, tok: Any, template: str,
                    max_length: int, prefix: str) -> list[dict[str, Any]]:
    """`n` text-only records of `_LOOKUP_TURNS` option look-up turns each (questions.lookup_question), fewer where
    they would pass `max_length` tokens; ids `<prefix>-000000`, ..."""
    tmpl = get_template(template, tok)
    out = []
    for i in range(n):
        conv: list[dict[str, str]] = []
        for _ in range(_LOOKUP_TURNS):
            qa = Q.lookup_question(rng, max_options)
            turn = [{"from": "human", "value": qa.text}, {"from": "gpt", "value": qa.answer}]
            if conv and len(tmpl.encode(conv + turn, tok, num_image_tokens=1)[0]) > max_length:
                break
            conv += turn
        out.append({"id": f"{prefix}-{i:06d}", "conversations": conv})
    return out


def _make_corpus(ctx: _Ctx, split: str, n: int, mix: tuple[float, float, float],
                 build: Callable[[Scene, np.random.Generator], list[dict[str, str]]]) -> list[dict[str, Any]]:
    rng = ctx.rng(split)
    (ctx.root / "images" / split).mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(n), desc=split, unit="img", disable=None, leave=False):
        scene, _ = ctx.draw(split, rng, lambda r: (_sample(_pick_kind(r, mix), r, ctx.lay), None))
        image_id, rel = ctx.save(split, i, scene)
        records.append({"id": image_id, "image": rel, "conversations": build(scene, rng)})
    return records


# --- benchmark suites --------------------------------------------------------------------------------------


def _suite_items(suite: str, i: int, rng: np.random.Generator, lay: Layout, n_left: int
                 ) -> tuple[Scene, list[Q.QA]] | None:
    """One image's scene and questions for a suite (None: infeasible, draw again)."""
    if suite == "soc-vqa":
        scene = sample_soc(rng, lay)
        qs = [Q.soc_question(scene, Q.SOC_NONREL[i % 3], rng), Q.soc_question(scene, Q.SOC_REL[i % 3], rng)]
        if any(q is None for q in qs):
            return None
        return scene, [q for q in qs if q is not None][:n_left]
    if suite == "soc-mc":
        scene = sample_soc(rng, lay)
        q = Q.soc_mc_question(scene, Q.SOC_MC_TYPES[i % len(Q.SOC_MC_TYPES)], rng)
        return None if q is None else (scene, [q])
    if suite == "glyph-vqa":
        scene = sample_glyph(rng, lay)
        return scene, [Q.glyph_question(scene, int(rng.integers(0, len(scene.words))))]
    if suite == "shape-pope":
        scene = sample_shape(rng, lay)
        qs = Q.pope_questions(scene, Q.POPE_SPLITS[i % 3], rng)
        return None if qs is None else (scene, qs)
    if suite == "shape-mme":
        scene = sample_shape(rng, lay)
        qs = Q.mme_questions(scene, rng)
        return None if qs is None else (scene, qs)
    raise ValueError(f"unknown suite {suite!r}")


def suite_size(suite: str, n_per_suite: int) -> tuple[int, int]:
    """(images, questions) of a suite: exactly n questions, except POPE and MME, which round up to whole images
    (6 and 8 questions per image; POPE also to a multiple of 3 images, one third per negative-sampling split)."""
    per = QUESTIONS_PER_IMAGE[suite]
    n_img = max(1, math.ceil(n_per_suite / per))
    if suite == "shape-pope":
        n_img = 3 * math.ceil(n_img / 3)
    n_q = n_per_suite if suite in ("soc-vqa", "soc-mc", "glyph-vqa") else n_img * per
    return n_img, n_q


def _make_suite(ctx: _Ctx, suite: str, n_per_suite: int) -> dict[str, Any]:
    rng = ctx.rng(suite)
    (ctx.root / "images" / suite).mkdir(parents=True, exist_ok=True)
    out_dir = ctx.root / "suites" / suite
    out_dir.mkdir(parents=True, exist_ok=True)
    n_img, n_q = suite_size(suite, n_per_suite)
    questions, answers = [], []
    qid = 0
    for i in tqdm(range(n_img), desc=suite, unit="img", disable=None, leave=False):
        scene, qas = ctx.draw(suite, rng, lambda r: _suite_items(suite, i, r, ctx.lay, n_q - qid))
        image_id, rel = ctx.save(suite, i, scene)
        for qa in qas:
            q = {"question_id": qid, "image": rel, "text": qa.text, "category": qa.category}
            a: dict[str, Any] = {"question_id": qid, "image_id": image_id, "type": qa.type, "answer": qa.answer,
                                 "answers": Q.annotator_answers(qa.answer, rng)}
            if suite == "soc-vqa":
                a["category"] = qa.category
            elif suite == "soc-mc":
                a["category"] = qa.category
                a["choices"] = qa.extra["choices"]
            elif suite == "shape-pope":
                a["split"] = qa.type
                a["label"] = qa.extra["label"]
            elif suite == "shape-mme":
                a["subtask"] = qa.type
                a["label"] = qa.extra["label"]
            questions.append(q)
            answers.append(a)
            qid += 1
    _dump_jsonl(out_dir / "questions.jsonl", questions)
    _dump_jsonl(out_dir / "answers.jsonl", answers)
    meta = {"suite": suite, "metric": SUITE_METRICS[suite], "n": len(questions), "n_images": n_img,
            "answer_space": Q.answer_space(suite)}
    _dump_json(out_dir / "meta.json", meta)
    return meta


# --- entry point -------------------------------------------------------------------------------------------


def _role_prefixes(template: str) -> dict[str, str]:
    """The text a chat template puts before a human and an assistant turn's content, special tokens left out
    ("user\n" / "assistant\n" for ChatML, "USER: " / "ASSISTANT: " for the Vicuna-style templates)."""
    t = get_template(template)
    human = t.user.split("{content}")[0]
    gpt = t.assistant_prefix + t.assistant.split("{content}")[0]
    for s in SPECIAL_TOKENS:
        human, gpt = human.replace(s, ""), gpt.replace(s, "")
    return {"human": human, "gpt": gpt}


def _training_texts(*corpora: list[dict[str, Any]], template: str = "qwen2"):
    """The training text as the chat template lays it out (role words included; special tokens left out, they
    are added tokens), plus every answer word, alone and after a space, weighted so that even a tiny corpus and
    vocabulary make each of them a single token."""
    prefix = _role_prefixes(template)
    for _ in range(_WORLD_WORD_WEIGHT):
        yield from Q.WORLD_WORDS
        yield " " + " ".join(Q.WORLD_WORDS)
    for recs in corpora:
        for r in recs:
            for t in r["conversations"]:
                yield prefix[t["from"]] + t["value"].replace("<image>", "")


def _fit_budget(records: list[dict[str, Any]], tok: Any, template: str = "qwen2") -> None:
    """Drop trailing turns (never the first) of conversations longer than TEXT_BUDGET text tokens."""
    tmpl = get_template(template, tok)
    for r in records:
        conv = r["conversations"]
        while len(conv) > 2 and len(tmpl.encode(conv, tok, num_image_tokens=1)[0]) > TEXT_BUDGET:
            del conv[-2:]


def prepare_data(cfg: Any, root: str | Path | None = None, force: bool = False) -> Path:
    """`make_data` for a whole qtllava Config: its data settings and image size, and, with a pretrained LLM, that
    LLM's tokenizer (the data is then cut to its token counts and cached per tokenizer)."""
    return make_data(cfg.data, cfg.vision.image_size, root=root, force=force,
                     tokenizer=cfg.llm.pretrained or None)


def make_data(cfg: Any, image_size: int, root: str | Path | None = None, force: bool = False,
              tokenizer: str | Path | None = None) -> Path:
    """Generate (or find cached) data for a DataConfig at `image_size` px under `root` (default `cfg.root`).

    `tokenizer`: a folder with the tokenizer the data is for (a pretrained LLM's); None trains one on the corpus and
    stores it under `root/tokenizer`. Returns the root. A matching `manifest.json` (generator version, sizes, seed,
    image size, tokenizer, file hashes) makes this return at once; anything else (or `force`) regenerates from
    scratch."""
    root = Path(root if root is not None else cfg.root)
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if not 0.0 <= cfg.mc_fraction <= 1.0:
        raise ValueError(f"data.mc_fraction must be in [0, 1], got {cfg.mc_fraction}")
    if not 2 <= cfg.mc_max_options <= len(Q.LETTERS):
        raise ValueError(f"data.mc_max_options must be in [2, {len(Q.LETTERS)}], got {cfg.mc_max_options}")
    if cfg.lookup_records < 0:
        raise ValueError(f"data.lookup_records must be >= 0, got {cfg.lookup_records}")
    settings = _gen_settings(cfg, image_size)
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        settings["tokenizer"] = _sha256(Path(tokenizer) / "tokenizer.json")
    if not force and _cache_valid(root, settings):
        log.info("data in %s is up to date (manifest matches)", root)
        return root
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    _clear(root)
    (root / _MARKER).write_text(f"qtllava data generator v{GENERATOR_VERSION}\n")
    (root / "images").mkdir()
    log.info("generating data in %s (seed %d, %d px)", root, cfg.seed, image_size)
    with ThreadPoolExecutor(max_workers=_WRITERS) as pool:
        ctx = _Ctx(root=root, lay=Layout(image_size), seed=int(cfg.seed), seen={}, pool=pool)
        captions = _make_corpus(ctx, "captions", cfg.n_caption, _CAPTION_MIX, _caption_record)
        instruct = functools.partial(_instruct_record, mc_fraction=float(cfg.mc_fraction),
                                     mc_max_options=int(cfg.mc_max_options))
        train = _make_corpus(ctx, "instruct_train", cfg.n_instruct, _INSTRUCT_MIX, instruct)
        val = _make_corpus(ctx, "instruct_val", cfg.n_val, _INSTRUCT_MIX, instruct)
        metas = {s: _make_suite(ctx, s, cfg.n_per_suite) for s in SUITES}
        images_sha = ctx.finish()
    _dump_jsonl(root / "scenes.jsonl", ctx.scenes)
    if tok is None:
        tok = train_tokenizer(_training_texts(captions, train, template=cfg.template), cfg.vocab_size,
                              root / "tokenizer")
    _fit_budget(train + val, tok, cfg.template)
    # after the tokenizer, which they would otherwise change: a base trained without them can be continued with them
    n_lookup, n_lookup_val = int(cfg.lookup_records), round(cfg.lookup_records * cfg.n_val / max(cfg.n_instruct, 1))
    for recs, stream, n, prefix in ((train, "lookup", n_lookup, "lkp"), (val, "lookup_val", n_lookup_val, "lkv")):
        recs += _lookup_records(ctx.rng(stream), n, int(cfg.mc_max_options), tok, cfg.template, int(cfg.max_length),
                                prefix)
    _dump_json(root / "captions.json", captions)
    _dump_json(root / "instruct_train.json", train)
    _dump_json(root / "instruct_val.json", val)
    files = sorted([p for p in root.glob("*.json") if p.name != "manifest.json"] + [root / "scenes.jsonl"]
                   + list((root / "suites").glob("*/*")) + list((root / "tokenizer").glob("*")))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "settings": settings,
        "data_config": {k: v for k, v in asdict(cfg).items() if k != "root"} if is_dataclass(cfg) else settings,
        "counts": {"captions": len(captions), "instruct_train": len(train), "instruct_val": len(val),
                   **{s: m["n"] for s, m in metas.items()}},
        "tokenizer": {"vocab_size": len(tok)},
        "images": {"count": sum(ctx.per_split.values()), "per_split": ctx.per_split,
                   "sha256": images_sha},
        "files": {str(p.relative_to(root)): _sha256(p) for p in files},
    }
    _dump_json(root / "manifest.json", manifest)
    log.info("generated %d images and %d suite questions in %.1f s", manifest["images"]["count"],
             sum(m["n"] for m in metas.values()), time.perf_counter() - t0)
    return root
