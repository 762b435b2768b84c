"""Uplink codecs behind the interface: packets, exact round trips, byte counts, gradients, registry, bad packets."""

import dataclasses
import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtllava.compress import Packet, PacketError, build_codec, codec_names, nbytes, register_codec
from qtllava.compress.fsq import (fit_decoder, gaussian_width, level_values, quantize_indices, restore_stats,
                                 robust_normalize, soft_rate_bits)
from qtllava.compress.nf import nf_codebook, nf_side_bytes
from qtllava.compress.topk import topk_k
from qtllava.config import CodecConfig

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONFIGS = [
    CodecConfig(name="identity", dtype="fp16"),
    CodecConfig(name="identity", dtype="bf16"),
    CodecConfig(name="identity", dtype="fp32"),
    CodecConfig(name="fsq", levels=4, coder="pack"),
    CodecConfig(name="fsq", levels=4, coder="ans"),
    CodecConfig(name="fsq", levels=2, coder="ans", norm_over="batch"),
    CodecConfig(name="fsq", levels=7, coder="ans", d_code=16),
    CodecConfig(name="fsq", levels=256, coder="pack", d_code=24),
    CodecConfig(name="fsq", levels=13, coder="ans", rate_weight=0.1),
    CodecConfig(name="nf", bits=2),
    CodecConfig(name="nf", bits=3),
    CodecConfig(name="nf", bits=4),
    CodecConfig(name="topk", bits=2),
    CodecConfig(name="topk", bits=4),
]
DIM = 64


def cfg_id(cfg):
    return f"{cfg.name}-{cfg.dtype if cfg.name == 'identity' else ''}{cfg.levels if cfg.name == 'fsq' else ''}" \
           f"{cfg.coder if cfg.name == 'fsq' else ''}{cfg.bits if cfg.name in ('nf', 'topk') else ''}-{cfg.d_code}"


def rows(n, d=DIM, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + torch.randn(1, d, generator=g) * 0.3 * scale


# --- every codec ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@FAST
@given(n=st.integers(0, 20), seed=st.integers(0, 10**6), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_packet_round_trip(cfg, n, seed, scale):
    client, server = build_codec(cfg, DIM)
    x = rows(n, seed=seed, scale=scale)
    enc = client(x)
    wire = enc.packet.to_bytes()
    assert nbytes(enc.packet) == len(wire)
    back = Packet.from_bytes(wire)
    assert back == enc.packet
    values = server.dequantize(back)
    assert values.dtype == torch.float32 and values.shape == enc.values.shape
    assert torch.equal(values, enc.values.detach())
    out = server(values)
    assert out.shape == (n, DIM)
    assert enc.aux_loss.shape == ()


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_bad_packets_raise(cfg):
    client, server = build_codec(cfg, DIM)
    packet = client(rows(10)).packet
    with pytest.raises(PacketError, match="does not match this decoder"):
        server.dequantize(dataclasses.replace(packet, codec="other"))
    with pytest.raises(PacketError):
        server.dequantize(dataclasses.replace(packet, payload=packet.payload[:-3]))
    with pytest.raises(PacketError):
        server.dequantize(dataclasses.replace(packet, shape=(11, packet.shape[1])))
    with pytest.raises(PacketError):
        server.dequantize(dataclasses.replace(packet, shape=(10, packet.shape[1] + 1)))
    with pytest.raises(PacketError, match="not \\(rows, width\\)"):
        server.dequantize(dataclasses.replace(packet, shape=(packet.numel,)))
    wire = packet.to_bytes()
    with pytest.raises(PacketError, match="checksum does not match"):
        Packet.from_bytes(wire[:-1])
    body = wire[:-4][:-1]  # truncated, with a checksum that fits the truncated bytes
    with pytest.raises(PacketError, match="truncated"):
        Packet.from_bytes(body + zlib.crc32(body).to_bytes(4, "little"))
    for bit in range(0, 8 * len(wire), max(1, 8 * len(wire) // 97)):  # any flipped bit is detected
        flipped = bytearray(wire)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(PacketError):
            Packet.from_bytes(bytes(flipped))


def test_registry():
    assert {"identity", "fsq", "nf", "topk"} <= set(codec_names())
    with pytest.raises(KeyError, match="unknown codec 'nope'"):
        build_codec(CodecConfig(name="nope"), DIM)
    with pytest.raises(ValueError, match="already registered"):
        register_codec("fsq")(lambda cfg, dim: None)


@pytest.mark.parametrize("name", ["fsq", "nf", "topk", "identity"])
def test_modalities_have_distinct_parameters(name):
    cfg = CodecConfig(name=name)
    image, text = build_codec(cfg, DIM), build_codec(cfg, DIM)
    for a, b in zip(image, text):
        assert a is not b
        ids_a = {id(p) for p in a.parameters()}
        assert not ids_a & {id(p) for p in b.parameters()}
    if name == "fsq":
        image[0].proj.weight.data.add_(1.0)
        assert not torch.equal(image[0].proj.weight, text[0].proj.weight)
    else:
        assert not list(image[0].parameters()) and not list(image[1].parameters())  # baselines learn nothing


# --- fsq ----------------------------------------------------------------------------------------------------


def test_levels_definition():
    assert torch.equal(level_values(4), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert torch.equal(level_values(2), torch.tensor([-1.0, 1.0]))
    assert torch.equal(level_values(3), torch.tensor([-1.0, 0.0, 1.0]))
    v = level_values(256)
    assert v[0] == -1 and v[-1] == 1 and len(v) == 256
    with pytest.raises(ValueError):
        level_values(1)
    with pytest.raises(ValueError):
        level_values(257)


def test_quantize_indices_rounds_to_nearest_and_passes_gradient():
    z = torch.tensor([-1.0, -0.7, -0.6, -0.1, 0.1, 0.6, 0.7, 1.0], requires_grad=True)
    z_hat, idx = quantize_indices(z, 4)
    assert idx.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(z_hat.detach(), level_values(4)[idx.long()])
    (z_hat * torch.arange(8.0)).sum().backward()
    assert torch.equal(z.grad, torch.arange(8.0))  # straight-through: identity


def test_robust_normalize_hand_checked():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    # row 0: mean 3, population std sqrt(2); width 1 -> (x - 3) / sqrt(2), clipped to [-1, 1]
    s = 1 / math.sqrt(2)
    out = robust_normalize(x, width=1.0, over="sample")
    assert torch.allclose(out[0], torch.tensor([-1.0, -s, 0.0, s, 1.0]))
    assert torch.equal(out[1], torch.zeros(5))  # a constant row maps to 0
    out3 = robust_normalize(x[:1], width=3.0)
    assert torch.allclose(out3, (x[:1] - 3) / (3 * math.sqrt(2)))
    # batch: one pair over the whole tensor: mean 2.5, torch's default (unbiased) std of all 10 values
    allv = x.reshape(-1)
    mu, sd = allv.mean(), allv.std()
    assert torch.allclose(robust_normalize(x, width=3.0, over="batch"), ((x - mu) / (3 * sd)).clamp(-1, 1))
    # sample statistics do not depend on the batch-mates
    y = torch.cat([x[:1], torch.randn(4, 5) * 100])
    assert torch.equal(robust_normalize(y)[0], robust_normalize(x)[0])
    with pytest.raises(ValueError):
        robust_normalize(x, over="tokens")


def test_fsq_gradient_reaches_encoder_weights():
    client, server = build_codec(CodecConfig(name="fsq", levels=4, coder="ans", rate_weight=0.05), DIM)
    x = rows(30)
    enc = client(x)
    # the server's gradient arrives on `values` (straight-through across the network), plus the local aux loss
    server_grad = torch.randn_like(enc.values)
    torch.autograd.backward([enc.values, enc.aux_loss], [server_grad, torch.ones(())])
    assert client.proj.weight.grad is not None and client.proj.weight.grad.abs().sum() > 0
    assert {"distortion", "rate_bits"} <= set(client.last_stats)
    # the server half learns from the decoded values
    server(server.dequantize(enc.packet)).sum().backward()
    assert server.proj.weight.grad.abs().sum() > 0


def test_fsq_distortion_loss_value():
    # without sent statistics the client normalises with the exact mean and std (with them: their fp16 roundings)
    client, _ = build_codec(CodecConfig(name="fsq", levels=4, distortion_weight=0.25, send_stats=False), DIM)
    x = rows(20)
    enc = client(x)
    assert client.width == gaussian_width(4)  # norm_width 0: the Gaussian-optimal width
    z = robust_normalize(client.proj(x), width=client.width)
    z_hat, _ = quantize_indices(z, 4)
    want = 0.25 * (1 - torch.nn.functional.cosine_similarity(z, z_hat, dim=-1)).mean()
    assert torch.allclose(enc.aux_loss, want)


def test_fsq_fresh_codec_is_close_to_standardisation_and_fit_decoder_restores_scale():
    # the paper's codec: no statistics sent, so a fresh round trip can only return standardised rows
    client, server = build_codec(CodecConfig(name="fsq", levels=16, send_stats=False), DIM)
    x = rows(200, scale=0.02) + 0.05
    out = server.decode(client(x).packet)
    std = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True, correction=0)
    assert torch.nn.functional.cosine_similarity(out, std, dim=-1).mean() > 0.97
    err = fit_decoder(client, server, x)
    assert err < 0.05
    out = server.decode(client(x).packet)
    assert ((out - x) ** 2).sum() / (x ** 2).sum() < 0.05


@pytest.mark.parametrize("over", ["sample", "batch"])
def test_fsq_sent_statistics_keep_each_rows_scale_and_both_sides_agree_bit_for_bit(over):
    client, server = build_codec(CodecConfig(name="fsq", levels=16, coder="ans", norm_over=over), DIM)
    # rows of very different scales and offsets: without statistics they would all decode alike
    x = rows(64) * torch.logspace(-2, 1, 64)[:, None] + torch.linspace(-1, 1, 64)[:, None]
    enc = client(x)
    got = server.dequantize(Packet.from_bytes(enc.packet.to_bytes()))
    assert torch.equal(got, enc.values.detach())  # what the client applies the server's gradient to
    n_stats = 64 if over == "sample" else 1
    plain = build_codec(CodecConfig(name="fsq", levels=16, coder="ans", norm_over=over, send_stats=False), DIM)[0]
    assert len(enc.packet.side) == len(plain(x).packet.side) + 4 * n_stats  # two fp16 numbers per row (or packet)
    out = server(got).detach()  # a fresh decoder is the identity: the rows come back at their own scale
    if over == "sample":
        assert float((((out - x) ** 2).sum(1) / (x ** 2).sum(1)).max()) < 0.05
    else:  # one pair for the packet: the smallest rows are lost in its levels, the largest clipped at 3 sigma
        assert float(((out - x) ** 2).sum() / (x ** 2).sum()) < 0.2
    # the gradient reaches the rows' scale and offset too: d sum(values) / dx is about 1 everywhere
    xr = x.clone().requires_grad_(True)
    client(xr).values.sum().backward()
    assert abs(float(xr.grad.mean()) - 1.0) < 0.05
    # a packet whose statistics were cut off is refused, not misread
    cut = Packet(codec="fsq", shape=enc.packet.shape, payload=enc.packet.payload,
                 side=enc.packet.side[:4 * n_stats - 1], levels=16, coder="ans")
    with pytest.raises(PacketError, match="statistics"):
        server.dequantize(cut)


def test_fsq_rate_term_is_differentiable_and_tracks_entropy():
    z = torch.rand(4000) * 2 - 1
    z.requires_grad_(True)
    r = soft_rate_bits(z, 4)
    r.backward()
    assert z.grad.abs().sum() > 0
    assert abs(float(r.detach()) - 2.0) < 0.1  # uniform codes: about log2 L
    concentrated = torch.full((1000,), 1 / 3) + torch.randn(1000) * 0.01
    assert float(soft_rate_bits(concentrated, 4)) < 0.1


def test_fsq_pack_bits_and_ans_smaller_on_gaussian_rows():
    x = rows(256, d=DIM)
    sizes = {}
    for coder in ("pack", "ans"):  # the paper's width: 95 % of a Gaussian on the two inner levels, entropy ~1.27
        client, _ = build_codec(CodecConfig(name="fsq", levels=4, coder=coder, norm_width=3.0), DIM)
        p = client(x).packet
        sizes[coder] = len(p.payload) + len(p.side) - 256 * 4  # less the rows' fp16 mean and std
    assert sizes["pack"] == 256 * DIM * 2 // 8
    assert sizes["ans"] < 0.7 * sizes["pack"]


def test_gaussian_width_is_max_1960_and_beats_the_paper_width():
    # Max (1960), table of optimum uniform quantizers for a unit Gaussian: step 1.596, 0.9957, 0.5860, 0.3352
    for levels, step in ((2, 1.596), (4, 0.9957), (8, 0.5860), (16, 0.3352)):
        assert abs(gaussian_width(levels) - step * (levels - 1) / 2) < 2e-3
    # on Gaussian rows the round trip (levels put back at each row's mean and std) loses less than at 3 std, and
    # less than at 20 % narrower or wider
    x = torch.randn(2000, DIM, generator=torch.Generator().manual_seed(0))

    def err(width: float) -> float:
        mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True, correction=0)
        z_hat, _ = quantize_indices(robust_normalize(x, width), 4)
        return float(((restore_stats(z_hat, mu, sd, "sample") - x) ** 2).sum() / ((x - mu) ** 2).sum())

    w = gaussian_width(4)
    assert err(w) < min(err(0.8 * w), err(1.2 * w))
    assert err(w) < 0.5 * err(3.0)  # 0.12 against 0.27


def test_fsq_rejects_bad_settings():
    for kw in ({"levels": 1}, {"levels": 257}, {"coder": "zip"}, {"norm_over": "row"}, {"norm_width": -1.0},
               {"norm_width": float("nan")}):
        with pytest.raises(ValueError):
            build_codec(CodecConfig(name="fsq", **kw), DIM)


def test_fsq_wrong_levels_or_coder_in_packet():
    client, server = build_codec(CodecConfig(name="fsq", levels=4), DIM)
    p = client(rows(5)).packet
    with pytest.raises(PacketError, match="expects L = 4"):
        server.dequantize(dataclasses.replace(p, levels=8))
    with pytest.raises(PacketError, match="unknown index coder"):
        server.dequantize(dataclasses.replace(p, coder="zip"))
    with pytest.raises(PacketError, match="side information"):
        server.dequantize(dataclasses.replace(p, side=b"x"))


# --- nf -----------------------------------------------------------------------------------------------------

NF4_QLORA = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codebook_properties(bits):
    cb = nf_codebook(bits)
    assert len(cb) == 2 ** bits and len(set(cb.tolist())) == 2 ** bits
    assert torch.all(cb[1:] > cb[:-1])
    assert cb[0] == -1 and cb[-1] == 1 and (cb == 0).sum() == 1
    # QLoRA asymmetry: one more positive value than negative ones
    assert (cb > 0).sum() == 2 ** (bits - 1) and (cb < 0).sum() == 2 ** (bits - 1) - 1


def test_nf4_matches_qlora_table():
    assert torch.allclose(nf_codebook(4), torch.tensor(NF4_QLORA), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_bytes_counted(bits):
    n_rows, d = 100, 128  # 12800 elements = 200 blocks of 64 -> 1 group of 256
    client, _ = build_codec(CodecConfig(name="nf", bits=bits), d)
    p = client(rows(n_rows, d=d)).packet
    assert len(p.payload) == math.ceil(n_rows * d * bits / 8)
    assert len(p.side) == nf_side_bytes(n_rows * d) == 4 + 4 * 1 + 200
    bpe = (len(p.payload) + len(p.side)) * 8 / (n_rows * d)
    assert bpe == pytest.approx(bits + 8 / 64 + 64 / (n_rows * d))


def test_nf_error_is_small_at_4_bits_and_gradient_is_straight_through():
    client, server = build_codec(CodecConfig(name="nf", bits=4), DIM)
    x = rows(64).requires_grad_(True)
    enc = client(x)
    rel = ((enc.values - x) ** 2).sum() / (x ** 2).sum()
    assert rel < 0.02
    enc.values.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# --- topk ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,bits", [(64, 2), (256, 2), (1280, 2), (100, 3), (64, 4)])
def test_topk_bit_budget(d, bits):
    k = topk_k(d, bits)
    assert (d + 16 * k) / d <= bits < (d + 16 * (k + 1)) / d
    client, _ = build_codec(CodecConfig(name="topk", bits=bits), d)
    p = client(rows(8, d=d)).packet
    assert len(p.payload) * 8 <= bits * 8 * d + 7
    assert len(p.payload) == math.ceil(8 * d / 8) + 2 * 8 * k


def test_topk_keeps_largest_and_gradient_only_through_kept():
    client, server = build_codec(CodecConfig(name="topk", bits=2), DIM)
    k = topk_k(DIM, 2)
    x = rows(6).requires_grad_(True)
    enc = client(x)
    kept = enc.values.detach() != 0
    assert (kept.sum(1) == k).all()
    thresh = x.detach().abs().topk(k, dim=1).values[:, -1:]
    assert torch.equal(kept, x.detach().abs() >= thresh)
    enc.values.sum().backward()
    assert torch.equal(x.grad, kept.float())
    with pytest.raises(ValueError):
        topk_k(64, 1)


def test_topk_mask_with_wrong_count_raises():
    client, server = build_codec(CodecConfig(name="topk", bits=2), DIM)
    p = client(rows(2)).packet
    bad = bytearray(p.payload)
    bad[0] ^= 0xFF
    with pytest.raises(PacketError, match="exactly k"):
        server.dequantize(dataclasses.replace(p, payload=bytes(bad)))


def test_batch_normalisation_at_width_3_gives_the_reference_quantizers_indices():
    """The paper's quantizer: mu and torch's default std over the whole batch tensor, clip at mu +- 3 std, map onto
    [-1, 1], round to the nearest of L levels; written out here on its own and compared index for index."""
    from qtllava.compress.fsq import quantize_indices

    x = torch.randn(8, 64, 96, generator=torch.Generator().manual_seed(3)) * 1.7 + 0.3
    for levels in (2, 4, 8):
        mu, sd = x.mean(), torch.std(x)
        z = (torch.clamp(x, mu - 3 * sd, mu + 3 * sd) - mu) / (3 * sd)
        reference = torch.round((z + 1) / 2 * (levels - 1)).long()
        ours = quantize_indices(robust_normalize(x, width=3.0, over="batch"), levels)[1]
        assert torch.equal(ours.long(), reference), levels


def test_empty_batch_every_codec():
    for cfg in CONFIGS:
        client, server = build_codec(cfg, DIM)
        enc = client(torch.zeros(0, DIM))
        assert server.dequantize(Packet.from_bytes(enc.packet.to_bytes())).shape == enc.values.shape


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.name != "identity"], ids=cfg_id)
def test_bf16_rows_give_float32_values_equal_to_the_server(cfg):
    client, server = build_codec(cfg, DIM)
    client.to(torch.bfloat16)
    server.to(torch.bfloat16)
    x = rows(12).to(torch.bfloat16)
    enc = client(x)
    assert enc.values.dtype == torch.float32
    assert torch.equal(server.dequantize(enc.packet), enc.values.detach())
    assert server(enc.values).dtype == torch.bfloat16 or not list(server.parameters())
