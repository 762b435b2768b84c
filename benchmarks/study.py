"""The rate-accuracy study: from ONE stage-0 base, stages 1 and 2 for every configuration, same data, steps and seeds;
accuracy on the five suites against the bits really sent in both directions.

    nohup .venv/bin/python benchmarks/study.py --preset smol > runs/study-smol.log 2>&1 &   # resumable
    .venv/bin/python benchmarks/study.py --preset smol --report-only        # rebuild results/ from finished runs

What is studied is data: configs/study/<preset>.toml names the base, the steps every row gets, the configurations
(overrides on top of the preset, each with the question it answers and its target), the jobs in priority order and,
where the preset has them, the configurations the project stands behind (`targets`). The fp16 row of seed 0 is the
baseline benchmark's run (`reference_run`: the same base, steps and configuration) when it is finished. Jobs run as
`qtllava pipeline --base ...` subprocesses, `workers` at a time with `threads` torch threads each. Finished jobs are
skipped; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("study")

STUDIES = Path(__file__).resolve().parents[1] / "configs" / "study"
MME_MAX = 800.0
# The whole step's budget: both directions together at most this share of what fp16 both ways sends.
WHOLE_STEP_BUDGET = 0.125


@dataclass
class Study:
    """One study's definition (configs/study/<preset>.toml)."""
    preset: str
    steps: list[str]
    base: str
    reference_run: str
    out: str
    results: str
    configs: dict[str, dict]
    jobs: list[tuple[str, int]]
    workers: int = 1
    threads: int = 1
    targets: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def overrides(self, name: str) -> list[str]:
        return list(self.configs[name].get("set", []))

    def reference(self, name: str) -> str:
        return self.configs.get(name, {}).get("reference", "fp16")

    def target(self, name: str) -> float | None:
        return self.configs.get(name, {}).get("target")


def load_study(path: str | Path) -> Study:
    """Read and check a study file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the study: {e}") from None
    configs = raw.get("configs", {})
    if "fp16" not in configs:
        raise SystemExit(f"{path}: configs: the reference configuration 'fp16' is missing")
    jobs = []
    for item in raw.get("jobs", []):
        name, _, seed = str(item).rpartition("/")
        if name not in configs or not seed.isdigit():
            raise SystemExit(f"{path}: jobs: {item!r} is not '<configuration>/<seed>' of a configuration in [configs]")
        jobs.append((name, int(seed)))
    for name, c in configs.items():
        if c.get("reference", "fp16") not in configs:
            raise SystemExit(f"{path}: configs.{name}.reference: no configuration {c['reference']!r}")
        unknown = set(c) - {"about", "set", "target", "reference"}
        if unknown:
            raise SystemExit(f"{path}: configs.{name}: unknown fields {sorted(unknown)}")
    for role, name in raw.get("targets", {}).items():
        if name not in configs:
            raise SystemExit(f"{path}: targets.{role}: no configuration {name!r}")
    try:
        return Study(preset=raw["preset"], steps=list(raw.get("steps", [])), base=raw["base"],
                     reference_run=raw.get("reference_run", ""), out=raw["out"], results=raw["results"],
                     configs=configs, jobs=jobs, workers=int(raw.get("workers", 1)),
                     threads=int(raw.get("threads", 1)), targets=dict(raw.get("targets", {})), source=str(path))
    except KeyError as e:
        raise SystemExit(f"{path}: the field {e.args[0]!r} is missing") from None


def run(cmd: list[str], logfile: Path, env: dict | None = None) -> int:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def job_dir(spec: Study, out: Path, name: str, seed: int, use_reference: bool) -> Path:
    """Where a run lives; fp16 seed 0 is the baseline benchmark's run when the study starts from the study's own
    base and that run is finished."""
    ref = Path(spec.reference_run) if spec.reference_run else None
    if (name, seed) == ("fp16", 0) and use_reference and ref is not None and (ref / "eval.json").exists():
        return ref
    return out / name / f"seed{seed}"


def _metrics(stage_dir: Path) -> dict:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line]
    el = sum(r["elements_up"]["image"] + r["elements_up"]["text"] for r in rows)
    up = sum(r["payload_up"]["image"] + r["payload_up"]["text"] for r in rows)
    down = sum(r["payload_down"]["image"] + r["payload_down"]["text"] for r in rows)
    samples = sum(r["samples"] for r in rows)
    return {"uplink_bits_per_element": 8 * up / el, "downlink_bits_per_element": 8 * down / el,
            "bytes_per_sample_up": sum(r["bytes_up"] for r in rows) / samples,
            "bytes_per_sample_down": sum(r["bytes_down"] for r in rows) / samples,
            "steps": len(rows), "seconds": sum(r["seconds"] for r in rows)}


def collect(spec: Study, out: Path, use_reference: bool, kept: list[dict] = ()) -> list[dict]:
    """A row per finished job of the study; where a run's folder is gone (a fresh checkout has no runs/), its row
    from `kept` (the previous result) if there is one, marked with `"kept": true`."""
    old = {(r["config"], r["seed"]): {**r, "kept": True} for r in kept}
    rows = []
    for name, seed in spec.jobs:
        d = job_dir(spec, out, name, seed, use_reference)
        if not (d / "eval.json").exists():
            if (name, seed) in old:
                rows.append(old[(name, seed)])
            continue
        ev = json.loads((d / "eval.json").read_text())
        pipeline = json.loads((d / "pipeline.json").read_text())
        m2 = _metrics(d / "stage2")
        m1 = _metrics(d / "stage1")
        suites = {s: r["ours"] for s, r in ev.items()}
        if "soc-vqa" in ev:
            det = ev["soc-vqa"]["details"]
            suites["soc-vqa/relational"] = det.get("relational")
            suites["soc-vqa/non-relational"] = det.get("non-relational")
        floor = {s: max(r["chance"], r["majority"]) for s, r in ev.items() if "chance" in r and "majority" in r}
        rows.append({"config": name, "seed": seed, "suites": suites, "chance_or_majority": floor, **{k: m2[k] for k in (
            "uplink_bits_per_element", "downlink_bits_per_element", "bytes_per_sample_up", "bytes_per_sample_down")},
            "stage1": m1, "stage2": m2,
            "wall_s": round(sum(s["wall_s"] for k, s in pipeline["stages"].items() if k != "stage0"), 1)})
    ref = [r for r in rows if r["config"] == "fp16" and r["seed"] == 0]
    if ref:
        ref_total = ref[0]["bytes_per_sample_up"] + ref[0]["bytes_per_sample_down"]
        for r in rows:
            r["total_fraction_of_fp16"] = (r["bytes_per_sample_up"] + r["bytes_per_sample_down"]) / ref_total
            r["uplink_fraction_of_fp16"] = r["bytes_per_sample_up"] / ref[0]["bytes_per_sample_up"]
            r["downlink_fraction_of_fp16"] = r["bytes_per_sample_down"] / ref[0]["bytes_per_sample_down"]
    return rows


def pending(spec: Study, only: list[str] | None, kept: list[dict] = (),
            seeds: list[int] | None = None) -> list[tuple[str, int]]:
    """The study's jobs to run, in order: those of the configurations in `only` (all when empty) and of `seeds`
    (all when None), less those with a row in `kept` (the previous result: a finished run of the same base, not
    trained again)."""
    jobs = [(n, s) for n, s in spec.jobs if (not only or n in only) and (seeds is None or s in seeds)]
    done = {(r["config"], r["seed"]) for r in kept}
    todo = [j for j in jobs if j not in done]
    if len(todo) < len(jobs):
        log.info("%d of %d jobs have rows in the previous result; not run again", len(jobs) - len(todo), len(jobs))
    return todo


HEADLINE = ["soc-vqa", "soc-mc", "glyph-vqa", "shape-pope", "shape-mme"]


def _points(suite: str, value: float) -> float:
    """A suite's headline in percentage points (shape-mme: percent of its maximum summed score)."""
    return 100.0 * value / MME_MAX if suite == "shape-mme" else value


def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample std / sqrt(n); None for fewer than two values)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def summary(spec: Study, rows: list[dict]) -> list[dict]:
    """Per configuration: mean and range over seeds per suite, the difference to its reference's mean in points
    (fp16 unless the configuration names another: fp16 given the same steps), the difference paired by seed with
    its standard error, and the verdict against the configuration's target (within the tolerance below the
    reference, and within the larger of the two seed ranges where both have several seeds)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    fp16 = by.get("fp16", [])
    floors = fp16[0].get("chance_or_majority", {}) if fp16 else {}
    # a suite where the fp16 model itself is not above chance and majority compares guesses with guesses
    informative = {s: sum(r["suites"][s] for r in fp16) / len(fp16) > floors[s]
                   for s in HEADLINE if s in floors and all(s in r["suites"] for r in fp16)}
    out = []
    for name, rs in by.items():
        ref_name = spec.reference(name)
        ref = by.get(ref_name, [])
        item = {"config": name, "seeds": [r["seed"] for r in rs], "suites": {}, "reference": ref_name,
                "uplink_bits_per_element": sum(r["uplink_bits_per_element"] for r in rs) / len(rs),
                "total_fraction_of_fp16": sum(r.get("total_fraction_of_fp16", float("nan")) for r in rs) / len(rs)}
        for suite in HEADLINE:
            vals = [_points(suite, r["suites"][suite]) for r in rs if suite in r["suites"]]
            refs = [_points(suite, r["suites"][suite]) for r in ref if suite in r["suites"]]
            if not vals:
                continue
            cell = {"mean": sum(vals) / len(vals), "range": max(vals) - min(vals),
                    "fp16_above_chance_and_majority": informative.get(suite)}
            if refs:  # "delta_vs_fp16" keeps its name in the JSON; it is against the row's reference
                cell["delta_vs_fp16"] = cell["mean"] - sum(refs) / len(refs)
                # paired by seed (the same batches in the same order): the standard error of the mean difference
                ref_by_seed = {r["seed"]: r["suites"][suite] for r in ref if suite in r["suites"]}
                diffs = [_points(suite, r["suites"][suite]) - _points(suite, ref_by_seed[r["seed"]])
                         for r in rs if suite in r["suites"] and r["seed"] in ref_by_seed]
                if len(diffs) > 1 and name != ref_name:
                    cell["paired_delta"], cell["paired_se"] = mean_and_se(diffs)
                spread = max(max(refs) - min(refs), cell["range"]) if len(refs) > 1 else None
                cell["within_seed_spread"] = None if spread is None else abs(cell["delta_vs_fp16"]) <= spread
                if spec.target(name) is not None:
                    cell["within_target"] = cell["delta_vs_fp16"] >= -spec.target(name)
            item["suites"][suite] = cell
        out.append(item)
    return out


def target_verdicts(spec: Study, items: list[dict], min_seeds: int = 3) -> dict:
    """For each configuration the project stands behind (spec.targets: role -> configuration), whether it meets its
    target: every headline suite within the tolerance of fp16, at least `min_seeds` seeds paired with fp16's, and
    for the whole step both directions together at most WHOLE_STEP_BUDGET of fp16's bytes."""
    by = {it["config"]: it for it in items}
    fp16_seeds = set(by["fp16"]["seeds"]) if "fp16" in by else set()
    out = {}
    for role, name in spec.targets.items():
        it = by.get(name)
        entry = {"config": name, "about": spec.configs[name].get("about", ""),
                 "tolerance_points": spec.target(name)}
        if it is None:
            out[role] = {**entry, "seeds": 0, "met": None, "why": "no finished run yet"}
            continue
        paired = sorted(set(it["seeds"]) & fp16_seeds)
        suites = {s: {k: c.get(k) for k in ("mean", "delta_vs_fp16", "paired_delta", "paired_se", "within_target")}
                  for s, c in it["suites"].items()}
        within = all(c.get("within_target") is True for c in it["suites"].values()) and len(suites) == len(HEADLINE)
        entry.update(seeds=len(it["seeds"]), seeds_paired_with_fp16=len(paired), suites=suites,
                     total_fraction_of_fp16=it["total_fraction_of_fp16"])
        checks = {"suites_within_tolerance": within, "enough_seeds": len(paired) >= min_seeds}
        if role == "whole_step":
            checks["within_budget"] = it["total_fraction_of_fp16"] <= WHOLE_STEP_BUDGET
        entry["checks"] = checks
        entry["met"] = all(checks.values())
        out[role] = entry
    return out


def summary_table(items: list[dict]) -> str:
    head = "| config | seeds | " + " | ".join(HEADLINE) + " | up bits/el | total / fp16 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for it in items:
        cells = []
        for suite in HEADLINE:
            c = it["suites"].get(suite)
            if c is None:
                cells.append("")
                continue
            text = ("" if c.get("fp16_above_chance_and_majority", True) else "~") + f"{c['mean']:.1f}"
            if "delta_vs_fp16" in c and it["config"] != it.get("reference", "fp16"):
                se = f" \u00b1{c['paired_se']:.1f}" if "paired_se" in c else ""
                text += f" ({c['delta_vs_fp16']:+.1f}{se}{'' if c.get('within_target', True) else ' !'})"
            if len(it["seeds"]) > 1:
                text += f" r{c['range']:.1f}"
            cells.append(text)
        lines.append(f"| {it['config']} | {len(it['seeds'])} | " + " | ".join(cells) +
                     f" | {it['uplink_bits_per_element']:.3f} | {it['total_fraction_of_fp16']:.4f} |")
    return "\n".join(lines)


def targets_table(verdicts: dict) -> str:
    lines = ["| target | config | seeds | met | " + " | ".join(HEADLINE) + " | total / fp16 |",
             "|" + "---|" * (5 + len(HEADLINE))]
    for role, v in verdicts.items():
        cells = []
        for suite in HEADLINE:
            c = v.get("suites", {}).get(suite)
            cells.append("" if not c or c.get("delta_vs_fp16") is None else f"{c['delta_vs_fp16']:+.1f}")
        met = {True: "yes", False: "no", None: "pending"}[v["met"]]
        frac = v.get("total_fraction_of_fp16")
        lines.append(f"| {role} (within {v['tolerance_points']} points) | {v['config']} | {v['seeds']} | {met} | "
                     + " | ".join(cells) + f" | {'' if frac is None else f'{frac:.4f}'} |")
    return "\n".join(lines)


def report(spec: Study, rows: list[dict], path_md: Path, path_png: Path, how: str) -> str:
    head = (f"| config | seed | {' | '.join(HEADLINE)} | rel | non-rel | up bits/el | down bits/el | "
            f"up B/sample | down B/sample | total / fp16 | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["suites"]
        cells = [f"{s.get(k, float('nan')):.1f}" for k in HEADLINE]
        cells += [f"{s.get('soc-vqa/relational') or float('nan'):.1f}",
                  f"{s.get('soc-vqa/non-relational') or float('nan'):.1f}"]
        lines.append(f"| {r['config']} | {r['seed']} | " + " | ".join(cells) +
                     f" | {r['uplink_bits_per_element']:.3f} | {r['downlink_bits_per_element']:.3f} | "
                     f"{r['bytes_per_sample_up']:.0f} | {r['bytes_per_sample_down']:.0f} | "
                     f"{r.get('total_fraction_of_fp16', float('nan')):.4f} | {r['wall_s']:.0f} |")
    text = "\n".join(lines)
    items = summary(spec, rows)
    summ = summary_table(items)
    targets = ""
    if spec.targets:
        targets = ("## Targets\n\nThe configurations the project stands behind, each against fp16 paired by seed "
                   f"(points; met = every suite within the tolerance, at least 3 seeds, and for the whole step both "
                   f"directions at most {WHOLE_STEP_BUDGET:.1%} of fp16's bytes).\n\n"
                   f"{targets_table(target_verdicts(spec, items))}\n\n")
    abouts = "\n".join(f"- `{name}`: {c.get('about', '')}" for name, c in spec.configs.items()
                       if any(r["config"] == name for r in rows))
    path_md.write_text(f"# Rate-accuracy study: {spec.preset}\n\n{how}\n\n{targets}## Means over seeds\n\n"
                       "Points (percent; shape-mme in percent of its maximum 800); in brackets the difference to the "
                       "reference's mean (fp16 unless the configuration names another), `!` where it falls short of "
                       "the configuration's target, and after +- the standard error of the difference paired by seed "
                       "(same batches) where two or more seeds pair up; r = range over the seeds; ~ marks a suite "
                       "where fp16 itself is not above chance and majority (there the comparison is between "
                       f"guesses).\n\n{summ}\n\n## Configurations\n\n{abouts}\n\n## Runs\n\n{text}\n")
    text = f"{text}\n\n{summ}"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(HEADLINE), figsize=(4 * len(HEADLINE), 3.6))
        for ax, suite in zip(axes, HEADLINE):
            for r in rows:
                x, y = r["uplink_bits_per_element"], r["suites"].get(suite)
                if y is None:
                    continue
                ax.scatter(x, y, s=18)
                ax.annotate(f"{r['config']}/{r['seed']}", (x, y), fontsize=6)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("uplink bits / element (sent)")
            ax.set_title(suite)
        axes[0].set_ylabel("score (percent; MME: summed score)")
        fig.tight_layout()
        fig.savefig(path_png, dpi=110)
    except ImportError:  # pragma: no cover
        log.warning("matplotlib missing: no plot")
    return text


def _effective_steps(overrides: list[str]) -> list[str]:
    """The stage step counts that `overrides` leave in force (a later override of a key wins)."""
    last = {o.split("=", 1)[0]: o for o in overrides if o.startswith("train.stage") and ".steps=" in o}
    return [last[k] for k in sorted(last)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", "--config", dest="preset", default="tiny",
                   help="the preset whose study to run: configs/study/<preset>.toml (default tiny)")
    p.add_argument("--study", help="a study file instead of configs/study/<preset>.toml")
    p.add_argument("--out", help="run folder (default: the study's `out`)")
    p.add_argument("--base", help="a finished stage-0 folder (default: the study's `base`); another base than the "
                   "study's does not reuse the baseline's run as fp16 seed 0")
    p.add_argument("--workers", type=int, help="jobs at a time (default: the study's)")
    p.add_argument("--threads", type=int, help="torch threads per job (default: the study's)")
    p.add_argument("--only", nargs="*", help="configuration names to run (default: all, in the study's order)")
    p.add_argument("--seeds", type=int, nargs="*", help="only these seeds of the study's jobs (default: all)")
    p.add_argument("--results", help="where the report goes: RESULTS.json, .md and .png (default: the study's "
                   "`results`); with another --out and --keep \"\" a row can be trained again apart from the study "
                   "to check it reproduces")
    p.add_argument("--set", "-o", action="append", default=[])
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--keep", help="rows of runs whose folders are gone are kept from this earlier result, and their "
                   "jobs are not run again (default: the study's results JSON; \"\" = none); valid only while the "
                   "base is the same")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = load_study(args.study or STUDIES / f"{args.preset}.toml")
    out = Path(args.out or spec.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results or spec.results)
    keep = f"{spec.results}.json" if args.keep is None else args.keep
    workers, threads = args.workers or spec.workers, args.threads or spec.threads
    exe = [sys.executable, "-m", "qtllava.cli"]
    common = ["--config", spec.preset] + [x for s in spec.steps + args.set for x in ("-o", s)]
    base = Path(args.base or spec.base)
    use_reference = args.base is None and not args.set
    if not args.report_only and not (base / "DONE").exists():
        if args.base:
            raise SystemExit(f"--base {base}: not a finished stage folder (no DONE file)")
        base = out / "base" / "stage0" / "final"
        use_reference = False
        if not (base / "DONE").exists():
            log.info("training the stage-0 base into %s", base.parent)
            rc = run(exe + ["train", "--stage", "stage0", "--out", str(base.parent), "--resume"] + common,
                     out / "base.log")
            if rc:
                raise SystemExit(f"stage 0 failed (rc {rc}); see {out / 'base.log'}")
    kept = json.loads(Path(keep).read_text())["rows"] if keep and Path(keep).exists() else []
    jobs = pending(spec, args.only, kept, args.seeds)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))

    def one(job):
        name, seed = job
        d = job_dir(spec, out, name, seed, use_reference)
        if (d / "eval.json").exists():
            return name, seed, 0, 0.0
        if (name, seed) == ("fp16", 0) and use_reference and spec.reference_run:
            log.info("fp16 seed 0 is the baseline benchmark's run (%s); run the baseline to finish it",
                     spec.reference_run)
            return name, seed, 0, 0.0
        t0 = time.perf_counter()
        cmd = exe + ["pipeline", "--out", str(d), "--resume", "--base", str(base)] + common + \
            [x for s in spec.overrides(name) + [f"train.seed={seed}", f"train.threads={threads}"] for x in ("-o", s)]
        rc = run(cmd, d.with_suffix(".log"), env)
        log.info("%s seed %d: rc %d in %.0f s", name, seed, rc, time.perf_counter() - t0)
        return name, seed, rc, time.perf_counter() - t0

    if not args.report_only:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for name, seed, rc, _ in pool.map(one, jobs):
                if rc:
                    log.error("%s seed %d failed; see %s", name, seed,
                              job_dir(spec, out, name, seed, use_reference).with_suffix(".log"))
    rows = collect(spec, out, use_reference, kept)
    n_kept = sum(1 for r in rows if r.get("kept"))
    if n_kept:
        log.info("%d of %d rows kept from %s (their run folders are gone)", n_kept, len(rows), keep)
    flags = "".join(f" --set {x}" for x in args.set) + (f" --base {args.base}" if args.base else "") + \
        (f" --out {args.out}" if args.out else "")
    steps = ", ".join(_effective_steps(spec.steps + args.set)) or "the preset's own"
    how = (f"Command: `python benchmarks/study.py --preset {spec.preset}{flags}` ({len(rows)} runs); study "
           f"configs/study/{Path(spec.source).name}; steps {steps}; base {base}; machine {platform.machine()} "
           f"{os.cpu_count()} cores, {threads} torch thread(s) per job, "
           f"{workers} job(s) at a time. Scores in percent (shape-mme: summed MME score); bits per element are payload "
           "bits actually sent per feature element in stage 2; bytes per sample are whole serialized messages per "
           "training sample in stage 2; wall s = stages 1 and 2 (the shared stage 0 not counted)." +
           (f" {n_kept} rows were kept from the previous {keep} (run folders gone; same base)." if n_kept else ""))
    results.parent.mkdir(parents=True, exist_ok=True)
    items = summary(spec, rows)
    doc = {"how": how, "preset": spec.preset, "rows": rows, "summary": items}
    if spec.targets:
        doc["targets"] = target_verdicts(spec, items)
    results.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    print(report(spec, rows, results.with_suffix(".md"), results.with_suffix(".png"), how))
    if spec.targets:
        print(targets_table(doc["targets"]))


if __name__ == "__main__":
    main()
