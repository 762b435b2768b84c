"""The 16-bit baseline: a preset trained through stages 0-2 with fp16 both ways, long enough to be clearly above
chance and majority on every suite; writes results/baseline-<preset>.json (results/baseline.json for tiny) and
prints the table.

Resumable and safe in the background:
    nohup .venv/bin/python benchmarks/baseline.py --config smol > runs/baseline-smol.log 2>&1 &
Re-running continues an interrupted run (finished stages are skipped, the current one resumes from its last
checkpoint). Steps are overridable: `--set train.stage0.steps=2000` etc.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import torch

from qtllava.config import load_config, to_dict
from qtllava.eval.runner import format_table
from qtllava.model.weights import ensure_weights, read_provenance
from qtllava.pipeline import run_pipeline

# The 16-bit reference: fp16 both ways whatever the preset's codecs (the smol preset's are the product's fsq)
FP16 = ['compress.image.name="identity"', 'compress.image.dtype="fp16"', 'compress.text.name="identity"',
        'compress.text.dtype="fp16"', 'compress.downlink="fp16"']
# Per preset: long enough to learn the suites on 2 CPU cores. tiny: stage 0 about 70 min at 2 threads (12000 steps
# were too short in three runs, docs/experiments.md). smol: the preset's own schedule (stage 0 about 2 h, stages 1-2
# about 40 min); the demo uses a short one.
BASELINE_STEPS = {
    "tiny": ["train.stage0.steps=24000", "train.stage1.steps=300", "train.stage2.steps=800",
             "train.checkpoint_every=200", "eval.limit=0"],
    "smol": ["eval.limit=0", *FP16],
}


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", "-o", action="append", default=[])
    p.add_argument("--out", help="run folder (default: runs/baseline for tiny, runs/baseline-<preset> otherwise)")
    p.add_argument("--results", help="default: results/baseline.json for tiny, results/baseline-<preset>.json")
    p.add_argument("--base", help="a finished stage-0 folder (client/ + server/) to start stage 1 from instead of "
                   "training stage 0, e.g. bases/smol-stage0")
    p.add_argument("--warm-start", help="stage 0 starts from this folder's client/ and server/ weights instead of "
                   "fresh ones (a finished stage folder with client/ and server/)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = BASELINE_STEPS.get(args.config, []) + args.set
    cfg = load_config(args.config, overrides)
    suffix = "" if cfg.name == "tiny" else f"-{cfg.name}"
    args.out = args.out or f"runs/baseline{suffix}"
    args.results = args.results or f"results/baseline{suffix}.json"
    if cfg.llm.pretrained and cfg.llm.package and not Path(cfg.llm.pretrained).exists():
        ensure_weights(cfg.llm.package, cfg.llm.pretrained)
    t0 = time.perf_counter()
    result = run_pipeline(cfg, Path(args.out), resume=True, progress=False, warm_start=args.warm_start,
                          base=args.base)
    wall = time.perf_counter() - t0
    suites = {name: {"ours": r["ours"], "chance": r["chance"], "majority": r["majority"], "metric": r["metric"],
                     "n": r["details"]["n"]} for name, r in result["eval"].items()}
    out = {
        "command": f"python benchmarks/baseline.py --config {args.config} " + " ".join(f"--set {s}" for s in args.set)
        + (f" --warm-start {args.warm_start}" if args.warm_start else "") + (f" --base {args.base}" if args.base else ""),
        "preset": cfg.name,
        "overrides": overrides,
        "steps": {s: getattr(cfg.train, s).steps for s in ("stage0", "stage1", "stage2")},
        "wall_s_this_invocation": round(wall, 1),
        "stage_wall_s": {s: round(r["wall_s"], 1) for s, r in result["stages"].items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "git": _git_rev(),
        "compress": to_dict(cfg)["compress"],
        "suites": suites,
        "above_chance_and_majority": {n: s["ours"] > max(s["chance"], s["majority"]) for n, s in suites.items()},
    }
    if cfg.llm.pretrained:
        prov = read_provenance(cfg.llm.pretrained) or {}
        out["llm"] = {"folder": cfg.llm.pretrained, "model": prov.get("model", ""), "package": prov.get("package", ""),
                      "version": prov.get("version", ""), "sha256": prov.get("member_sha256", ""),
                      "wheel_sha256": prov.get("wheel_sha256", ""), "converted": prov.get("converted", "")}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=2))
    print(format_table(result["eval"]))
    print(result["traffic_table"])
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
