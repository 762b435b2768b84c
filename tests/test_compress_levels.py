"""Choosing L: measured entropy and bits per L, the recommendation and its report files."""

import json

import numpy as np
import pytest
import torch

from qtllava.compress.levels import analyze_levels, indices_for_levels, measure_indices, write_levels_report


def test_measure_indices_gaussian():
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    # about 1.27 bits for Gaussian input at L = 4 with the paper's 3-std clipping
    assert 1.2 < measure_indices(indices_for_levels(x, 4, width=3.0)[0], 4)["entropy_bits"] < 1.35
    idx, dist = indices_for_levels(x, 4)  # the Gaussian-optimal width (1.49 std): thresholds at 0 and +-1 std
    m = measure_indices(idx, 4)
    assert m["pack_bits"] == 2.0 and m["pack_packet_bits"] > 2.0
    assert 1.85 < m["entropy_bits"] < 1.95  # 1 + H(0.317) = 1.90
    assert m["entropy_bits"] <= m["ans_bits"] <= 1.01 * m["entropy_bits"] + 1e-9
    assert m["ans_packet_bits"] > m["ans_bits"]
    assert 0 < dist < 0.2


def test_analyze_levels_recommends_within_budget_and_writes_report(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = {"image": torch.randn(300, 64, generator=g), "text": torch.randn(50, 64, generator=g)}
    enc = torch.nn.Linear(64, 32)
    res = analyze_levels(features=feats, encoders={"text": enc}, levels=range(2, 10), budget_bits=2.0)
    assert set(res["modalities"]) == {"image", "text"}
    assert res["modalities"]["text"][0]["numel"] == 50 * 32
    by_l = {r["levels"]: r for r in res["overall"]}
    rec = res["recommended"]
    assert by_l[rec]["ans_bits"] <= 2.0 and (rec + 1 not in by_l or by_l[rec + 1]["ans_bits"] > 2.0)
    assert rec > 4  # entropy coding affords more levels than pack's L = 4 at 2 bits
    assert f"L={rec}" in res["reasoning"] and "entropy" in res["reasoning"]
    write_levels_report(res, tmp_path / "levels.json", tmp_path / "levels.png")
    assert json.loads((tmp_path / "levels.json").read_text())["recommended"] == rec
    assert (tmp_path / "levels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_levels_from_indices_and_accuracy():
    rng = np.random.default_rng(0)
    idx = {"image": {L: rng.integers(0, L, (40, 16)) for L in (2, 3, 4)}}
    res = analyze_levels(indices=idx, budget_bits=2.0, accuracy={2: 0.5, 3: 0.7, 4: 0.6})
    assert res["recommended"] == 3 and "most accurate" in res["reasoning"]
    with pytest.raises(ValueError):
        analyze_levels()
