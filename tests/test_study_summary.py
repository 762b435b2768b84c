"""benchmarks/study.py's summary: means over seeds, differences to fp16 in points, verdicts against the targets."""

import pytest


@pytest.fixture(scope="module")
def study(benchmark_module):
    return benchmark_module("study")


@pytest.fixture(scope="module")
def tiny(study):
    return study.load_study(study.STUDIES / "tiny.toml")


def _row(config, seed, vqa, mme):
    return {"config": config, "seed": seed, "suites": {"soc-vqa": vqa, "shape-mme": mme},
            "chance_or_majority": {"soc-vqa": 50.0, "shape-mme": 400.0},
            "uplink_bits_per_element": 16.0 if config == "fp16" else 0.2, "total_fraction_of_fp16": 1.0}


def test_summary_means_deltas_and_verdicts(study, tiny):
    rows = [_row("fp16", 0, 60.0, 380.0), _row("fp16", 1, 62.0, 388.0),
            _row("fsq-L4-ans", 0, 58.0, 380.0), _row("fsq-L4-ans", 1, 60.0, 372.0),
            _row("fsq-L2-ans", 0, 58.5, 300.0)]
    items = {it["config"]: it for it in study.summary(tiny, rows)}
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


def test_rows_of_gone_runs_are_kept_from_the_previous_result(study, tiny, tmp_path):
    """A fresh checkout has no runs/: collect() keeps the earlier result's rows of configurations still in the study
    (marked kept), drops the others, and recomputes the traffic fractions against the fp16 seed-0 row."""
    def row(config, seed, up, down):
        return {**_row(config, seed, 60.0, 400.0), "bytes_per_sample_up": up, "bytes_per_sample_down": down}

    kept = [row("fp16", 0, 1000.0, 1000.0), row("fsq-L4-ans-clr0", 3, 50.0, 1000.0), row("no-such-config", 0, 1, 1)]
    rows = study.collect(tiny, tmp_path / "runs", False, kept)
    assert [(r["config"], r["seed"]) for r in rows] == [("fp16", 0), ("fsq-L4-ans-clr0", 3)]
    assert all(r["kept"] for r in rows)
    assert rows[1]["total_fraction_of_fp16"] == pytest.approx(0.525)
    assert study.collect(tiny, tmp_path / "runs", False) == []


def test_jobs_with_kept_rows_are_not_run_again(study, tiny):
    """A row of the previous result is a finished run of the same base: `pending` leaves its job out, keeps the study's
    order for the rest, and runs everything of `only` when nothing is kept."""
    only = ["fsq-L4-ans-clr0"]
    all_jobs = study.pending(tiny, only)
    assert all_jobs and all(n == "fsq-L4-ans-clr0" for n, _ in all_jobs)
    assert [s for _, s in all_jobs] == sorted(s for _, s in all_jobs)
    kept = [_row("fsq-L4-ans-clr0", 0, 60.0, 400.0), _row("fsq-L4-ans-clr0", 3, 60.0, 400.0), _row("fp16", 1, 1, 1)]
    assert study.pending(tiny, only, kept) == [j for j in all_jobs if j[1] not in (0, 3)]
    assert ("fp16", 1) not in study.pending(tiny, None, kept) and ("fp16", 2) in study.pending(tiny, None, kept)


def test_rows_with_longer_steps_are_compared_with_fp16_given_the_same_steps(study, tiny):
    assert tiny.reference("fsq-L2-ans-clr0-s1x3") == "fp16-s1x3"
    rows = [_row("fp16", 0, 60.0, 380.0), _row("fp16", 1, 62.0, 388.0),
            _row("fp16-s1x3", 0, 66.0, 380.0), _row("fp16-s1x3", 1, 70.0, 388.0),
            _row("fsq-L2-ans-clr0-s1x3", 0, 65.0, 380.0), _row("fsq-L2-ans-clr0-s1x3", 1, 67.0, 388.0)]
    items = {it["config"]: it for it in study.summary(tiny, rows)}
    cell = items["fsq-L2-ans-clr0-s1x3"]["suites"]["soc-vqa"]
    assert items["fsq-L2-ans-clr0-s1x3"]["reference"] == "fp16-s1x3"
    # against fp16-s1x3 (mean 68): -2 (against plain fp16 it would read +5)
    assert cell["delta_vs_fp16"] == pytest.approx(-2.0) and cell["paired_delta"] == pytest.approx(-2.0)
    assert cell["paired_se"] == pytest.approx(1.0) and cell["within_target"] is True
    assert items["fp16-s1x3"]["suites"]["soc-vqa"]["delta_vs_fp16"] == pytest.approx(7.0)  # vs plain fp16
    table = study.summary_table(list(items.values()))
    assert "(-2.0 \u00b11.0)" in table


def test_every_study_file_loads_and_names_its_targets(study):
    """The studies are data: each file under configs/study loads, every job names a configuration, and the smol
    study names the configurations behind its three claims, each with its tolerance."""
    files = sorted(study.STUDIES.glob("*.toml"))
    assert {f.stem for f in files} >= {"tiny", "smol"}
    for f in files:
        spec = study.load_study(f)
        assert spec.jobs and all(name in spec.configs for name, _ in spec.jobs)
    smol = study.load_study(study.STUDIES / "smol.toml")
    assert set(smol.targets) == {"L4", "L2", "whole_step"}
    assert {role: smol.target(name) for role, name in smol.targets.items()} == {"L4": 1.0, "L2": 3.0,
                                                                                "whole_step": 1.0}
    for name in smol.targets.values():  # at least 3 seeds of each, paired with fp16's
        assert {s for n, s in smol.jobs if n == name} >= {0, 1, 2} <= {s for n, s in smol.jobs if n == "fp16"}


def test_a_bad_study_file_is_refused_naming_the_field(study, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "tiny"\nbase = "b"\nout = "o"\nresults = "r"\njobs = ["fp16/0", "nope/1"]\n'
                   '[configs.fp16]\nset = []\n')
    with pytest.raises(SystemExit, match=r"bad.toml: jobs: 'nope/1'"):
        study.load_study(bad)
    bad.write_text('preset = "tiny"\nbase = "b"\nout = "o"\nresults = "r"\njobs = []\n[configs.fp16]\nsett = []\n')
    with pytest.raises(SystemExit, match=r"configs.fp16: unknown fields \['sett'\]"):
        study.load_study(bad)


def test_target_verdicts_need_every_suite_three_seeds_and_the_budget(study):
    smol = study.load_study(study.STUDIES / "smol.toml")

    def row(config, seed, pts, frac):
        return {"config": config, "seed": seed, "suites": {s: pts for s in study.HEADLINE},
                "chance_or_majority": {}, "uplink_bits_per_element": 1.0, "total_fraction_of_fp16": frac}
    rows = [row("fp16", s, 60.0, 1.0) for s in range(3)] + [row("fsq-L4-ans-int4ans", s, 59.5, 0.09) for s in range(3)]
    rows += [row("fsq-L4-ans", s, 58.0, 0.5) for s in range(3)] + [row("fsq-L2-ans", s, 58.0, 0.5) for s in range(2)]
    v = study.target_verdicts(smol, study.summary(smol, rows))
    assert v["whole_step"]["met"] is True and v["whole_step"]["checks"]["within_budget"] is True
    assert v["L4"]["met"] is False and v["L4"]["checks"]["suites_within_tolerance"] is False  # 2 points below
    assert v["L2"]["met"] is False and v["L2"]["checks"] == {"suites_within_tolerance": True, "enough_seeds": False}
    rows[3]["total_fraction_of_fp16"] = rows[4]["total_fraction_of_fp16"] = rows[5]["total_fraction_of_fp16"] = 0.2
    assert study.target_verdicts(smol, study.summary(smol, rows))["whole_step"]["checks"]["within_budget"] is False
