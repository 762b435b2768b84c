"""benchmarks/study.py's summary: means over seeds, differences to fp16 in points, verdicts against the targets."""

import pytest


@pytest.fixture(scope="module")
def study(benchmark_module):
    return benchmark_module("study")


def _row(config, seed, vqa, mme):
    return {"config": config, "seed": seed, "suites": {"soc-vqa": vqa, "shape-mme": mme},
            "chance_or_majority": {"soc-vqa": 50.0, "shape-mme": 400.0},
            "uplink_bits_per_element": 16.0 if config == "fp16" else 0.2, "total_fraction_of_fp16": 1.0}


def test_summary_means_deltas_and_verdicts(study):
    rows = [_row("fp16", 0, 60.0, 380.0), _row("fp16", 1, 62.0, 388.0),
            _row("fsq-L4-ans", 0, 58.0, 380.0), _row("fsq-L4-ans", 1, 60.0, 372.0),
            _row("fsq-L2-ans", 0, 58.5, 300.0)]
    items = {it["config"]: it for it in study.summary(rows)}
    vqa = items["fsq-L4-ans"]["suites"]["soc-vqa"]
    assert vqa["mean"] == pytest.approx(59.0) and vqa["range"] == pytest.approx(2.0)
    assert vqa["delta_vs_fp16"] == pytest.approx(-2.0)
    assert vqa["within_target"] is False and vqa["within_seed_spread"] is True  # 2 points below, ranges are 2
    assert vqa["fp16_above_chance_and_majority"] is True
    # MME in percent of its maximum 800: fp16 384 -> 48 %, fsq 376 -> 47 %: one point below, on the edge
    mme = items["fsq-L4-ans"]["suites"]["shape-mme"]
    assert mme["delta_vs_fp16"] == pytest.approx(-1.0) and mme["within_target"] is True
    assert mme["fp16_above_chance_and_majority"] is False  # 384 < 400: guesses against guesses
    l2 = items["fsq-L2-ans"]["suites"]["soc-vqa"]
    assert l2["delta_vs_fp16"] == pytest.approx(-2.5) and l2["within_target"] is True  # L = 2 may lose 3 points
    assert "~" in study.summary_table(list(items.values()))
    # paired by seed: differences -2 and -2 -> standard error 0; one seed (L = 2) has none
    assert vqa["paired_delta"] == pytest.approx(-2.0) and vqa["paired_se"] == pytest.approx(0.0)
    assert mme["paired_delta"] == pytest.approx(-1.0) and mme["paired_se"] == pytest.approx(1.0)  # 0, -2
    assert "paired_se" not in l2


def test_rows_of_gone_runs_are_kept_from_the_previous_result(study, tmp_path):
    """A fresh checkout has no runs/: collect() keeps the earlier result's rows of configurations still in ORDER
    (marked kept), drops the others, and recomputes the traffic fractions against the fp16 seed-0 row."""
    def row(config, seed, up, down):
        return {**_row(config, seed, 60.0, 400.0), "bytes_per_sample_up": up, "bytes_per_sample_down": down}

    kept = [row("fp16", 0, 1000.0, 1000.0), row("fsq-L4-ans-clr0", 3, 50.0, 1000.0), row("no-such-config", 0, 1, 1)]
    rows = study.collect(tmp_path / "runs", tmp_path / "base", kept)
    assert [(r["config"], r["seed"]) for r in rows] == [("fp16", 0), ("fsq-L4-ans-clr0", 3)]
    assert all(r["kept"] for r in rows)
    assert rows[1]["total_fraction_of_fp16"] == pytest.approx(0.525)
    assert study.collect(tmp_path / "runs", tmp_path / "base") == []


def test_jobs_with_kept_rows_are_not_run_again(study):
    """A row of the previous result is a finished run of the same base: `pending` leaves its job out, keeps ORDER's
    order for the rest, and runs everything of `only` when nothing is kept."""
    only = ["fsq-L4-ans-clr0"]
    all_jobs = study.pending(only)
    assert all_jobs and all(n == "fsq-L4-ans-clr0" for n, _ in all_jobs)
    assert [s for _, s in all_jobs] == sorted(s for _, s in all_jobs)
    kept = [_row("fsq-L4-ans-clr0", 0, 60.0, 400.0), _row("fsq-L4-ans-clr0", 3, 60.0, 400.0), _row("fp16", 1, 1, 1)]
    assert study.pending(only, kept) == [j for j in all_jobs if j[1] not in (0, 3)]
    assert ("fp16", 1) not in study.pending(None, kept) and ("fp16", 2) in study.pending(None, kept)


def test_rows_with_longer_steps_are_compared_with_fp16_given_the_same_steps(study):
    assert study.REFERENCES["fsq-L2-ans-clr0-s1x3"] == "fp16-s1x3"
    assert all(ref in study.CONFIGS for ref in study.REFERENCES.values())
    rows = [_row("fp16", 0, 60.0, 380.0), _row("fp16", 1, 62.0, 388.0),
            _row("fp16-s1x3", 0, 66.0, 380.0), _row("fp16-s1x3", 1, 70.0, 388.0),
            _row("fsq-L2-ans-clr0-s1x3", 0, 65.0, 380.0), _row("fsq-L2-ans-clr0-s1x3", 1, 67.0, 388.0)]
    items = {it["config"]: it for it in study.summary(rows)}
    cell = items["fsq-L2-ans-clr0-s1x3"]["suites"]["soc-vqa"]
    assert items["fsq-L2-ans-clr0-s1x3"]["reference"] == "fp16-s1x3"
    # against fp16-s1x3 (mean 68): -2 (against plain fp16 it would read +5)
    assert cell["delta_vs_fp16"] == pytest.approx(-2.0) and cell["paired_delta"] == pytest.approx(-2.0)
    assert cell["paired_se"] == pytest.approx(1.0) and cell["within_target"] is True
    assert items["fp16-s1x3"]["suites"]["soc-vqa"]["delta_vs_fp16"] == pytest.approx(7.0)  # vs plain fp16
    table = study.summary_table(list(items.values()))
    assert "(-2.0 \u00b11.0)" in table
