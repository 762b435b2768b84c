"""Entropy-coded integer gradients: same values as the fixed-width codec, fewer bits on peaked gradients."""

import pytest
import torch

from qtllava.compress.base import Packet, PacketError, nbytes
from qtllava.compress.grad import decode_grad, encode_grad


@pytest.mark.parametrize("bits", [8, 4])
def test_ans_grad_equals_fixed_width_values_and_costs_less(bits):
    g = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) ** 3 * 1e-5  # heavy-tailed, peaked at 0
    fixed = encode_grad(g, f"int{bits}")
    coded = encode_grad(g, f"int{bits}-ans")
    assert torch.equal(decode_grad(Packet.from_bytes(coded.to_bytes())), decode_grad(fixed))
    assert nbytes(coded) < nbytes(fixed)


@pytest.mark.parametrize("bits", [6, 5])
def test_wider_ans_grids_keep_the_rounding_bound(bits):
    g = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    qmax = (1 << (bits - 1)) - 1
    d = decode_grad(Packet.from_bytes(encode_grad(g, f"int{bits}-ans").to_bytes()))
    s = g.abs().amax(dim=1, keepdim=True)
    assert ((g - d).abs() <= s / (2 * qmax) + 1e-6).all()
    assert (g - d).abs().max() > s.min() / (8 * qmax)  # a grid, not a lossless copy


def test_ternary_is_unbiased_with_stochastic_rounding():
    g = torch.full((2000, 16), 0.25)
    g[:, 0] = 1.0  # row absmax 1: the grid is -1, 0, 1
    gen = torch.Generator().manual_seed(1)
    d = decode_grad(encode_grad(g, "int2-ans", stochastic=True, generator=gen))
    assert set(d.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert d[:, 1:].mean().item() == pytest.approx(0.25, abs=0.01)


def test_ans_grad_edge_cases_and_bad_packets():
    empty = encode_grad(torch.zeros(0, 8), "int4-ans")
    assert decode_grad(empty).shape == (0, 8)
    zeros = encode_grad(torch.zeros(3, 8), "int4-ans")
    assert torch.equal(decode_grad(zeros), torch.zeros(3, 8))
    p = encode_grad(torch.randn(4, 8), "int4-ans")
    with pytest.raises(PacketError, match="scales"):
        decode_grad(Packet(codec=p.codec, shape=p.shape, payload=p.payload, side=p.side[:8], dtype=p.dtype))
    with pytest.raises(PacketError):
        decode_grad(Packet(codec=p.codec, shape=(40, 8), payload=p.payload, side=p.side, dtype=p.dtype))
