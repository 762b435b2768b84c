"""The server process of a split run: build the stage's `ServerRuntime` as `run_stage` would, serve it over gRPC.

The server holds no training data: it reads only the tokenizer (vocabulary size and image-token id, to build the
LLM) and its own half of `--init`. It writes `out/checkpoints/<session>/step-NNNNNN` when clients ask,
`out/final` at the end of a client's stage and one metrics row per applied step per session in `out/metrics.jsonl`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from qtllava.config import Config, to_toml
from qtllava.model.parts import ServerPart
from qtllava.train.loop import stage_parts
from qtllava.train.server_runtime import ServerRuntime
from qtllava.wire.grpc_transport import ServerOptions, start_server

__all__ = ["build_server_runtime", "serve"]

log = logging.getLogger(__name__)


def build_server_runtime(cfg: Config, stage: str | None, data_root: Path | None, out_dir: Path | None,
                         init: str | Path | None = None, resume: bool = False, cut: str = "paper") -> ServerRuntime:
    """A training server for `stage` (weights as `run_stage` builds them), or with `stage=None` a generation-only
    server on `init/server`. With `resume`, the latest session checkpoint in `out_dir` is loaded."""
    if stage is None:
        if init is None:
            raise ValueError("a generation-only server (no --stage) needs --init, a folder holding server/")
        part = ServerPart.from_pretrained(Path(init) / "server")
        return ServerRuntime(part, part.cfg, None, cut=cut)
    if out_dir is None:
        raise ValueError("a training server needs --out")
    scfg, _, client, server = stage_parts(cfg, stage, Path(data_root), init, ("server",))
    del client
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rt = ServerRuntime(server, scfg, stage, total_steps=getattr(cfg.train, stage).steps,
                       checkpoint_dir=out_dir / "checkpoints", generator_seed=cfg.train.seed, cut=cut,
                       final_dir=out_dir / "final", metrics_path=out_dir / "metrics.jsonl")
    ck = rt.latest_checkpoint() if resume else None
    if ck is not None:
        rt.load(ck)
        log.info("%s: server resumes from %s (sessions: %s)", stage, ck,
                 {s.name or sid: s.next_step for sid, s in rt.sessions.items()})
    elif (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()
    (out_dir / "config.toml").write_text(to_toml(scfg))
    return rt


def serve(runtime: ServerRuntime, options: ServerOptions, port_file: str | Path | None = None,
          stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set); write the bound port to `port_file` once listening."""
    server, port = start_server(runtime, options)
    if port_file:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(str(port))
        os.replace(tmp, port_file)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    log.info("server ready on port %d (stage %s, cut %s)", port, runtime.stage, runtime.cut)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=1.0).wait()
        log.info("server stopped: %s", runtime.state()["sessions"])
    return port
