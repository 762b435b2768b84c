"""A split run over gRPC (two real processes) reproduces the in-process run: the same loss at every step, the same
final weights, the same bytes counted by both transports; and generation across the split answers as in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.eval.model_answer import evaluate_checkpoint
from qtllava.train.accounting import read_metrics
from qtllava.train.loop import run_stage
from qtllava.train.procs import spawn, spawn_server

STEPS = 6
# A compressed stage with everything that could drift between processes: learned codecs, entropy coding,
# stochastic rounding of int8 gradients (the server's generator), gradient accumulation, checkpoint steps.
OVERRIDES = [f"train.stage2.steps={STEPS}", "train.stage2.grad_accum=2", "train.checkpoint_every=2",
             "train.threads=1", "train.stage0.steps=2", "compress.image.name=fsq", "compress.text.name=fsq",
             "compress.image.coder=ans", "compress.downlink=int8", "compress.stochastic_rounding=true"]
ARGS = ["--config", "micro", *[a for o in OVERRIDES for a in ("-o", o)]]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_split_over_grpc_equals_in_process(tmp_path):
    cfg = load_config("micro", OVERRIDES)
    data = make_data(cfg.data, cfg.vision.image_size, root=tmp_path / "data")
    base = run_stage(cfg, "stage0", data, tmp_path / "base", progress=False).final
    ref = run_stage(cfg, "stage2", data, tmp_path / "inproc", init=base, progress=False)

    common = [*ARGS, "--data", str(data), "--init", str(base)]
    server, port = spawn_server([*common, "--stage", "stage2", "--out", str(tmp_path / "server")],
                                tmp_path / "port", tmp_path / "server.log")
    try:
        client = spawn(["client", *common, "--stage", "stage2", "--out", str(tmp_path / "client"),
                        "--server", f"127.0.0.1:{port}", "--no-progress"], tmp_path / "client.log")
        assert client.wait(120) == 0, client.tail()
        assert "= messages" in client.tail()  # the summary table

        ours, theirs = read_metrics(tmp_path / "inproc" / "metrics.jsonl"), read_metrics(
            tmp_path / "client" / "metrics.jsonl")
        assert [r["step"] for r in theirs] == list(range(STEPS))
        assert [r["loss"] for r in theirs] == pytest.approx([r["loss"] for r in ours], abs=1e-5)
        for key in ("bytes_up", "bytes_down", "payload_up", "payload_down", "messages_up", "messages_down"):
            assert [r[key] for r in theirs] == [r[key] for r in ours], key
        assert ref.traffic["step"] == json.loads(json.dumps(_grpc_traffic(theirs)))
        for side, folder in (("client", tmp_path / "client" / "final" / "client"),
                             ("server", tmp_path / "server" / "final" / "server")):
            a, b = _weights(ref.final / side), _weights(folder)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), side

        # Split inference: a server started for generation on the trained half answers a question file as the
        # in-process model does (a training server refuses generation).
        server.stop()
        server, port = spawn_server([*ARGS, "--stage", "none", "--init", str(tmp_path / "server" / "final")],
                                    tmp_path / "port-eval", tmp_path / "server-eval.log")
        questions = tmp_path / "questions.jsonl"
        lines = (data / "suites" / "soc-vqa" / "questions.jsonl").read_text().splitlines()[:6]
        questions.write_text("\n".join(lines) + "\n")
        remote = spawn(["eval", *ARGS, "--data", str(data), "--checkpoint", str(tmp_path / "client" / "final"),
                        "--server", f"127.0.0.1:{port}", "--questions", str(questions),
                        "--answers", str(tmp_path / "remote.jsonl")], tmp_path / "eval.log")
        evaluate_checkpoint(cfg, ref.final, data, questions=str(questions), answers=str(tmp_path / "local.jsonl"))
        assert remote.wait(120) == 0, remote.tail()
        answers = [[json.loads(x)["text"] for x in (tmp_path / f).read_text().splitlines()]
                   for f in ("local.jsonl", "remote.jsonl")]
        assert len(answers[0]) == 6 and answers[0] == answers[1]
    finally:
        server.stop()
    server_rows = [r for r in read_metrics(tmp_path / "server" / "metrics.jsonl") if "step" in r]
    assert [r["bytes_up"] for r in server_rows] == [r["bytes_up"] for r in theirs]  # counted on receipt


def _grpc_traffic(rows: list[dict]) -> dict:
    """The loopback ledger's "step" entry rebuilt from the per-step rows of the gRPC client."""
    return {"bytes_down": sum(r["bytes_down"] for r in rows), "bytes_up": sum(r["bytes_up"] for r in rows),
            "messages_down": sum(len(r["messages_down"]) for r in rows),
            "messages_up": sum(len(r["messages_up"]) for r in rows)}
