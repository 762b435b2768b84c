"""The whole job: data, stages 0-2, evaluation, and the tables a user reads at the end."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qtllava.config import Config, to_dict
from qtllava.data import make_data
from qtllava.train.loop import STAGES, run_stage

__all__ = ["run_pipeline", "run_demo", "format_traffic"]

log = logging.getLogger(__name__)


def format_traffic(stage_runs: dict) -> str:
    """Plain table: bytes per step in each direction, per stage (serialized message sizes)."""
    lines = [f"{'stage':<8} {'steps':>6} {'up MB':>10} {'down MB':>10} {'up B/step':>12} {'down B/step':>12}"
             f" {'wall s':>8}"]
    for stage, r in stage_runs.items():
        t = r["traffic"].get("step", {})
        up, down, steps = t.get("bytes_up", 0), t.get("bytes_down", 0), max(1, r["steps_run"])
        lines.append(f"{stage:<8} {r['steps_run']:>6} {up / 1e6:>10.2f} {down / 1e6:>10.2f} {up / steps:>12.0f}"
                     f" {down / steps:>12.0f} {r['wall_s']:>8.1f}")
    return "\n".join(lines)


def run_pipeline(cfg: Config, out: Path, data_root: Path | None = None, resume: bool = False,
                 base: str | Path | None = None, evaluate: bool = True, progress: bool = True) -> dict:
    """Generate data (cached), train stages 0-2 (stage 0 skipped when `base` is given), evaluate the result.

    Each stage's `final/` folder is the next stage's init; with `resume`, finished stages are skipped and an
    interrupted one continues from its latest checkpoint. Writes `out/pipeline.json`.
    """
    out.mkdir(parents=True, exist_ok=True)
    root = make_data(cfg.data, cfg.vision.image_size, root=data_root or Path(cfg.data.root))
    runs: dict[str, dict] = {}
    summary_path = out / "pipeline.json"
    if resume and summary_path.exists():
        runs = json.loads(summary_path.read_text()).get("stages", {})
    init: Path | None = Path(base) if base else None
    for stage in STAGES:
        if stage == "stage0" and base:
            continue
        stage_dir = out / stage
        if resume and stage in runs and (stage_dir / "final" / "DONE").exists():
            init = stage_dir / "final"
            continue
        t0 = time.perf_counter()
        r = run_stage(cfg, stage, root, stage_dir, init=init, resume=resume, progress=progress)
        runs[stage] = {"steps_run": r.steps, "wall_s": time.perf_counter() - t0, "last_loss": r.last_loss,
                       "traffic": r.traffic}
        init = r.final
        summary_path.write_text(json.dumps({"config": to_dict(cfg), "stages": runs}, indent=2))
    result = {"stages": runs, "final": str(init), "traffic_table": format_traffic(runs)}
    if evaluate:
        from qtllava.eval.model_answer import evaluate_checkpoint_results
        from qtllava.eval.runner import format_table, write_results

        results = evaluate_checkpoint_results(cfg, init, data_root=root)
        write_results(results, out / "eval.json")
        result["eval"] = results
        result["eval_table"] = format_table(results)
    summary_path.write_text(json.dumps({"config": to_dict(cfg), "stages": runs, "final": str(init),
                                        "eval": result.get("eval")}, indent=2, default=str))
    return result


def run_demo(cfg: Config, out: Path, data_root: Path | None = None) -> str:
    """The main job on a preset; returns the text to print (accuracy table beside the traffic table)."""
    result = run_pipeline(cfg, out, data_root=data_root, resume=True)
    return "\n\n".join([f"== {cfg.name}: accuracy (ours vs chance vs majority) ==", result.get("eval_table", ""),
                        "== traffic per stage (serialized gRPC message bytes, loopback) ==",
                        result["traffic_table"], f"results: {out / 'eval.json'}, {out / 'pipeline.json'}"])
