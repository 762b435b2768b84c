"""`qtllava levels` on real checkpoints: features through the client part, rates per L, report files, and the
codec benchmark's trained-checkpoint source. One micro pipeline (stage 0 = an identity fp32 checkpoint, stage 2 =
an fsq/ans checkpoint) is trained once for the module."""

import json
import math

import pytest
import torch

from qtllava.cli import main as cli_main
from qtllava.compress.base import nbytes
from qtllava.config import load_config
from qtllava.data import collate, make_data
from qtllava.eval.levels_cli import (VAL_SPLIT, checkpoint_rows, encoder_outputs, format_levels_table,
                                     levels_for_checkpoint)
from qtllava.model.parts import ClientPart

FSQ = ["compress.image.name=\"fsq\"", "compress.text.name=\"fsq\"", "compress.image.coder=\"ans\"",
       "compress.text.coder=\"ans\"", "compress.image.levels=4", "compress.text.levels=4",
       # the maps train (default: frozen), so that a test can tell the trained encoder's Linear from the identity
       "train.stage1.codec_lr_scale=1.0", "train.stage2.codec_lr_scale=1.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from qtllava.pipeline import run_pipeline

    torch.set_num_threads(1)
    cfg = load_config("micro", FSQ)
    root = make_data(cfg.data, cfg.vision.image_size, root=tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("run")
    run_pipeline(cfg, out, data_root=root, evaluate=False, progress=False)
    return {"root": root, "fsq": out / "stage2" / "final", "identity": out / "stage0" / "final"}


def _rows(res):
    return [r for rs in res["modalities"].values() for r in rs]


def test_cli_writes_json_and_png(run, tmp_path, capsys):
    out = tmp_path / "levels"
    assert cli_main(["levels", "--checkpoint", str(run["fsq"]), "--data", str(run["root"]), "--levels", "2", "3",
                     "4", "8", "--batches", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "levels.json").read_text())
    assert (out / "levels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["levels"] == [2, 3, 4, 8] and set(res["modalities"]) == {"image", "text"}
    assert res["recommended"] in res["levels"]
    assert f"L={res['recommended']}" in res["reasoning"] and "entropy" in res["reasoning"]
    assert f"recommended L = {res['recommended']}" in printed and "ans sent" in printed
    src = res["source"]
    assert src["split"] == VAL_SPLIT and src["batches"] == 2
    assert src["modalities"]["image"]["checkpoint_codec"] == "fsq"
    assert src["modalities"]["image"]["checkpoint_levels"] == 4


def test_rates_bounded_by_log2_levels_and_entropy(run):
    res = levels_for_checkpoint(run["identity"], run["root"], levels=(2, 3, 4, 6, 8, 16), batches=4)
    assert res["source"]["modalities"]["text"]["checkpoint_codec"] == "identity"
    assert "fresh (identity) fsq encoder" in res["reasoning"]
    for r in _rows(res) + res["overall"]:
        lv = r["levels"]
        assert 0 <= r["entropy_channel_bits"] <= r["entropy_bits"] + 1e-9
        assert r["entropy_bits"] <= math.log2(lv) + 1e-9
        assert math.ceil(math.log2(lv)) <= r["pack_bits"] < math.ceil(math.log2(lv)) + 0.01
        assert r["ans_payload_bits"] <= r["ans_bits"] and r["ans_sent_payload_bits"] <= r["ans_sent_bits"]
        assert r["ans_sent_bits"] < r["ans_sent_packet_bits"] and r["pack_sent_bits"] < r["pack_sent_packet_bits"]
        assert 0 <= r["distortion"] < 1
    for r in _rows(res):
        # ans never sends more than pack (it falls back to the pack bytes) ...
        assert r["ans_bits"] <= r["pack_bits"] + r["ans_side_bytes"] * 8 / r["numel"] + 1e-9
        # ... and on these inputs (>= 16k elements per modality) it is within 1 % of the pooled entropy, counting
        # its model's bytes (grouped channel models may even go below the pooled entropy)
        assert r["numel"] >= 16_000
        side = r["ans_side_bytes"] * 8 / r["numel"]
        assert r["ans_bits"] <= 1.01 * r["entropy_bits"] + side + 1e-9, r
    assert format_levels_table(res).count("\n") > len(_rows(res))


def test_sent_packets_match_the_checkpoint_client(run):
    """At its trained L and coder, the packets measured per batch are the ones the checkpoint's client sends."""
    res = levels_for_checkpoint(run["fsq"], run["root"], levels=(4,), batches=3)
    part = ClientPart.from_pretrained(run["fsq"] / "client").eval()
    cr = checkpoint_rows(run["fsq"], run["root"], batches=3, part=part)
    from qtllava.data import LlavaDataset, load_tokenizer

    tok = load_tokenizer(run["root"] / "tokenizer")
    ds = LlavaDataset.load(run["root"] / VAL_SPLIT, run["root"] / "images", tok, template=part.cfg.data.template,
                           image_size=part.cfg.vision.image_size, num_image_tokens=part.cfg.vision.num_image_tokens,
                           max_length=part.cfg.data.max_length, skip_bad=True)
    sent = {"image": 0, "text": 0}
    with torch.no_grad():
        for b in range(3):
            batch = collate([ds[i] for i in range(b * cr.batch_size, (b + 1) * cr.batch_size)], tok.pad_token_id)
            out = part(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
            sent["image"] += nbytes(out.image.packet)
            sent["text"] += nbytes(out.text.packet)
    for mod, (row,) in res["modalities"].items():
        assert row["ans_sent_packet_bits"] * row["numel"] / 8 == pytest.approx(sent[mod], abs=1e-6)
    z = encoder_outputs(cr)
    assert z["image"].shape == (3 * cr.batch_size * part.vision_tower.num_tokens, part.hidden_size)


def test_recommendation_uses_accuracy_and_budget(run):
    res = levels_for_checkpoint(run["fsq"], run["root"], levels=(2, 4, 8), batches=2, budget_bits=3.5,
                                accuracy={2: 0.3, 4: 0.6, 8: 0.5})
    assert res["recommended"] == 4 and "most accurate" in res["reasoning"]
    low = levels_for_checkpoint(run["fsq"], run["root"], levels=(2, 4), batches=2, budget_bits=0.01)
    assert low["recommended"] in (2, 4) and "no L fits" in low["reasoning"]


def test_codec_benchmark_hook(run, benchmark_module):
    codec = benchmark_module("codec")
    feats = codec.features_from_checkpoint(run["fsq"], run["root"], batch=4)
    part = ClientPart.from_pretrained(run["fsq"] / "client")
    assert feats["image"].shape == (4 * part.vision_tower.num_tokens, part.hidden_size)
    assert feats["text"].shape[1] == part.hidden_size and feats["text"].shape[0] > 0
    # the trained encoder's Linear was applied (not the identity)
    cr = checkpoint_rows(run["fsq"], run["root"], batches=1, batch_size=4, part=part)
    assert not torch.allclose(feats["image"], cr.rows["image"])
