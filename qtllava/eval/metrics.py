"""Metric functions of the paper's benchmarks, re-implemented from their official evaluators.

* `normalize_answer` / `vqa_soft_accuracy`: VQAv2 / TextVQA (the EvalAI answer processor, i.e. the ASCII-clean
  version of the official ``vqaEval.py`` normalisation that LLaVA's ``m4c_evaluator.py`` uses, and the official
  leave-one-annotator-out soft accuracy).
* `pope_scores`: POPE's ``evaluate.py`` (first sentence, "No"/"not"/"no" as words means no, otherwise yes).
* `mme_scores`: MME's ``calculation.py`` (acc, acc+ and score = 100 x (acc + acc+)).
* `parse_choice`: option letter parsing as ScienceQA's evaluator in LLaVA (``eval_science_qa.py``) does it, or a
  lenient parse (`lenient=True`) that is reported beside it.

Every function returns fractions in [0, 1] except `mme_scores`'s `score` (0..200); suites turn them into percent.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "normalize_answer",
    "vqa_soft_accuracy",
    "pope_yes_no",
    "pope_scores",
    "mme_yes_no",
    "mme_scores",
    "parse_choice",
    "OPTION_LETTERS",
]

# --- VQA answer normalisation ------------------------------------------------------------------------------

# The official contractions table (ASCII apostrophes, as in the EvalAI processor). Keys with capitals ("Im") can
# never match lower-cased text; they are kept so the table is the official one.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (buggy) negative look-ahead that never
# blocks anything, so in effect it removes every period that is not followed by a digit ("3.5" survives).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")


def _process_punctuation(text: str) -> str:
    out = text
    comma_number = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        # Punctuation next to a space (or any text with a digit,digit comma) is deleted; otherwise it separates
        # words ("red-blue" -> "red blue"). The test looks at the input text, as the official code does.
        if (p + " " in text or " " + p in text) or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The EvalAI/VQA answer normalisation.

    In order: lower-case; drop "," and "?" and split off "'s"; newlines/tabs to spaces; punctuation (deleted
    when next to a space, else a word separator; periods removed unless a digit follows); number words to digits
    ("two" -> "2", "none" -> "0"); articles a/an/the removed; contractions restored ("dont" -> "don't"); single
    spaces. Examples: "Two dogs." -> "2 dogs", "1,000" -> "1000", "the cat" -> "cat", "a" -> "".
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a string, got {type(text).__name__}")
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return _process_digit_article(text)


def vqa_soft_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against the annotators' answers (all normalised).

    Official rule: for each annotator i, acc_i = min(1, #{j != i : answer_j == prediction} / 3), averaged over i.
    With 10 answers of which k equal the prediction this is 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, >= 4.

    For fewer than 4 answers the threshold 3 could never be reached by a perfect prediction, so it is
    min(3, n - 1) (identical to the official rule for n >= 4); a single answer scores 1.0 if equal else 0.0.
    """
    if isinstance(gt_answers, str):
        raise TypeError("gt_answers must be a list of strings, not a string")
    answers = [normalize_answer(a) for a in gt_answers]
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_soft_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    if n == 1:
        return 1.0 if answers[0] == pred else 0.0
    threshold = min(3, n - 1)
    k = sum(a == pred for a in answers)
    # Annotators whose own answer matches see k - 1 matching others; the rest see k.
    total = k * min(1.0, (k - 1) / threshold) + (n - k) * min(1.0, k / threshold)
    return total / n


# --- POPE ---------------------------------------------------------------------------------------------------


def pope_yes_no(text: str) -> str:
    """POPE's mapping of free text to "yes"/"no": first sentence (up to the first "."), commas dropped, then
    "no" if "No", "not" or "no" is one of its words, else "yes" (so an empty answer counts as "yes"). Words are
    split on any whitespace (POPE splits on single spaces; the same for one-line answers)."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split()
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _label(label: str, where: str) -> str:
    lab = str(label).strip().lower()
    if lab not in ("yes", "no"):
        raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
    return lab


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class: accuracy, precision, recall, f1, yes_ratio (fractions).

    Free-text predictions are mapped with `pope_yes_no`. Zero divisions give 0 (precision with no predicted
    positives, recall with no positive labels, F1 when precision + recall is 0).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_scores: {len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("pope_scores: no predictions")
    tp = fp = tn = fn = 0
    for i, (pred, lab) in enumerate(zip(predictions, labels)):
        p = pope_yes_no(pred) == "yes"
        y = _label(lab, f"pope_scores label {i}") == "yes"
        if p and y:
            tp += 1
        elif p:
            fp += 1
        elif y:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# --- MME ----------------------------------------------------------------------------------------------------


def mme_yes_no(text: str) -> str:
    """MME's parsing: lower-cased answer; exactly "yes"/"no", else "yes" or "no" within its first 4 characters
    (checked in that order), else "other" (always wrong). Surrounding whitespace is ignored."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """MME acc, acc+ and score for one subtask.

    Each record has `image_id`, `prediction` (free text) and `label` ("yes"/"no"). acc = fraction of questions
    answered correctly; acc_plus = fraction of images whose questions are all correct (MME has two per image);
    score = 100 x (acc + acc_plus), at most 200.
    """
    per_image: dict[Any, list[bool]] = defaultdict(list)
    n_correct = n = 0
    for i, rec in enumerate(records):
        try:
            image_id, pred, label = rec["image_id"], rec["prediction"], rec["label"]
        except KeyError as e:
            raise ValueError(f"mme_scores: record {i} lacks {e.args[0]!r}") from None
        ok = mme_yes_no(str(pred)) == _label(label, f"mme_scores record {i}")
        per_image[image_id].append(ok)
        n_correct += ok
        n += 1
    if n == 0:
        raise ValueError("mme_scores: no records")
    acc = n_correct / n
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus)}


# --- multiple choice ----------------------------------------------------------------------------------------

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_ALONE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?[.:]?$")           # "B", "b", "B.", "(B)", "B)", "(b)."
_LEADING = re.compile(r"^\(?([A-Z])[.):](?:\s|$)")        # "B. text", "B) text", "(B) text", "B: text"
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)


_OFFICIAL_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_choice(text: str, n_choices: int, lenient: bool = False) -> str | None:
    """The option letter a free-text answer picks among the first `n_choices` letters, or None (FAILED).

    Default: exactly the rules of ScienceQA's evaluator in LLaVA (`eval_science_qa.py`), on the stripped answer:
    the letter alone ("B"), the letter followed by ". " ("B. square"), or exactly one "The answer is B" followed
    by one more character. "B.", "b", "(B)", "C)" and "The answer is C" at the very end are FAILED there, so here.
    `lenient=True` also accepts "b", "B.", "(B)", "B)", "B) text", "(B) text", "answer is (B)"; an article-like
    leading "A circle" or several conflicting "answer is" letters still give None.
    """
    if not 1 <= n_choices <= len(OPTION_LETTERS):
        raise ValueError(f"parse_choice: n_choices must be in 1..{len(OPTION_LETTERS)}, got {n_choices}")
    valid = OPTION_LETTERS[:n_choices]
    t = text.strip()
    if not lenient:
        if len(t) == 1 and t in valid:
            return t
        if len(t) >= 3 and t[0] in valid and t[1:3] == ". ":
            return t[0]
        found = _OFFICIAL_ANSWER_IS.findall(t)
        return found[0] if len(found) == 1 and found[0] in valid else None
    letter: str | None = None
    m = _ALONE.match(t)
    if m:
        letter = m.group(1).upper()
    else:
        m = _LEADING.match(t)
        if m:
            letter = m.group(1)
        else:
            # The letter itself must be upper case: "the answer is a circle" is not option A.
            found = {x for x in _ANSWER_IS.findall(t) if x.isupper()}
            if len(found) == 1:
                letter = found.pop()
    return letter if letter is not None and letter in valid else None
