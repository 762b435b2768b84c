"""Tests of qtllava.eval: metrics on hand-worked cases, suite scoring and baselines on toy suites, runners."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtllava.eval import (
    SUITES,
    answer_question_file,
    baselines,
    evaluate,
    format_table,
    mme_scores,
    normalize_answer,
    parse_choice,
    pope_scores,
    pope_yes_no,
    score_suite,
    vqa_soft_accuracy,
    write_results,
)
from qtllava.eval.metrics import mme_yes_no

# --- normalisation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("Two dogs.", "2 dogs"),
    ("the cat", "cat"),
    ("The Cat", "cat"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("yes.", "yes"),
    ("Yes!", "yes"),
    ("1,000", "1000"),
    ("a", ""),
    ("an apple", "apple"),
    ("none", "0"),
    ("ten", "10"),
    ("3.5", "3.5"),
    ("red-blue", "red blue"),
    ("x - y", "x y"),
    ("  big \t red\nball  ", "big red ball"),
    ("what?", "what"),
    ("(square)", "square"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError):
        normalize_answer(3)  # type: ignore[arg-type]


# --- VQA soft accuracy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_ten_annotators(k, expected):
    # By hand, k matches of 10: the k matching annotators see k-1 others, the 10-k others see k.
    # k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["red"] * k + ["blue"] * (10 - k)
    assert vqa_soft_accuracy("red", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_both_sides():
    assert vqa_soft_accuracy("Two.", ["2"] * 10) == pytest.approx(1.0)
    assert vqa_soft_accuracy("2", ["two"] * 3 + ["three"] * 7) == pytest.approx(0.9)
    assert vqa_soft_accuracy("The Square", ["square"] * 10) == pytest.approx(1.0)


def test_vqa_soft_accuracy_few_answers():
    assert vqa_soft_accuracy("cat", ["cat"]) == 1.0
    assert vqa_soft_accuracy("dog", ["cat"]) == 0.0
    assert vqa_soft_accuracy("cat", ["cat", "cat"]) == 1.0
    assert vqa_soft_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        vqa_soft_accuracy("cat", [])
    with pytest.raises(TypeError):
        vqa_soft_accuracy("cat", "cat")  # type: ignore[arg-type]


def _official_vqa(pred: str, answers: list[str]) -> float:
    """The official loop, literally: leave each annotator out, count matches among the others."""
    pred = normalize_answer(pred)
    answers = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["red", "Red.", "blue", "two", "2", "a cat", "cat"]), min_size=4, max_size=12),
       st.sampled_from(["red", "2", "cat", "green"]))
def test_vqa_soft_accuracy_matches_official_loop(answers, pred):
    got = vqa_soft_accuracy(pred, answers)
    assert 0.0 <= got <= 1.0
    assert got == pytest.approx(_official_vqa(pred, answers))


# --- POPE ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"),
    ("No", "no"),
    ("no", "no"),
    ("No, there is not.", "no"),
    ("Yes. But no", "yes"),
    ("There is not a cat in the image.", "no"),
    ("Nope", "yes"),  # POPE looks for whole words only
    ("", "yes"),
])
def test_pope_yes_no(text, expected):
    assert pope_yes_no(text) == expected


def test_pope_scores_confusion_matrix():
    labels = ["yes", "yes", "yes", "no", "no"]
    preds = ["Yes", "No, there is not.", "Yes. But no", "yes", "no"]
    # -> yes, no, yes, yes, no: TP=2, FN=1, FP=1, TN=1
    s = pope_scores(preds, labels)
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (2, 1, 1, 1)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5)


def test_pope_scores_zero_division():
    s = pope_scores(["no", "no"], ["yes", "no"])
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["f1"] == 0.0
    assert s["accuracy"] == pytest.approx(0.5) and s["yes_ratio"] == 0.0
    s = pope_scores(["yes"], ["no"])
    assert s["recall"] == 0.0 and s["f1"] == 0.0
    with pytest.raises(ValueError):
        pope_scores(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        pope_scores(["yes"], ["yes", "no"])


# --- MME -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("yes", "yes"), ("No", "no"), ("Yes, there is.", "yes"), (" no.", "no"), ("Nope", "no"),
    ("maybe", "other"), ("I think yes", "other"), ("", "other"),
])
def test_mme_yes_no(text, expected):
    assert mme_yes_no(text) == expected


def test_mme_scores_acc_plus_two_images():
    records = [
        {"image_id": "i1", "prediction": "Yes", "label": "yes"},
        {"image_id": "i1", "prediction": "no", "label": "no"},
        {"image_id": "i2", "prediction": "yes", "label": "yes"},
        {"image_id": "i2", "prediction": "maybe", "label": "no"},  # unparseable counts as wrong
    ]
    s = mme_scores(records)
    assert s["acc"] == pytest.approx(3 / 4)
    assert s["acc_plus"] == pytest.approx(1 / 2)
    assert s["score"] == pytest.approx(125.0)
    perfect = [dict(r, prediction=r["label"]) for r in records]
    assert mme_scores(perfect)["score"] == pytest.approx(200.0)
    with pytest.raises(ValueError):
        mme_scores([])


# --- option letters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,n,expected", [
    ("B", 4, "B"), ("B.", 4, "B"), ("B) square", 4, "B"), ("B. square", 4, "B"), ("(B)", 4, "B"),
    ("(B) square", 4, "B"), ("The answer is B.", 4, "B"), ("b", 4, "B"), (" C ", 3, "C"),
    ("D", 3, None), ("E.", 4, None), ("A circle", 4, None), ("the answer is a circle", 4, None),
    ("square", 4, None), ("", 4, None), ("The answer is A. The answer is B.", 4, None),
])
def test_lenient_parse_choice(text, n, expected):
    assert parse_choice(text, n, lenient=True) == expected


@pytest.mark.parametrize("text,expected", [
    # what ScienceQA's evaluator in LLaVA (eval_science_qa.py) accepts ...
    ("B", "B"), (" C ", "C"), ("B. square", "B"), ("The answer is B.", "B"), ("I think The answer is D!", "D"),
    # ... and what it scores as FAILED, however plain the intent
    ("B.", None), ("b", None), ("C)", None), ("(B)", None), ("B) square", None), ("The answer is C", None),
    ("the answer is B.", None), ("The answer is A. The answer is B.", None), ("E", None), ("", None),
])
def test_parse_choice_matches_the_official_scienceqa_evaluator(text, expected):
    assert parse_choice(text, 4) == expected


# --- toy suites (docs/formats.md) ------------------------------------------------------------------------------


def _write_suite(root: Path, suite: str, answer_space: dict, rows: list[dict], q_extra=()) -> Path:
    d = root / "suites" / suite
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"suite": suite, "metric": "x", "n": len(rows),
                                             "answer_space": answer_space}))
    with (d / "questions.jsonl").open("w") as fq, (d / "answers.jsonl").open("w") as fa:
        for r in rows:
            q = {"question_id": r["question_id"], "image": f"{suite}/{r['image_id']}.png", "text": r.pop("text")}
            for k in q_extra:
                q[k] = r[k]
            fq.write(json.dumps(q) + "\n")
            r.setdefault("answers", [r["answer"]] * 10)
            fa.write(json.dumps(r) + "\n")
    return d


def make_suites(root: Path) -> dict[str, Path]:
    d = {}
    d["soc-vqa"] = _write_suite(root, "soc-vqa", {"shape": ["square", "circle"], "count": ["1", "2", "3", "4"]}, [
        {"question_id": "v1", "image_id": "s0", "type": "shape", "answer": "square", "category": "non-relational",
         "text": "What is the shape of the red object?"},
        {"question_id": "v2", "image_id": "s0", "type": "shape", "answer": "circle", "category": "non-relational",
         "text": "What is the shape of the blue object?"},
        {"question_id": "v3", "image_id": "s1", "type": "shape", "answer": "square", "category": "relational",
         "text": "What is the shape of the object closest to the red object?"},
        {"question_id": "v4", "image_id": "s1", "type": "count", "answer": "2", "category": "relational",
         "answers": ["2"] * 7 + ["3"] * 3, "text": "How many objects have the shape of the green object?"},
    ], q_extra=("category",))
    d["soc-mc"] = _write_suite(root, "soc-mc", {"shape": ["A", "B", "C", "D", "E"]}, [
        {"question_id": 1, "image_id": "s0", "type": "shape", "answer": "A", "choices": ["square", "circle"],
         "text": "Shape?\nA. square\nB. circle"},
        {"question_id": 2, "image_id": "s0", "type": "shape", "answer": "B",
         "choices": ["square", "circle", "triangle"], "text": "Shape?"},
        {"question_id": 3, "image_id": "s1", "type": "shape", "answer": "A",
         "choices": ["circle", "square", "triangle", "star"], "text": "Shape?"},
    ])
    d["glyph-vqa"] = _write_suite(root, "glyph-vqa", {"word": ["dog", "cat", "sun", "red"]}, [
        {"question_id": "g1", "image_id": "t0", "type": "word", "answer": "cat", "text": "What word is written?"},
        {"question_id": "g2", "image_id": "t1", "type": "word", "answer": "dog", "text": "What word is written?"},
    ])
    pope = []
    for i, (split, label) in enumerate([("random", "yes"), ("random", "yes"), ("random", "no"), ("random", "no"),
                                        ("popular", "yes"), ("popular", "no")]):
        pope.append({"question_id": f"p{i}", "image_id": f"im{i // 2}", "type": "object", "answer": label,
                     "split": split, "label": label, "text": "Is there a red square in the image?"})
    d["shape-pope"] = _write_suite(root, "shape-pope", {"object": ["yes", "no"]}, pope)
    mme = []
    for i, (sub, img, label) in enumerate([("existence", "m1", "yes"), ("existence", "m1", "no"),
                                           ("existence", "m2", "yes"), ("existence", "m2", "no"),
                                           ("count", "m3", "yes"), ("count", "m3", "no")]):
        mme.append({"question_id": f"m{i}", "image_id": img, "type": sub, "answer": label, "subtask": sub,
                    "label": label, "text": "Is there a circle? Please answer yes or no."})
    d["shape-mme"] = _write_suite(root, "shape-mme", {"existence": ["yes", "no"], "count": ["yes", "no"]}, mme)
    return d


@pytest.fixture
def suites(tmp_path):
    return make_suites(tmp_path)


def _oracle_map(suite_dir: Path) -> dict:
    return {r["question_id"]: r["answer"]
            for r in map(json.loads, (suite_dir / "answers.jsonl").read_text().splitlines())}


def test_score_soc_vqa(suites):
    preds = {"v1": "Square.", "v2": "square", "v3": "A square", "v4": "three"}
    s = score_suite(suites["soc-vqa"], preds)
    assert s["suite"] == "soc-vqa"
    assert s["headline"] == pytest.approx(100 * (1 + 0 + 1 + 0.9) / 4)
    assert s["details"]["relational"] == pytest.approx(95.0)
    assert s["details"]["non-relational"] == pytest.approx(50.0)
    assert s["details"]["per_type"]["count"] == pytest.approx(90.0)
    assert s["details"]["n"] == 4 and s["details"]["n_total"] == 4


def test_score_soc_mc(suites):
    s = score_suite(suites["soc-mc"], {1: "(A)", 2: "The answer is C.", 3: "a"})
    # ScienceQA's evaluator fails "(A)" and "a"; the lenient parse beside it takes both
    assert s["headline"] == 0.0 and s["details"]["lenient_accuracy"] == pytest.approx(200 / 3)
    s = score_suite(suites["soc-mc"], {1: "A", 2: "B. circle", 3: "The answer is A."})
    assert s["headline"] == pytest.approx(100.0)
    s = score_suite(suites["soc-mc"], {"1": "I don't know", "2": "B", "3": "E"})  # ids as strings match too
    assert s["headline"] == pytest.approx(100 / 3)
    assert s["details"]["unparsed"] == 2


def test_score_pope_and_mme(suites):
    s = score_suite(suites["shape-pope"], {f"p{i}": "Yes, there is." for i in range(6)})
    assert s["headline"] == pytest.approx(100 * 2 / 3)
    assert list(s["details"]["splits"]) == ["random", "popular"]
    assert s["details"]["splits"]["random"]["yes_ratio"] == pytest.approx(100.0)
    s = score_suite(suites["shape-mme"], {f"m{i}": "yes" for i in range(6)})
    assert s["details"]["subtasks"]["existence"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert s["headline"] == pytest.approx(100.0)
    assert s["details"]["max"] == 400.0


def test_score_suite_subset_and_errors(suites):
    s = score_suite(suites["glyph-vqa"], {"g1": "cat"})
    assert s["headline"] == 100.0 and s["details"]["n"] == 1 and s["details"]["n_total"] == 2
    with pytest.raises(ValueError, match="not in answers.jsonl"):
        score_suite(suites["glyph-vqa"], {"nope": "cat"})
    with pytest.raises(ValueError):
        score_suite(suites["glyph-vqa"], {})
    with pytest.raises(TypeError):
        score_suite(suites["glyph-vqa"], {"g1": None})


def test_baselines_by_hand(suites):
    # soc-vqa: shape questions 1/2 each; count: candidates 1,2,3,4 score 0, 1.0, 0.9, 0 -> 0.475.
    b = baselines(suites["soc-vqa"])
    assert b["chance"] == pytest.approx(100 * (3 * 0.5 + 0.475) / 4)
    assert b["majority"] == pytest.approx(75.0)  # "square" for shape (2 of 3), "2" for count
    b = baselines(suites["soc-mc"])
    assert b["chance"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert b["majority"] == pytest.approx(200 / 3)  # "A"
    b = baselines(suites["glyph-vqa"])
    assert b["chance"] == pytest.approx(25.0)
    assert b["majority"] == pytest.approx(50.0)  # tie cat/dog -> "dog", first in answer_space
    b = baselines(suites["shape-mme"])
    assert b["chance"] == pytest.approx(2 * 100 * (0.5 + 0.25))  # acc 1/2, acc+ 1/4 per subtask
    assert b["majority"] == pytest.approx(100.0)  # tie -> "yes": acc 1/2, acc+ 0
    b = baselines(suites["shape-pope"])
    assert b["majority"] == pytest.approx(100 * 2 / 3)
    # Hand-worked: random split (2 pos, 2 neg) E[F1] = 0.4625; popular (1, 1) 5/12.
    assert b["chance"] == pytest.approx(100 * (0.4625 + 5 / 12) / 2)


def test_pope_chance_equals_enumeration(suites):
    """The exact expectation equals the average of pope_scores over all 2^6 equally likely yes/no answers."""
    rows = [json.loads(x) for x in (suites["shape-pope"] / "answers.jsonl").read_text().splitlines()]
    total = 0.0
    combos = list(itertools.product(["yes", "no"], repeat=len(rows)))
    for combo in combos:
        f1s = []
        for split in ("random", "popular"):
            idx = [i for i, r in enumerate(rows) if r["split"] == split]
            f1s.append(pope_scores([combo[i] for i in idx], [rows[i]["label"] for i in idx])["f1"])
        total += sum(f1s) / len(f1s)
    assert baselines(suites["shape-pope"])["chance"] == pytest.approx(100 * total / len(combos))


def test_baselines_subset(suites):
    b = baselines(suites["soc-vqa"], question_ids=["v4"])
    assert b["chance"] == pytest.approx(47.5)
    assert b["majority"] == pytest.approx(100.0)


# --- runner ----------------------------------------------------------------------------------------------------


def test_evaluate_always_yes_and_oracle(tmp_path, suites):
    seen_batches = []

    def always_yes(batch):
        seen_batches.append(len(batch))
        assert all({"question_id", "image", "text"} <= q.keys() for q in batch)
        return ["yes"] * len(batch)

    res = evaluate(tmp_path, always_yes, batch_size=4)
    assert list(res) == list(SUITES)
    assert max(seen_batches) <= 4
    assert res["soc-vqa"]["ours"] == 0.0
    assert res["shape-pope"]["ours"] == pytest.approx(100 * 2 / 3)
    assert res["shape-mme"]["ours"] == pytest.approx(100.0)
    for r in res.values():
        assert {"metric", "ours", "chance", "majority", "details", "answers"} <= r.keys()
        assert len(r["answers"]) == r["details"]["n"] and set(r["answers"].values()) == {"yes"}

    truth = {}
    for d in suites.values():
        truth.update(_oracle_map(d))
    res = evaluate(tmp_path, lambda batch: [truth[q["question_id"]] for q in batch], batch_size=3)
    for name in ("soc-vqa", "soc-mc", "glyph-vqa", "shape-pope"):
        assert res[name]["ours"] == pytest.approx(100.0), name
        assert res[name]["answers"] == {str(q): a for q, a in _oracle_map(suites[name]).items()}, name
    assert res["shape-mme"]["ours"] == pytest.approx(res["shape-mme"]["details"]["max"]) == 400.0

    table = format_table(res)
    lines = table.strip().splitlines()
    assert lines[0].split() == ["suite", "metric", "n", "ours", "chance", "majority"]
    assert len(lines) == 2 + len(SUITES)
    assert "shape-mme" in table and "400.00" in table
    out = write_results(res, tmp_path / "out" / "results.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))


def test_evaluate_limit_and_errors(tmp_path, suites):
    res = evaluate(tmp_path, lambda b: ["square"] * len(b), suites=["soc-vqa"], limit=2)
    assert list(res) == ["soc-vqa"]
    assert res["soc-vqa"]["details"]["n"] == 2
    assert res["soc-vqa"]["ours"] == pytest.approx(50.0)
    assert res["soc-vqa"]["majority"] == pytest.approx(50.0)  # "square" on v1, v2
    with pytest.raises(ValueError, match="unknown suite"):
        evaluate(tmp_path, lambda b: ["x"] * len(b), suites=["vqav2"])
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "missing", lambda b: ["x"] * len(b), suites=["soc-vqa"])
    with pytest.raises(ValueError, match="returned 1 answers"):
        evaluate(tmp_path, lambda b: ["x"], suites=["soc-vqa"], batch_size=2)


def test_answer_question_file_round_trip(tmp_path):
    qfile = tmp_path / "q.jsonl"
    qs = [{"question_id": i, "image": f"img{i}.png", "text": f"What is {i}?", "category": "c"} for i in range(5)]
    qfile.write_text("\n".join(json.dumps(q) for q in qs) + "\n\n")
    batches = []

    def fn(batch):
        batches.append([q["question_id"] for q in batch])
        return [q["text"].upper() for q in batch]

    n = answer_question_file(qfile, fn, tmp_path / "sub" / "a.jsonl", batch_size=2, model_id="m")
    assert n == 5
    assert batches == [[0, 1], [2, 3], [4]]
    out = [json.loads(x) for x in (tmp_path / "sub" / "a.jsonl").read_text().splitlines()]
    assert [o["question_id"] for o in out] == list(range(5))
    assert all(o["prompt"] == q["text"] and o["text"] == q["text"].upper() for o, q in zip(out, qs))
    assert all(o["model_id"] == "m" for o in out)
    assert len({o["answer_id"] for o in out}) == 5


@pytest.mark.parametrize("bad_line,match", [
    ("{not json", r"q\.jsonl:2: invalid JSON"),
    ('["a list"]', r"q\.jsonl:2: expected a JSON object"),
    ('{"question_id": 9, "image": "x.png"}', r"q\.jsonl:2: missing key\(s\) 'text'"),
    ('{"question_id": 9, "image": "x.png", "text": 5}', r"q\.jsonl:2: 'text' must be a string"),
    ('{"question_id": 0, "image": "x.png", "text": "again"}', r"q\.jsonl:2: duplicate question_id"),
    ('{"question_id": null, "image": "x.png", "text": "t"}', r"q\.jsonl:2: 'question_id' must be"),
])
def test_answer_question_file_bad_line(tmp_path, bad_line, match):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 0, "image": "a.png", "text": "t"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=match):
        answer_question_file(qfile, lambda b: ["x"] * len(b), tmp_path / "a.jsonl")
