"""benchmarks/answer_nll.py: the suites' questions with their answers, the teacher-forced answer loss of a real
checkpoint (its exact match agrees with scoring the same answers), and differences paired by seed."""

import json
import math

import pytest

from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.train.loop import run_stage


@pytest.fixture(scope="module")
def an(benchmark_module):
    return benchmark_module("answer_nll")


def test_answer_loss_of_a_checkpoint(an, tmp_path):
    cfg = load_config("micro", ["train.stage0.steps=2", f'data.root="{tmp_path / "data"}"'])
    root = make_data(cfg.data, cfg.vision.image_size, root=tmp_path / "data")
    final = run_stage(cfg, "stage0", root, tmp_path / "s0", progress=False).final
    recs = an.suite_conversations(root / "suites" / "glyph-vqa")
    assert recs and all(r["conversations"][0]["value"].startswith("<image>\n") and "image" in r for r in recs)
    res = an.checkpoint_losses(final, cfg, root, ["glyph-vqa", "shape-pope"], batch_size=5)
    for suite, r in res.items():
        assert r["n"] == len(an.suite_conversations(root / "suites" / suite)) == len(r["per_question"])
        assert all(math.isfinite(x) and x > 0 for x in r["per_question"])  # an untrained model is never certain
        assert r["nll"] == pytest.approx(sum(r["per_question"]) / r["n"], rel=1e-4)
        assert 0.0 <= r["exact_pct"] <= 100.0
    # the tuning split: every record of instruct_val.json as it is, all of its assistant turns scored
    got = an.checkpoint_losses(final, cfg, root, [an.VAL], batch_size=5)
    val, records = got[an.VAL], json.loads((root / an.VAL_FILE).read_text())
    assert val["n"] == len(records) > 0
    assert all(math.isfinite(x) and x > 0 for x in val["per_question"])
    # ... and its answer turns by question kind: every turn once, their losses adding up to the records'
    kinds = {k.split("/", 1)[1]: v for k, v in got.items() if k.startswith(an.VAL + "/")}
    assert "word" in kinds and set(kinds) <= {"lookup", "letter", "caption", "word", "exist", "count", "where",
                                               "color", "shape", "attr-yn", "other"}
    n_turns = sum(1 for r in records for c in r["conversations"] if c["from"] == "gpt")
    assert sum(v["n"] for v in kinds.values()) == n_turns
    assert sum(sum(v["per_question"]) for v in kinds.values()) == pytest.approx(sum(val["per_question"]), rel=1e-3)
    assert an._spans([False, True, True, False, True]) == [(1, 3), (4, 5)]
    assert an.study_checkpoints(tmp_path, None) == {}  # s0/stage0 is not a study layout
    # a study layout (two configurations, one seed) through the command line, to the JSON it writes
    for name in ("fp16", "fsq-x"):
        (tmp_path / "study" / name / "seed0" / "stage2").mkdir(parents=True)
        (tmp_path / "study" / name / "seed0" / "stage2" / "final").symlink_to(final)
    out = tmp_path / "nll.json"
    an.main(["--study", str(tmp_path / "study"), "--config", "micro", "-o", f'data.root="{root}"',
             "--suites", "glyph-vqa", "--json", str(out)])
    got = json.loads(out.read_text())
    assert [(r["config"], r["seed"]) for r in got["runs"]] == [("fp16", 0), ("fsq-x", 0)]
    (row,) = got["paired_vs_fp16"]
    assert row["config"] == "fsq-x" and row["glyph-vqa/nll"]["delta"] == pytest.approx(0.0, abs=1e-6)  # same weights
    assert row["glyph-vqa/nll"]["se"] is None and "NaN" not in out.read_text()  # one pair: no standard error


def test_paired_differences(an):
    def res(nll, exact):
        return {"glyph-vqa": {"nll": nll, "exact_pct": exact}}
    results = {("fp16", 0): res(2.0, 40.0), ("fp16", 1): res(2.2, 36.0), ("x", 0): res(2.1, 38.0),
               ("x", 1): res(2.5, 30.0), ("x", 2): res(9.0, 0.0)}  # seed 2 has no fp16 partner
    (row,) = an.paired(results, ["glyph-vqa"])
    assert row["config"] == "x" and row["seeds"] == [0, 1]
    assert row["glyph-vqa/nll"]["delta"] == pytest.approx(0.2) and row["glyph-vqa/nll"]["se"] == pytest.approx(0.1)
    assert row["glyph-vqa/exact_pct"]["delta"] == pytest.approx(-4.0)
    # a row with its own reference (fp16 given the same steps) is compared with that one
    results.update({("fp16-long", 0): res(1.0, 50.0), ("x-long", 0): res(1.5, 45.0)})
    rows = {r["config"]: r for r in an.paired(results, ["glyph-vqa"], references={"x-long": "fp16-long"})}
    assert rows["x-long"]["reference"] == "fp16-long" and rows["x-long"]["glyph-vqa/nll"]["delta"] == pytest.approx(0.5)
    assert rows["fp16-long"]["reference"] == rows["x"]["reference"] == "fp16"
