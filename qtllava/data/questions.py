"""Question, answer and caption builders for the three scene kinds.

Every builder returns a :class:`QA` (question type, prompt text, canonical answer, extras). Prompts carry the
answer-format line the suites use, so training (instruction corpus) and evaluation (suites) see the same format:

- short-answer questions: ``"<question>\\nAnswer with one word."``
- MME-style yes/no: ``"<question> Please answer yes or no."``
- multiple choice: ``"<question>\\nA. ...\\nB. ...\\nAnswer with the option's letter from the given choices directly."``
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .world import GLYPH_COLORS, LEXICON, SHAPE_COLORS, SHAPES, SOC_COLORS, SOC_SHAPES, Obj, Scene, distance, \
    shape_prior

__all__ = [
    "QA",
    "SHORT_ANSWER",
    "YES_NO",
    "MC_INSTRUCTION",
    "LETTERS",
    "CAPTION_PROMPTS",
    "SOC_NONREL",
    "SOC_REL",
    "SOC_MC_TYPES",
    "POPE_SPLITS",
    "MME_SUBTASKS",
    "soc_question",
    "soc_mc_question",
    "as_multiple_choice",
    "lettered_prompt",
    "OPTION_WORDS",
    "lookup_question",
    "glyph_question",
    "glyph_color_question",
    "pope_questions",
    "mme_questions",
    "caption",
    "caption_order",
    "answer_space",
    "annotator_answers",
]

SHORT_ANSWER = "Answer with one word."
YES_NO = "Please answer yes or no."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDE"
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in the image?",
    "Summarize the image.",
)

SOC_NONREL = ("shape", "left", "top")
SOC_REL = ("closest", "furthest", "count")
SOC_MC_TYPES = SOC_NONREL + SOC_REL + ("closest_color", "furthest_color")
POPE_SPLITS = ("random", "popular", "adversarial")
MME_SUBTASKS = ("existence", "count", "position", "color")

_SYNONYMS = {
    "circle": ("round", "circular", "disk"),
    "square": ("box", "rectangle", "cube"),
    "triangle": ("triangular", "pyramid"),
    "gray": ("grey", "silver"),
    "orange": ("brown",),
    "purple": ("violet",),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass
class QA:
    type: str
    question: str  # the bare question (no format line)
    answer: str  # canonical answer
    text: str = ""  # the full prompt (question + format line); filled by the builders
    category: str = ""
    extra: dict = field(default_factory=dict)


def _short(qa: QA) -> QA:
    qa.text = f"{qa.question}\n{SHORT_ANSWER}"
    return qa


def _yes_no(b: bool) -> str:
    return "yes" if b else "no"


def answer_space(suite: str) -> dict[str, list[str]]:
    """Candidate canonical answers per question type of a suite."""
    yn = ["yes", "no"]
    counts = [str(i) for i in range(1, 7)]
    if suite == "soc-vqa":
        return {"shape": list(SOC_SHAPES), "left": yn, "top": yn, "closest": list(SOC_SHAPES),
                "furthest": list(SOC_SHAPES), "count": counts}
    if suite == "soc-mc":  # option letters: 2 options for two-candidate types, else 3-5
        return {t: list(LETTERS[:2] if t in ("shape", "left", "top", "closest", "furthest") else LETTERS)
                for t in SOC_MC_TYPES}
    if suite == "glyph-vqa":
        return {"word_color": list(LEXICON)}
    if suite == "shape-pope":
        return {s: yn for s in POPE_SPLITS}
    if suite == "shape-mme":
        return {s: yn for s in MME_SUBTASKS}
    raise ValueError(f"unknown suite {suite!r}")


def annotator_answers(answer: str, rng: np.random.Generator) -> list[str]:
    """Ten VQA-style annotator answers: mostly the canonical answer, a few synonyms or number words.

    Number words and case variants normalise to the canonical answer under EvalAI normalisation; synonyms do not,
    so they give partial credit only (at most 2 of 10 differ, so the canonical answer always scores 1.0)."""
    out = [answer] * 10
    k = int(rng.integers(0, 3))
    if k == 0:
        return out
    alts: tuple[str, ...]
    if answer.isdigit():
        alts = (_NUMBER_WORDS[int(answer)],) if int(answer) < len(_NUMBER_WORDS) else ()
    elif answer in _SYNONYMS:
        alts = _SYNONYMS[answer]
    elif answer in LEXICON:
        alts = (answer.upper(), answer.capitalize())
    else:
        alts = ()
    if not alts:
        return out
    for i in rng.choice(10, size=k, replace=False):
        out[int(i)] = alts[int(rng.integers(0, len(alts)))]
    return out


# --- Sort-of-CLEVR -----------------------------------------------------------------------------------------


def _by_color(scene: Scene) -> dict[str, Obj]:
    return {o.color: o for o in scene.objects}


def _extreme(scene: Scene, ref: Obj, closest: bool) -> Obj | None:
    """The object closest to / furthest from ref, or None when the runner-up is within a margin (ambiguous)."""
    others = sorted((o for o in scene.objects if o is not ref), key=lambda o: distance(o, ref),
                    reverse=not closest)
    if len(others) < 2:
        return others[0] if others else None
    margin = 0.25 * others[0].size  # a quarter of an object: near-ties are not asked
    if abs(distance(others[0], ref) - distance(others[1], ref)) < margin:
        return None
    return others[0]


def soc_question(scene: Scene, qtype: str, rng: np.random.Generator) -> QA | None:
    """One short-answer Sort-of-CLEVR question of the given type about a random reference object.

    Returns None if no reference object gives an unambiguous answer (only possible for closest / furthest)."""
    colors = list(SOC_COLORS)
    order = [colors[int(i)] for i in rng.permutation(len(colors))]
    objs = _by_color(scene)
    for c in order:
        ref = objs[c]
        cat = "non-relational" if qtype in SOC_NONREL else "relational"
        qa = _soc_one(scene, qtype, c, ref, cat)
        if qa is not None:
            qa.extra["ref"] = c
            return qa
    return None


def _soc_one(scene: Scene, qtype: str, c: str, ref: Obj, cat: str) -> QA | None:
    if qtype == "shape":
        return _short(QA(qtype, f"What is the shape of the {c} object?", ref.shape, category=cat))
    if qtype == "left":
        return _short(QA(qtype, f"Is the {c} object on the left?", _yes_no(ref.is_left), category=cat))
    if qtype == "top":
        return _short(QA(qtype, f"Is the {c} object on the top?", _yes_no(ref.is_top), category=cat))
    if qtype == "count":
        n = sum(o.shape == ref.shape for o in scene.objects)
        return _short(QA(qtype, f"How many objects have the same shape as the {c} object?", str(n),
                         category=cat))
    if qtype in ("closest", "furthest", "closest_color", "furthest_color"):
        near = qtype.startswith("closest")
        tgt = _extreme(scene, ref, near)
        if tgt is None:
            return None
        rel = "closest to" if near else "furthest from"
        if qtype.endswith("_color"):
            return _short(QA(qtype, f"What is the color of the object {rel} the {c} object?", tgt.color,
                             category=cat))
        return _short(QA(qtype, f"What is the shape of the object {rel} the {c} object?", tgt.shape,
                         category=cat))
    raise ValueError(f"unknown Sort-of-CLEVR question type {qtype!r}")


def _mc_candidates(qtype: str, scene: Scene, qa: QA) -> list[str]:
    if qa.answer in ("yes", "no"):  # every yes/no question (Sort-of-CLEVR, POPE and MME types alike)
        return ["yes", "no"]
    if qtype == "word_color":
        return list(LEXICON)
    if qtype == "color_of_word":
        return list(GLYPH_COLORS)
    if qtype in ("shape", "closest", "furthest"):
        return list(SOC_SHAPES)
    if qtype == "count":
        return [str(i) for i in range(1, 7)]
    if qtype.endswith("_color"):
        return [c for c in SOC_COLORS if c != qa.extra.get("ref")]
    raise ValueError(qtype)


def soc_mc_question(scene: Scene, qtype: str, rng: np.random.Generator, max_options: int = 5) -> QA | None:
    """A multiple-choice version: 2-`max_options` shuffled options (lettered A-E) that include the correct one."""
    qa = soc_question(scene, qtype, rng)
    return None if qa is None else as_multiple_choice(qa, scene, rng, max_options)


def lettered_prompt(question: str, options: list[str]) -> str:
    """The multiple-choice prompt: the question, one "A. option" line per option, the answer-format line."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{MC_INSTRUCTION}"


def as_multiple_choice(qa: QA, scene: Scene, rng: np.random.Generator, max_options: int = 5) -> QA:
    """The multiple-choice form of a free-form question (a new QA; `qa` is left as it is): Sort-of-CLEVR types,
    glyph words and their colours, and any yes/no question. `max_options` (2-5) caps the number of options."""
    if not 2 <= max_options <= len(LETTERS):
        raise ValueError(f"max_options must be in [2, {len(LETTERS)}], got {max_options}")
    cands = _mc_candidates(qa.type, scene, qa)
    # two-candidate types (shape, yes/no) give 2 options; the others 3-max_options, so every option count is common
    if len(cands) == 2 or max_options == 2:
        k = 2
    else:
        k = int(rng.integers(3, min(max_options, len(cands)) + 1))
    wrong = [c for c in cands if c != qa.answer]
    opts = [qa.answer] + [wrong[int(i)] for i in rng.choice(len(wrong), size=k - 1, replace=False)]
    opts = [opts[int(i)] for i in rng.permutation(k)]
    return QA(qa.type, qa.question, LETTERS[opts.index(qa.answer)], text=lettered_prompt(qa.question, opts),
              category=qa.category, extra={**qa.extra, "choices": opts, "answer_text": qa.answer})


OPTION_WORDS = tuple(sorted({*SOC_SHAPES, *SOC_COLORS, *GLYPH_COLORS, *LEXICON, "yes", "no",
                             *(str(i) for i in range(1, 7))}))  # every word the multiple-choice turns offer


def lookup_question(rng: np.random.Generator, max_options: int = 5) -> QA:
    """The option look-up on its own, no image needed: "Which option is red?" + 2-`max_options` lettered options
    drawn from OPTION_WORDS, one of them the word asked for; the answer is its letter. The word is written in the
    question as in the options (the same token), so this is the match-and-read-the-letter step of every
    multiple-choice question without the step that finds the answer."""
    if not 2 <= max_options <= len(LETTERS):
        raise ValueError(f"max_options must be in [2, {len(LETTERS)}], got {max_options}")
    k = int(rng.integers(2, max_options + 1))
    opts = [OPTION_WORDS[int(i)] for i in rng.choice(len(OPTION_WORDS), size=k, replace=False)]
    answer = int(rng.integers(k))
    question = f"Which option is {opts[answer]}?"
    return QA("lookup", question, LETTERS[answer], text=lettered_prompt(question, opts),
              extra={"choices": opts, "answer_text": opts[answer]})


# --- glyphs ------------------------------------------------------------------------------------------------


def glyph_question(scene: Scene, index: int) -> QA:
    w = scene.words[index]
    return _short(QA("word_color", f"What word is written in {w.color}?", w.text, category="word"))


def glyph_color_question(scene: Scene, index: int) -> QA:
    """Training-only companion: the colour a given word is written in."""
    w = scene.words[index]
    return _short(QA("color_of_word", f"What color is the word {w.text} written in?", w.color, category="word"))


# --- shapes: POPE and MME ----------------------------------------------------------------------------------


def _exist_q(name: str) -> str:
    return f"Is there a {name} in the image?"


def pope_questions(scene: Scene, split: str, rng: np.random.Generator) -> list[QA] | None:
    """3 questions about present classes ("yes") and 3 about absent ones ("no", by the split's rule), shuffled.

    None if the scene has fewer than 3 distinct classes."""
    prior = shape_prior()
    idx = {n: i for i, n in enumerate(prior.names())}
    present = sorted({idx[o.name] for o in scene.objects})
    if len(present) < 3:
        return None
    pos = [present[int(i)] for i in rng.choice(len(present), size=3, replace=False)]
    neg = prior.negatives(split, set(present), 3, rng)
    out = [_short(QA(split, _exist_q(prior.names()[c]), "yes", category=split, extra={"label": "yes"}))
           for c in pos]
    out += [_short(QA(split, _exist_q(prior.names()[c]), "no", category=split, extra={"label": "no"}))
            for c in neg]
    return [out[int(i)] for i in rng.permutation(len(out))]


def _mme(subtask: str, question: str, label: bool) -> QA:
    ans = _yes_no(label)
    return QA(subtask, question, ans, text=f"{question} {YES_NO}", category=subtask, extra={"label": ans})


def _count_q(shape: str, k: int) -> str:
    return f"Is there exactly {k} {shape} in the image?" if k == 1 else \
        f"Are there exactly {k} {shape}s in the image?"


def mme_subtask(scene: Scene, subtask: str, rng: np.random.Generator) -> tuple[QA, QA] | None:
    """One true and one false yes/no question for an MME subtask, or None if the scene does not allow it."""
    prior = shape_prior()
    names = prior.names()
    counts: dict[str, int] = {}
    for o in scene.objects:
        counts[o.name] = counts.get(o.name, 0) + 1
    if subtask == "existence":
        present = sorted(counts)
        absent = [n for n in names if n not in counts]
        p = present[int(rng.integers(0, len(present)))]
        a = absent[int(rng.integers(0, len(absent)))]
        return _mme(subtask, _exist_q(p), True), _mme(subtask, _exist_q(a), False)
    if subtask == "count":
        shapes = sorted({o.shape for o in scene.objects})
        s = shapes[int(rng.integers(0, len(shapes)))]
        n = sum(o.shape == s for o in scene.objects)
        wrong = [k for k in range(1, 7) if k != n and abs(k - n) <= 2]
        w = wrong[int(rng.integers(0, len(wrong)))]
        return _mme(subtask, _count_q(s, n), True), _mme(subtask, _count_q(s, w), False)
    if subtask == "position":
        uniq = [o for o in scene.objects if counts[o.name] == 1]
        pairs = []
        for a in uniq:
            for b in uniq:
                if a is b:
                    continue
                if a.col < b.col:
                    pairs.append((a, b, "on the left of"))
                if a.row < b.row:
                    pairs.append((a, b, "above"))
        if not pairs:
            return None
        a, b, rel = pairs[int(rng.integers(0, len(pairs)))]
        t = f"Is the {a.name} {rel} the {b.name}?"
        f = f"Is the {b.name} {rel} the {a.name}?"
        return _mme(subtask, t, True), _mme(subtask, f, False)
    if subtask == "color":
        by_shape: dict[str, list[Obj]] = {}
        for o in scene.objects:
            by_shape.setdefault(o.shape, []).append(o)
        single = sorted(s for s, v in by_shape.items() if len(v) == 1)
        if not single:
            return None
        s = single[int(rng.integers(0, len(single)))]
        true_c = by_shape[s][0].color
        others = [c for c in SHAPE_COLORS if c != true_c]
        false_c = others[int(rng.integers(0, len(others)))]
        return _mme(subtask, f"Is the {s} {true_c}?", True), _mme(subtask, f"Is the {s} {false_c}?", False)
    raise ValueError(f"unknown MME subtask {subtask!r}")


def mme_questions(scene: Scene, rng: np.random.Generator) -> list[QA] | None:
    """Per subtask exactly one true and one false question (8 in all), or None if some subtask is impossible."""
    out: list[QA] = []
    for sub in MME_SUBTASKS:
        pair = mme_subtask(scene, sub, rng)
        if pair is None:
            return None
        first = int(rng.integers(0, 2))
        out += [pair[first], pair[1 - first]]
    return out


# --- captions ----------------------------------------------------------------------------------------------


def caption_order(scene: Scene) -> list[Obj]:
    """The order a caption lists a scene's objects in: by colour (palette order), then shape, then reading order.

    Keyed by colour on purpose: predicting the words after a colour word then needs a look-up of that colour in the
    image, the same look-up every question about "the <colour> object" needs. With reading order (top row first)
    a caption can be produced by scanning the image, and a from-scratch decoder never learnt the colour look-up
    (docs/experiments.md, "Do captions keyed by colour teach the real model the colour look-up?")."""
    palette = list(SOC_COLORS if scene.kind == "soc" else SHAPE_COLORS)
    return sorted(scene.objects, key=lambda o: (palette.index(o.color), SHAPES.index(o.shape), o.row, o.col))


def caption(scene: Scene) -> str:
    """A short, complete description: objects in :func:`caption_order`, glyph words in reading order."""
    if scene.kind == "glyph":
        ws = sorted(scene.words, key=lambda w: (w.row, w.col))
        if len(ws) == 1:
            w = ws[0]
            return f"The word {w.text} written in {w.color}."
        return "Two words: " + ", ".join(
            f"{w.text} in {w.color} at the {'top' if w.row == 0 else 'bottom'}" for w in ws) + "."
    objs = caption_order(scene)
    parts = ", ".join(f"{o.color} {o.shape} {o.where}" for o in objs)
    return f"{len(objs)} objects: {parts}."


# sanity: the vocabularies that answers come from (also fed to the tokenizer trainer)
WORLD_WORDS = sorted(set(SOC_COLORS) | set(SHAPE_COLORS) | set(GLYPH_COLORS) | set(SHAPES) | set(LEXICON)
                     | {"yes", "no"} | {str(i) for i in range(10)} | set(LETTERS))
