"""`make demo`'s split mode: stage 0 in process, stages 1-2 as a server process and a client process, evaluation
across the split, and the tables printed one after the other."""

from __future__ import annotations

import json

from qtllava.config import load_config
from qtllava.pipeline import run_demo


def test_split_demo_on_micro(tmp_path):
    cfg = load_config("micro", ["train.stage0.steps=2", "train.stage1.steps=2", "train.stage2.steps=2",
                                "train.threads=1", "eval.limit=2", "eval.max_new_tokens=2"])
    text = run_demo(cfg, tmp_path / "run", data_root=tmp_path / "data")
    for needle in ("accuracy", "soc-vqa", "bytes on the wire", "-- stage1 (split (gRPC)) --", "labels",
                   "= messages"):
        assert needle in text, needle
    summary = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [summary["stages"][s]["mode"] for s in ("stage0", "stage1", "stage2")] == [
        "in-process", "split (gRPC)", "split (gRPC)"]
    assert summary["stages"]["stage2"]["eval_traffic"]["generate"]["messages_up"] > 0
    for side in ("client", "server"):
        assert (tmp_path / "run" / "stage2" / side / "final" / "DONE").exists()
