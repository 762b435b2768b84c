"""What the wire reveals, per compressor: image inversion, text recovery and label exposure.

    make bench-privacy                       # installs dataset-fashion-mnist (Debian) first, then runs this
    .venv/bin/python benchmarks/privacy.py   # resumable: finished configurations are skipped
    .venv/bin/python benchmarks/privacy.py --report-only

Checkpoints: the study's (`runs/study/<config>/seed0/stage2/final`, or `--checkpoints DIR` laid out the same way)
where they exist; otherwise short ones trained here from a stage-0 base (the baseline's `runs/baseline/stage0/final`
when it exists, else a stage 0 trained here with the preset's steps), with stage 1 and stage 2 shortened to
`--stage1-steps` / `--stage2-steps`. Attacks on short checkpoints measure what the codec and the client reveal; the
accuracy column comes from `results/study.json` when the study has run.

Writes results/privacy.json (`rows`: one per configuration, attacker and image set; `labels`: one per
configuration), results/privacy.md and results/privacy.png (originals against white- and black-box reconstructions).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

CONFIGS: dict[str, list[str]] = {  # name (as the study names it) -> overrides of both modalities' codecs
    "fp16": ['compress.{m}.name="identity"', 'compress.{m}.dtype="fp16"'],
    "fsq-L16-ans": ['compress.{m}.name="fsq"', "compress.{m}.levels=16", 'compress.{m}.coder="ans"'],
    "fsq-L4-ans": ['compress.{m}.name="fsq"', "compress.{m}.levels=4", 'compress.{m}.coder="ans"'],
    "fsq-L2-ans": ['compress.{m}.name="fsq"', "compress.{m}.levels=2", 'compress.{m}.coder="ans"'],
    "nf2": ['compress.{m}.name="nf"', "compress.{m}.bits=2"],
    "topk2": ['compress.{m}.name="topk"', "compress.{m}.bits=2"],
}
ORDER = ["fp16", "fsq-L4-ans", "fsq-L2-ans", "fsq-L16-ans", "nf2", "topk2"]
GRID_IMAGES = 6  # scenes per configuration in the PNG grid

log = logging.getLogger("privacy")


def overrides(name: str) -> list[str]:
    return [o.format(m=m) for m in ("image", "text") for o in CONFIGS[name]] + ['compress.downlink="fp16"']


def find_checkpoint(name: str, roots: list[Path]) -> Path | None:
    for root in roots:
        for cand in (root / name / "seed0" / "stage2" / "final", root / name / "stage2" / "final"):
            if (cand / "DONE").exists():
                return cand
    return None


def train_checkpoint(name: str, args, base: Path, data_root: Path) -> Path:
    from qtllava.config import load_config
    from qtllava.pipeline import run_pipeline

    out = Path(args.out) / "ckpt" / name
    sets = overrides(name) + [f"train.stage1.steps={args.stage1_steps}", f"train.stage2.steps={args.stage2_steps}",
                              "train.threads=1", "train.checkpoint_every=1000"]
    cfg = load_config(args.config, sets)
    mark = out / "BASE"
    if mark.exists() and Path(mark.read_text().strip()) != Path(base):
        raise SystemExit(f"{out} was trained from {mark.read_text().strip()}, not {base}: remove it to retrain")
    out.mkdir(parents=True, exist_ok=True)
    mark.write_text(str(base))
    run_pipeline(cfg, out, data_root=data_root, resume=True, base=base, evaluate=False, progress=False)
    return out / "stage2" / "final"


def base_of(ckpt: Path, args) -> Path | None:
    """The stage-0 base a checkpoint started from (the black-box attacker's public model)."""
    mark = Path(ckpt).parent.parent / "BASE"
    if mark.exists():
        return Path(mark.read_text().strip())
    for cand in (Path(args.base), Path(args.checkpoints) / "base" / "stage0" / "final"):
        if (cand / "DONE").exists():
            return cand
    return None


def known_base(args) -> Path | None:
    """The stage-0 base the checkpoints started from: the baseline's, the study's or one trained here."""
    for cand in (Path(args.base), Path(args.checkpoints) / "base" / "stage0" / "final",
                 Path(args.out) / "base" / "stage0" / "final"):
        if (cand / "DONE").exists():
            return cand
    return None


def stage0_base(args, data_root: Path) -> Path:
    found = known_base(args)
    if found is not None:
        return found
    from qtllava.config import load_config
    from qtllava.train.loop import run_stage

    log.info("training a stage-0 base (%s preset steps) into %s", args.config, Path(args.out) / "base")
    cfg = load_config(args.config, ["train.threads=1"])
    run = run_stage(cfg, "stage0", data_root, Path(args.out) / "base" / "stage0", resume=True, progress=False)
    return run.final


def settings(args):
    from qtllava.privacy.nets import InversionConfig
    from qtllava.privacy.suite import SuiteSettings, micro_settings

    if args.config == "micro":
        return micro_settings()
    return SuiteSettings(inversion=InversionConfig(steps=args.inversion_steps), aux_scenes=args.aux_scenes,
                         aux_fashion=args.aux_fashion, aux_crops=args.aux_crops,
                         surrogate_steps=args.surrogate_steps)


def attack_config(name: str, ckpt: Path, base: Path, data_root: Path, args) -> dict:
    """Every attack on one checkpoint -> {"rows", "labels", "grid", "timings"}."""
    from qtllava.privacy.suite import FashionMissing, PrivacyRun

    run = PrivacyRun(ckpt, data_root, Path(args.out) / "work" / name, settings(args), base=base,
                     probe_dir=Path(args.out) / "work" / "probes")
    rows, grid = [], {}
    for attacker in ("white", "black"):
        for image_set in ("scenes", "fashion", "skimage"):
            try:
                row, orig, recon = run.image_attack(attacker, image_set)
            except FashionMissing as e:
                log.warning("%s", e)
                continue
            row.update(run.text_attack(attacker, image_set))
            row["config"] = name
            rows.append(row)
            log.info("%s %s %s: psnr %.2f ssim %.3f semantic %s text %.3f", name, attacker, image_set,
                     row["psnr"], row["ssim"], row["semantic"], row["text_token_acc"])
            k = GRID_IMAGES if image_set == "scenes" else 3
            grid.setdefault("orig", {})[image_set] = orig[:k]
            grid.setdefault(attacker, {})[image_set] = recon[:k]
    labels = run.label_attack()
    labels["config"] = name
    return {"rows": rows, "labels": labels, "grid": grid, "timings": run.timings, "checkpoint": str(ckpt)}


def own_accuracy(ckpt: str, data_root: Path, limit: int) -> dict:
    """Headline metric per suite (percent; shape-mme as its summed score) of a checkpoint, `limit` questions each."""
    from qtllava.eval.model_answer import evaluate_checkpoint_results
    from qtllava.privacy.session import checkpoint_config

    res = evaluate_checkpoint_results(checkpoint_config(ckpt), Path(ckpt), data_root, limit=limit)
    return {"suites": {s: r["ours"] for s, r in res.items()}, "limit": limit}


def mean_image_rows(ckpt: str, base, data_root: Path, args) -> list[dict]:
    """The reference every inversion must beat: the attacker's mean auxiliary image as the guess for every image."""
    from qtllava.privacy.suite import FashionMissing, PrivacyRun

    run = PrivacyRun(ckpt, data_root, Path(args.out) / "work" / ORDER[0], settings(args), base=base,
                     probe_dir=Path(args.out) / "work" / "probes")
    rows = []
    for image_set in ("scenes", "fashion", "skimage"):
        try:
            rows.append(run.mean_image_baseline(image_set))
        except FashionMissing:
            continue
    return rows


# --- report ------------------------------------------------------------------------------------------------------


def _f(v, fmt="{:.2f}"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def accuracy(results: dict, done_dir: Path, study: Path) -> dict[str, dict]:
    """config -> {"suites": ...}: measured here for checkpoints trained here, else the study's row (seed 0)."""
    rows = json.loads(study.read_text()).get("rows", []) if study.exists() else []
    out = {r["config"]: r for r in rows if r.get("seed", 0) == 0}
    for name, res in results.items():
        f = done_dir / f"{name}-accuracy.json"
        if res["source"] != "study":
            out.pop(name, None)
            if f.exists():
                out[name] = json.loads(f.read_text())
    return out


def write_report(results: dict, baseline: list[dict], acc: dict, out_json: Path, how: str) -> None:
    rows = [r for name in ORDER if name in results for r in results[name]["rows"]]
    labels = [results[name]["labels"] for name in ORDER if name in results]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"how": how, "rows": [_json_safe(r) for r in rows],
                                    "baseline": [_json_safe(r) for r in baseline],
                                    "labels": [_json_safe(x) for x in labels],
                                    "checkpoints": {n: results[n]["checkpoint"] for n in results}}, indent=1) + "\n")
    lines = ["# What the wire reveals, per compressor", "", how, "",
             "Image inversion (PSNR in dB, SSIM, semantic = probe score on the reconstructions: scenes = shape and "
             "cell of every object right, chance 3.1 %; fashion = class, chance 10 %) and text-token recovery "
             "(accuracy over every text row of the session). Suite accuracy: mean of the soc-vqa, soc-mc, glyph-vqa "
             "and shape-pope headline metrics of the attacked checkpoint (measured here on the first questions of "
             "each suite for checkpoints trained here, else the study's).", ""]
    for image_set in ("scenes", "fashion", "skimage"):
        sub = [r for r in rows if r["image_set"] == image_set]
        if not sub:
            lines += [f"## {image_set}: skipped (Fashion-MNIST not installed)", ""]
            continue
        clean = next((r["semantic_clean"] for r in sub if r.get("semantic_clean") is not None), None)
        lines += [f"## {image_set} ({sub[0]['n']} held-out images" +
                  (f"; probe on the originals: {_f(100 * clean, '{:.1f}')} %" if clean is not None else "") + ")", "",
                  "| config | attacker | MSE | PSNR | SSIM | semantic % | text token acc % | suite accuracy % |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in [b for b in baseline if b["image_set"] == image_set] + sub:
            a = acc.get(r["config"], {}).get("suites", {})
            mean_acc = _acc(a)
            sem = r["semantic"]
            lines.append(f"| {r['config']} | {r['attacker']} | {_f(r['mse'], '{:.4f}')} | {_f(r['psnr'])} | "
                         f"{_f(r['ssim'], '{:.3f}')} | {_f(None if sem is None else 100 * sem, '{:.1f}')} | "
                         f"{_f(100 * r['text_token_acc'], '{:.1f}') if 'text_token_acc' in r else '-'} | "
                         f"{mean_acc} |")
        lines.append("")
    lines += ["## Labels", "", "| config | paper cut: label bytes / step | labels read from the wire % | "
              "U cut: label bytes | U cut: norm AUC (label positions) | U cut: direction attack token acc % |",
              "| --- | --- | --- | --- | --- | --- |"]
    for lab in labels:
        p, u = lab["paper"], lab["u"]
        lines.append(f"| {lab['config']} | {_f(p['label_bytes_per_step'], '{:.0f}')} | "
                     f"{_f(100 * p.get('labels_read_acc', float('nan')), '{:.1f}')} | {u['label_bytes']} | "
                     f"{_f(u.get('norm_auc'), '{:.3f}')} | "
                     f"{_f(100 * u.get('direction_acc', float('nan')), '{:.1f}')} |")
    lines.append("")
    out_json.with_suffix(".md").write_text("\n".join(lines))


def _acc(suites: dict) -> str:
    if not suites:
        return "-"
    keys = ("soc-vqa", "soc-mc", "glyph-vqa", "shape-pope")
    vals = [suites[k] for k in keys if suites.get(k) is not None]
    return f"{sum(vals) / len(vals):.1f}" if vals else "-"


def _json_safe(d):
    if isinstance(d, dict):
        return {k: _json_safe(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return None if math.isnan(d) else "inf"
    return d


def write_grid(grids: dict[str, dict], path: Path) -> None:
    """Rows: per configuration, originals then white- and black-box reconstructions (scenes, fashion, skimage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ORDER if n in grids]
    if not names:
        return
    first = grids[names[0]]
    cols = [(s, i) for s in ("scenes", "fashion", "skimage") if s in first["orig"]
            for i in range(first["orig"][s].shape[0])]
    kinds = [("orig", "original")] + [(a, f"{a}-box") for a in ("white", "black")]
    nrows = 1 + 2 * len(names)
    fig, axes = plt.subplots(nrows, len(cols), figsize=(len(cols) * 0.9, nrows * 0.95), squeeze=False)
    r = 0
    for name in names:
        for kind, title in kinds:
            if kind == "orig" and name != names[0]:
                continue
            for c, (s, i) in enumerate(cols):
                ax = axes[r][c]
                ax.axis("off")
                img = grids[name].get(kind, {}).get(s)
                if img is not None and i < img.shape[0]:
                    ax.imshow(img[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axes[r][0].text(-0.1, 0.5, title if kind == "orig" else f"{name} {title}", transform=axes[r][0].transAxes,
                            ha="right", va="center", fontsize=7)
            r += 1
    fig.subplots_adjust(left=0.2, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset (default tiny)")
    p.add_argument("--data", default=None, help="data root (default: the preset's)")
    p.add_argument("--checkpoints", default="runs/study", help="folder of <config>/seed0/stage2/final checkpoints")
    p.add_argument("--base", default="runs/baseline/stage0/final", help="stage-0 base for checkpoints trained here")
    p.add_argument("--out", default="runs/privacy")
    p.add_argument("--results", default="results/privacy.json")
    p.add_argument("--configs", nargs="*", default=ORDER, choices=ORDER)
    p.add_argument("--stage1-steps", type=int, default=100)
    p.add_argument("--stage2-steps", type=int, default=150)
    p.add_argument("--inversion-steps", type=int, default=1000)
    p.add_argument("--surrogate-steps", type=int, default=150)
    p.add_argument("--aux-scenes", type=int, default=3500)
    p.add_argument("--aux-fashion", type=int, default=2000)
    p.add_argument("--aux-crops", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-limit", type=int, default=100, help="questions per suite for the accuracy column of "
                   "checkpoints trained here (0: skip)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qtllava.train.server_runtime").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from qtllava.config import load_config
    from qtllava.data import prepare_data

    cfg = load_config(args.config)
    out = Path(args.out)
    done_dir = out / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.report_only:
        data_root = prepare_data(cfg, root=Path(args.data or cfg.data.root))
        base = None
        for name in args.configs:
            if (done_dir / f"{name}.pt").exists():
                continue
            t1 = time.perf_counter()
            ckpt = find_checkpoint(name, [Path(args.checkpoints)])
            source = "study"
            if ckpt is None:
                base = base or stage0_base(args, data_root)
                ckpt = train_checkpoint(name, args, base, data_root)
                source = (f"trained here (stage1 {args.stage1_steps}, stage2 {args.stage2_steps} steps from "
                          f"{base_of(ckpt, args)})")
            res = attack_config(name, ckpt, base_of(ckpt, args), data_root, args)
            res["source"] = source
            res["wall_s"] = time.perf_counter() - t1
            torch.save(res, done_dir / f"{name}.pt")
            log.info("%s done in %.0f s", name, res["wall_s"])
        for name in args.configs:  # the accuracy each compressor keeps, for checkpoints trained here
            res_file, acc_file = done_dir / f"{name}.pt", done_dir / f"{name}-accuracy.json"
            if res_file.exists() and not acc_file.exists() and args.eval_limit > 0:
                acc_file.write_text(json.dumps(own_accuracy(torch.load(res_file, weights_only=False)["checkpoint"],
                                                            data_root, args.eval_limit)))
        if not (done_dir / "baseline.pt").exists() and (done_dir / f"{ORDER[0]}.pt").exists():
            ckpt = torch.load(done_dir / f"{ORDER[0]}.pt", weights_only=False)["checkpoint"]
            torch.save(mean_image_rows(ckpt, base_of(Path(ckpt), args), data_root, args), done_dir / "baseline.pt")
    results = {n: torch.load(done_dir / f"{n}.pt", weights_only=False) for n in ORDER
               if (done_dir / f"{n}.pt").exists()}
    s = settings(args)
    how = (f"Command: `make bench-privacy` (`python benchmarks/privacy.py --config {args.config}`); preset "
           f"{args.config}; checkpoints: " + "; ".join(f"{n}: {r['source']}" for n, r in results.items()) +
           f". Attacker: aux {s.aux_scenes} scenes + {s.aux_fashion} Fashion-MNIST train + {s.aux_crops} skimage "
           f"crops; inversion net width {s.inversion.width}, depth {s.inversion.depth}, {s.inversion.steps} steps of "
           f"batch {s.inversion.batch_size}; black-box surrogate {s.surrogate_steps} steps. Wall time of this "
           f"invocation {time.perf_counter() - t0:.0f} s, per configuration " +
           ", ".join(f"{n} {r['wall_s']:.0f} s" for n, r in results.items()) +
           f"; machine {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s).")
    baseline = torch.load(done_dir / "baseline.pt", weights_only=False) if (done_dir / "baseline.pt").exists() else []
    acc = accuracy(results, done_dir, Path(args.results).parent / "study.json")
    write_report(results, baseline, acc, Path(args.results), how)
    write_grid({n: r["grid"] for n, r in results.items()}, Path(args.results).with_suffix(".png"))
    print(Path(args.results).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
