"""kill -9 of either process of a split run, then a restart with --resume: training reaches the planned number of
steps with no step lost or applied twice, and the final weights equal an uninterrupted run's.

The kill is made deterministic by freezing the other process first (SIGSTOP): the survivor is then stuck in or
before an RPC while its peer dies, which is the worst case for agreeing on a step.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.train.accounting import read_metrics
from qtllava.train.loop import run_stage
from qtllava.train.procs import SplitProcess, spawn, spawn_server

STEPS, EVERY = 40, 5
OVERRIDES = [f"train.stage2.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.stage2.batch_size=2",
             "train.threads=1", "compress.downlink=int8", "compress.stochastic_rounding=true"]
ARGS = ["--config", "micro", *[a for o in OVERRIDES for a in ("-o", o)]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Data and an uninterrupted in-process run."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = load_config("micro", OVERRIDES)
    data = make_data(cfg.data, cfg.vision.image_size, root=tmp / "data")
    run_stage(cfg, "stage2", data, tmp / "reference", progress=False)
    return data, tmp / "reference"


def _rows(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _wait_rows(path: Path, n: int, proc: SplitProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _rows(path) < n:
        assert proc.alive(), proc.tail()
        assert time.monotonic() < deadline, f"no {n} metric rows in {timeout} s:\n{proc.tail()}"
        time.sleep(0.005)


def _check(reference: Path, client_out: Path, server_out: Path) -> None:
    rows = read_metrics(client_out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS)), "a step is missing or logged twice"
    ref = read_metrics(reference / "metrics.jsonl")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], abs=1e-5)
    for side, folder in (("client", client_out / "final"), ("server", server_out / "final")):
        a = load_file(reference / "final" / side / "model.safetensors")
        b = load_file(folder / side / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), f"{side} weights differ from the uninterrupted run"


def _server(data: Path, tmp: Path, resume: bool = False, listen: str = "127.0.0.1:0"):
    return spawn_server(["--stage", "stage2", *ARGS, "--data", str(data), "--out", str(tmp / "server"),
                         *(["--resume"] if resume else [])], tmp / "port", tmp / f"server{int(resume)}.log",
                        listen=listen)


def _client(data: Path, tmp: Path, port: int, resume: bool = False) -> SplitProcess:
    return spawn(["client", *ARGS, "--data", str(data), "--stage", "stage2", "--out", str(tmp / "client"),
                  "--server", f"127.0.0.1:{port}", "--no-progress", *(["--resume"] if resume else [])],
                 tmp / f"client{int(resume)}.log")


def test_kill_client_then_resume(reference, tmp_path):
    data, ref = reference
    server, port = _server(data, tmp_path)
    procs = [server]
    try:
        client = _client(data, tmp_path, port)
        procs.append(client)
        _wait_rows(tmp_path / "client" / "metrics.jsonl", EVERY + 2, client)
        server.signal(signal.SIGSTOP)  # the client now blocks in a step the server may or may not apply
        client.kill9()
        at_kill = _rows(tmp_path / "client" / "metrics.jsonl")
        server.signal(signal.SIGCONT)
        assert at_kill < STEPS, "the client finished before it could be killed"
        client = _client(data, tmp_path, port, resume=True)
        procs.append(client)
        assert client.wait(120) == 0, client.tail()
        _check(ref, tmp_path / "client", tmp_path / "server")
        events = read_metrics(tmp_path / "server" / "metrics.jsonl")
        rollbacks = [e for e in events if e.get("event") == "rollback"]
        assert rollbacks and rollbacks[-1]["to_step"] % EVERY == 0
    finally:
        for p in procs:
            p.stop()


def test_kill_server_then_resume_while_the_client_retries(reference, tmp_path):
    data, ref = reference
    server, port = _server(data, tmp_path)
    procs = [server]
    try:
        client = _client(data, tmp_path, port)
        procs.append(client)
        _wait_rows(tmp_path / "client" / "metrics.jsonl", EVERY + 2, client)
        client.signal(signal.SIGSTOP)
        server.kill9()
        client.signal(signal.SIGCONT)  # the server is away: the client retries with backoff
        assert _rows(tmp_path / "client" / "metrics.jsonl") < STEPS, "the run ended before the server was killed"
        time.sleep(0.5)
        server, _ = _server(data, tmp_path, resume=True, listen=f"127.0.0.1:{port}")
        procs.append(server)
        assert client.wait(120) == 0, client.tail()
        log = client.log.read_text()
        assert "retrying" in log and "rolling back to a common checkpoint" in log
        _check(ref, tmp_path / "client", tmp_path / "server")
    finally:
        for p in procs:
            p.stop()
