"""benchmarks/downlink_probe.py: lossless downlinks leave the client's gradient as it is, coarse grids do not, and
merged text rows keep the token embeddings' gradient in fewer bits."""

import pytest

from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.train.loop import run_stage, stage_batches, stage_parts
from qtllava.train.recipes import apply_trainable, recipe


@pytest.fixture(scope="module")
def downlink_probe(benchmark_module):
    return benchmark_module("downlink_probe")


def test_probe_tells_lossless_from_coarse_and_merging_keeps_the_embedding_gradient(downlink_probe, tmp_path):
    cfg = load_config("micro", ["train.stage0.steps=4", 'compress.text.name="fsq"', 'compress.image.name="fsq"'])
    root = make_data(cfg.data, cfg.vision.image_size, root=tmp_path / "data")
    final = run_stage(cfg, "stage0", root, tmp_path / "s0", progress=False).final
    results = {}
    for merge in (False, True):
        scfg, tok, client, server = stage_parts(cfg, "stage1", root, final)
        apply_trainable(client, recipe(cfg, "stage2").client_trainable)
        server.requires_grad_(False)
        batches = stage_batches(scfg, "stage2", root, tok)
        results[merge] = downlink_probe.probe(client, server, batches, 2, ["fp32", "int8-ans", "int2-ans"], False, 0,
                                              "token", merge_text=merge)
    plain, merged = results[False], results[True]
    for r in (plain, merged):
        assert r["fp32"]["rows"] == {"image": 0.0, "text": pytest.approx(0.0, abs=1e-6)}
        assert r["fp32"]["embed_tokens"]["cos"] == pytest.approx(1.0, abs=1e-5)
        assert r["fp32"]["connector"]["adam"] == pytest.approx(1.0, abs=1e-5)
        assert r["int2-ans"]["rows"]["image"] > 10 * r["int8-ans"]["rows"]["image"]
        assert r["int2-ans"]["connector"]["cos"] < r["int8-ans"]["connector"]["cos"]
        assert r["fp32"]["zeroed"] == {"image": 0.0, "text": 0.0}
        assert r["int2-ans"]["zeroed"]["image"] > r["int8-ans"]["zeroed"]["image"]
    assert plain["fp32"]["bits"]["image"] == pytest.approx(32.0, abs=0.01)
    assert merged["fp32"]["bits"]["text"] < 0.8 * plain["fp32"]["bits"]["text"]  # fewer rows sent
    assert "| fp32 |" in downlink_probe.table(merged)
