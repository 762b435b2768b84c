"""The whole job: data, stages 0-2, evaluation, and the tables a user reads at the end."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qtllava.config import Config, to_dict
from qtllava.data import prepare_data
from qtllava.train.loop import STAGES, run_stage

__all__ = ["run_pipeline", "run_split_pipeline", "run_demo", "format_traffic"]

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


def _stage_record(stage_dir: Path) -> dict:
    """Summary of a stage finished outside this pipeline, from its metrics log (traffic: the step messages)."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {"steps_run": len(rows), "wall_s": sum(r["seconds"] for r in rows),
            "last_loss": rows[-1]["loss"] if rows else float("nan"),
            "traffic": {"step": {"bytes_up": sum(r["bytes_up"] for r in rows),
                                 "bytes_down": sum(r["bytes_down"] for r in rows)}}}


def run_pipeline(cfg: Config, out: Path, data_root: Path | None = None, resume: bool = False,
                 base: str | Path | None = None, evaluate: bool = True, progress: bool = True,
                 warm_start: str | Path | None = None) -> dict:
    """Generate data (cached), train stages 0-2 (stage 0 skipped when `base` is given), evaluate the result.

    Each stage's `final/` folder is the next stage's init; with `resume`, finished stages are skipped and an
    interrupted one continues from its latest checkpoint. `warm_start` (a folder with client/ and server/) is
    stage 0's init instead of fresh weights, e.g. a model first trained on one kind of question alone (a
    curriculum). Writes `out/pipeline.json`.
    """
    if base and warm_start:
        raise ValueError("run_pipeline: `base` skips stage 0, so a stage-0 `warm_start` would be ignored")
    out.mkdir(parents=True, exist_ok=True)
    root = prepare_data(cfg, root=data_root or Path(cfg.data.root))
    runs: dict[str, dict] = {}
    summary_path = out / "pipeline.json"
    if resume and summary_path.exists():
        runs = json.loads(summary_path.read_text()).get("stages", {})
    init: Path | None = Path(base) if base else Path(warm_start) if warm_start else None
    for stage in STAGES:
        if stage == "stage0" and base:
            continue
        stage_dir = out / stage
        if resume and (stage_dir / "final" / "DONE").exists():  # finished, maybe by `qtllava train` on its own
            init = stage_dir / "final"
            runs.setdefault(stage, _stage_record(stage_dir))
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


def run_split_pipeline(cfg: Config, out: Path, data_root: Path | None = None, resume: bool = False,
                       evaluate: bool = True) -> dict:
    """Like `run_pipeline`, but the compressed stages run as two processes on loopback: `qtllava serve` (server
    part, its own folder) and `qtllava client` (data and client part), with a fresh token for authentication.
    Stage 0 (the stand-in for pretrained weights) runs in this process. Evaluation generates across the split
    through a generation-only server on the last stage's final weights (a training server refuses generation).
    Writes `out/pipeline.json`; returns tables as `run_pipeline` does, plus `link_table` (bytes per direction and
    part, per stage)."""
    import secrets

    from qtllava.config import to_toml
    from qtllava.train.accounting import format_link_table, read_metrics, summarize_link
    from qtllava.train.procs import spawn, spawn_server

    out.mkdir(parents=True, exist_ok=True)
    root = prepare_data(cfg, root=data_root or Path(cfg.data.root))
    summary_path = out / "pipeline.json"
    runs: dict[str, dict] = {}
    if resume and summary_path.exists():
        runs = json.loads(summary_path.read_text()).get("stages", {})
    if not (resume and "stage0" in runs and (out / "stage0" / "final" / "DONE").exists()):
        t0 = time.perf_counter()
        r = run_stage(cfg, "stage0", root, out / "stage0", resume=resume)
        runs["stage0"] = {"steps_run": r.steps, "wall_s": time.perf_counter() - t0, "last_loss": r.last_loss,
                          "traffic": r.traffic, "mode": "in-process"}
    cfg_file, token_file = out / "config.toml", out / "split.token"
    cfg_file.write_text(to_toml(cfg))
    token_file.write_text(secrets.token_hex(16) + "\n")
    common = ["--config", str(cfg_file), "--data", str(root)]
    client_init = server_init = out / "stage0" / "final"
    link_tables, results, server = [], None, None
    token = token_file.read_text().strip()
    try:
        for stage in STAGES[1:]:
            folder = out / stage
            evaluate_here = evaluate and stage == STAGES[-1]
            done = (folder / "client" / "final" / "DONE").exists() and (folder / "server" / "final" / "DONE").exists()
            if not (resume and done and stage in runs):
                again = ["--resume"] if resume else []
                server, port = spawn_server(["--stage", stage, *common, "--init", str(server_init), "--out",
                                             str(folder / "server"), "--token-file", str(token_file), *again],
                                            folder / "port", folder / "server.log")
                log.info("%s: server pid %d on 127.0.0.1:%d, client log %s", stage, server.pid, port,
                         folder / "client.log")
                t0 = time.perf_counter()
                client = spawn(["client", *common, "--stage", stage, "--init", str(client_init), "--out",
                                str(folder / "client"), "--server", f"127.0.0.1:{port}", "--token-file",
                                str(token_file), "--no-progress", *again], folder / "client.log")
                try:
                    if client.wait(24 * 3600) != 0:
                        raise RuntimeError(f"{stage} client failed:\n{client.tail()}")
                finally:
                    client.stop()
                rows = read_metrics(folder / "client" / "metrics.jsonl")
                runs[stage] = {"steps_run": len(rows), "wall_s": time.perf_counter() - t0,
                               "last_loss": rows[-1]["loss"] if rows else float("nan"), "mode": "split (gRPC)",
                               "traffic": {"step": {"bytes_up": sum(r["bytes_up"] for r in rows),
                                                    "bytes_down": sum(r["bytes_down"] for r in rows)}},
                               "link": summarize_link(rows)}
                summary_path.write_text(json.dumps({"config": to_dict(cfg), "stages": runs}, indent=2))
                server.stop()
                server = None
            if evaluate_here:  # a server started for generation only, on the stage's final weights
                server, port = spawn_server(["--stage", "none", *common, "--init", str(folder / "server" / "final"),
                                             "--token-file", str(token_file)], folder / "port",
                                            folder / "server-eval.log")
                results, runs[stage]["eval_traffic"] = _evaluate_across(cfg, folder / "client" / "final", root,
                                                                        port, token)
            if server is not None:
                server.stop()
                server = None
            link_tables.append(format_link_table(runs[stage]["link"], f"-- {stage} ({runs[stage]['mode']}) --"))
            client_init, server_init = folder / "client" / "final", folder / "server" / "final"
    finally:
        if server is not None:
            server.stop()
    result = {"stages": runs, "final": {"client": str(client_init), "server": str(server_init)},
              "traffic_table": format_traffic(runs), "link_table": "\n\n".join(link_tables)}
    if results is not None:
        from qtllava.eval.runner import format_table, write_results

        write_results(results, out / "eval.json")
        result["eval"] = results
        result["eval_table"] = format_table(results)
    summary_path.write_text(json.dumps({"config": to_dict(cfg), "stages": runs, "final": result["final"],
                                        "eval": result.get("eval")}, indent=2, default=str))
    return result


def _evaluate_across(cfg: Config, client_final: Path, root: Path, port: int, token: str) -> tuple[dict, dict]:
    """Score the suites with generation across the split (server on 127.0.0.1:port). -> (results, traffic)"""
    from qtllava.eval.model_answer import evaluate_checkpoint_results
    from qtllava.wire.grpc_transport import ClientOptions, GrpcLink

    link = GrpcLink(ClientOptions(target=f"127.0.0.1:{port}", token=token, client_name="evaluator"))
    try:
        return evaluate_checkpoint_results(cfg, client_final, data_root=root, link=link), link.traffic.summary()
    finally:
        link.shutdown()


def run_demo(cfg: Config, out: Path, data_root: Path | None = None, split: bool = True) -> str:
    """The main job on a preset; returns the text to print (accuracy table beside the traffic tables).

    split: stages 1-2 run as a server process and a client process over gRPC on loopback (`run_split_pipeline`);
    False: everything in this process (`run_pipeline`)."""
    if not split:
        result = run_pipeline(cfg, out, data_root=data_root, resume=True)
        return "\n\n".join([f"== {cfg.name}: accuracy (ours vs chance vs majority) ==", result.get("eval_table", ""),
                            "== traffic per stage (serialized gRPC message bytes, loopback) ==",
                            result["traffic_table"], f"results: {out / 'eval.json'}, {out / 'pipeline.json'}"])
    result = run_split_pipeline(cfg, out, data_root=data_root, resume=True)
    return "\n\n".join([f"== {cfg.name}: accuracy (ours vs chance vs majority; answers generated across the split) ==",
                        result.get("eval_table", ""),
                        "== traffic per stage (serialized gRPC message bytes; stage 0 in one process) ==",
                        result["traffic_table"],
                        "== bytes on the wire per direction and part (server and client as two processes) ==",
                        result["link_table"], f"results: {out / 'eval.json'}, {out / 'pipeline.json'}"])
