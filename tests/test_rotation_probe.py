"""benchmarks/rotation_probe.py: its rotations are orthogonal, the identity is fsq's own round trip, and rotating
helps exactly where it should (rows with a few outlier channels), not on Gaussian rows."""

import pytest
import torch

from qtllava.compress.fsq import FsqDecoder, FsqEncoder


@pytest.fixture(scope="module")
def rp(benchmark_module):
    return benchmark_module("rotation_probe")


def test_rotations_are_orthogonal_and_hadamard_needs_a_power_of_two(rp):
    for name, r in rp.rotations(64, seed=1).items():
        assert torch.allclose(r @ r.T, torch.eye(64), atol=1e-5), name
    assert set(rp.rotations(64)) == {"identity", "orthogonal", "hadamard"}
    assert "hadamard" not in rp.rotations(48)
    with pytest.raises(ValueError, match="power-of-two"):
        rp.hadamard(48)


def test_identity_is_fsqs_round_trip_and_outlier_channels_favour_a_rotation(rp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    # the identity rotation gives what fsq's own encoder and decoder (identity maps, row statistics sent) give
    enc, dec = FsqEncoder(64, 64, 4, coder="pack"), FsqDecoder(64, 64, 4)
    with torch.no_grad():
        x_hat = dec(dec.dequantize(enc(x).packet))
    centred = x - x.mean(1, keepdim=True)
    fsq_err = float(((x_hat - x) ** 2).sum() / (centred ** 2).sum())
    assert rp.round_trip(x, torch.eye(64), 4)["rel_err"] == pytest.approx(fsq_err, rel=1e-2)  # fsq sends fp16 stats
    rots = rp.rotations(64)
    gauss = {n: rp.round_trip(x, r, 4)["rel_err"] for n, r in rots.items()}
    assert max(gauss.values()) < 1.2 * min(gauss.values())  # Gaussian rows: nothing to spread
    spiky = x.clone()
    spiky[:, :3] *= 30.0  # three outlier channels dominate every row's std
    res = rp.probe({"image": spiky}, [2, 4])["image"]
    assert res["channel_std_max_over_median"] > 10
    for L in ("2", "4"):
        assert res["levels"][L]["orthogonal"]["rel_err"] < 0.8 * res["levels"][L]["identity"]["rel_err"], L
        assert res["levels"][L]["orthogonal"]["cos"] > res["levels"][L]["identity"]["cos"], L
    assert "| image | 4 | hadamard |" in rp.table(rp.probe({"image": spiky}, [4]))
