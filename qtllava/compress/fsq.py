"""`fsq`: the paper's learned scalar quantizer (Quantized-TinyLLaVA, arXiv 2511.23402), with `pack` or `ans` index
coding.

Client: x (N, D) -> Linear(D -> d_code) -> robust normalisation onto [-1, 1] -> L uniform levels (both endpoints
included) with a straight-through estimator -> indices, coded by `pack` (ceil(log2 L) bits each) or `ans`.
Server: indices -> level values (N, d_code) [-> rows rescaled by the sent statistics] -> Linear(d_code -> D).

Loss terms returned as `aux_loss` (added to the client's loss):
- distortion: mean over rows of 1 - cos(z_n, stopgrad(q(z_n))), where z_n is the normalised encoder output (the
  tensor being quantized; cosine of the raw encoder output would also count the removed row mean), times
  cfg.distortion_weight (0.25 in the paper);
- rate (cfg.rate_weight > 0): the entropy in bits per element of the soft-assignment histogram of the codes
  (soft-to-hard quantization, Agustsson et al. 2017): each value is softly assigned to the levels with a Gaussian
  kernel of width a quarter of the level spacing; the histogram of those assignments is a differentiable estimate
  of the pooled model the `ans` coder uses, and its entropy approaches the hard empirical entropy (the rate `ans`
  achieves) as the kernel narrows. Minimising it concentrates the codes on fewer levels.

Normalisation statistics: `over="sample"` uses each row's own mean and standard deviation (population std over the
d_code channels of that token), so a token's codes never depend on other tokens, other samples or the batch size;
this is our reading of the paper's per-sample statistics for a codec that sees rows of several samples. `over="batch"`
uses one mean/std pair over the whole (N, d_code) tensor, as the paper does.

Clipping width (`width`, config `norm_width`): the paper clips at mean +- 3 std, which for L = 4 puts the levels at
+-1 and +-3 std and sends 95 % of a bell-shaped row to the two inner levels. `width=0` (our default) takes the width
of the mean-squared-error-optimal uniform quantizer of a unit Gaussian with L levels (Max 1960; `gaussian_width`):
0.80, 1.49, 2.05, 2.51 std for L = 2, 4, 8, 16. On the tiny baseline's connector rows that cuts the relative squared
error of an L = 4 round trip from 0.27 (width 3) to 0.115 (docs/experiments.md, "Which clipping width should fsq
use?").

Sending the statistics (`send_stats`, our default; the paper sends none): each row's mean and std go in the packet's
side information as two fp16 numbers (32 bits per row: 0.125 bits per element at d_code = 256, 0.036 at 896), and the
server dequantizes each row of levels to that mean and std (`restore_stats`), i.e. back to the encoder's output scale.
Without them the normalisation drops each row's scale and position for good: a fresh decoder hands the LLM standardised
rows whatever the scale it was trained on (image rows reached the tiny LLM 3.4x too small, text rows 40-120x too large;
docs/experiments.md, "Why did fsq L = 2 lose the existence questions?"), and rows that differ only in scale (an object
patch against the white canvas) look alike. On the client the sent values are computed from the same fp16 numbers, so
both sides hold bit-equal values, and the gradient flows to the encoder through the statistics as well as through the
levels (straight-through).
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qtllava.compress.base import (ClientCodec, Encoded, Packet, PacketError, ServerCodec, bytes_to_float,
                                   float_to_bytes, register_codec)
from qtllava.compress.coding import CodingError, ans_decode, ans_encode, pack_indices, unpack_indices
from qtllava.config import CodecConfig

__all__ = [
    "robust_normalize",
    "normalization_stats",
    "restore_stats",
    "level_values",
    "gaussian_width",
    "clip_width",
    "quantize_indices",
    "soft_rate_bits",
    "encode_indices",
    "decode_indices",
    "FsqEncoder",
    "FsqDecoder",
    "fit_decoder",
    "CODERS",
]

log = logging.getLogger(__name__)

CODERS = ("pack", "ans")
NORM_OVER = ("sample", "batch")
_RATE_SAMPLE = 1 << 16  # elements used by the soft rate estimate (a fixed strided subset of larger tensors)
_RATE_KERNEL = 0.25  # soft-assignment kernel width, in units of the level spacing
_FP16_MAX = 65504.0


def normalization_stats(x: torch.Tensor, over: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of the robust normalisation of x (..., C): per row over the last axis (shapes (..., 1)) for
    over="sample" (sigma the population std), one pair over the whole tensor (0-d) for over="batch" (sigma torch's
    default unbiased std, as the paper's reference quantizer computes it, so that its indices are reproduced)."""
    if over == "sample":
        return x.mean(dim=-1, keepdim=True), x.std(dim=-1, keepdim=True, correction=0)
    if over == "batch":
        return x.mean(), x.std()
    raise ValueError(f"fsq normalisation: over must be one of {NORM_OVER}, got {over!r}")


def robust_normalize(x: torch.Tensor, width: float = 3.0, over: str = "sample", eps: float = 1e-8,
                     stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Clip to mean +- width * std and map linearly onto [-1, 1]: clamp((x - mu) / (width * sigma), -1, 1).

    x: (..., C). over="sample": mu, sigma per row over the last axis (each token alone); over="batch": one pair over
    the whole tensor (the paper). sigma is the population std; a constant row maps to 0. Differentiable. `stats`:
    (mu, sigma) already computed by `normalization_stats(x, over)`.
    """
    if over not in NORM_OVER:
        raise ValueError(f"robust_normalize: over must be one of {NORM_OVER}, got {over!r}")
    if x.numel() == 0:
        return x * 1.0
    mu, sigma = stats if stats is not None else normalization_stats(x, over)
    return ((x - mu) / (width * sigma).clamp_min(eps)).clamp(-1.0, 1.0)


def level_values(levels: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The L uniform levels on [-1, 1] including both endpoints: level k = -1 + 2k/(L-1), k = 0..L-1."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    k = torch.arange(levels, dtype=torch.float64)
    return (-1.0 + 2.0 * k / (levels - 1)).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def gaussian_width(levels: int) -> float:
    """The clipping width (in standard deviations) of the uniform L-level quantizer with levels at width x
    level_values(L) that has the least mean squared error on a unit Gaussian (Max 1960: 0.798, 1.494, 2.051, 2.513
    for L = 2, 4, 8, 16). Numerical: golden-section search over the width, the error integrated on a fine grid."""
    table = level_values(levels, dtype=torch.float64).numpy()
    x = np.linspace(-10.0, 10.0, 40001)
    pdf = np.exp(-0.5 * x * x)
    pdf /= pdf.sum()

    def mse(width: float) -> float:  # levels are uniform: the nearest one is a rounding, as in quantize_indices
        k = np.clip(np.rint((x / width + 1.0) * ((levels - 1) / 2.0)), 0, levels - 1).astype(np.int64)
        return float((pdf * (x - width * table[k]) ** 2).sum())

    lo, hi, g = 0.05, 8.0, (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = mse(a), mse(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = mse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = mse(b)
    return round((lo + hi) / 2.0, 4)


def clip_width(width: float, levels: int) -> float:
    """The clipping width in force: `width` std, or for 0 (the config default) `gaussian_width(levels)`."""
    return width or gaussian_width(levels)


def quantize_indices(z: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round z (values in [-1, 1]) to the nearest of L levels.

    Returns (z_hat, indices): z_hat has z's shape and dtype, its forward value is exactly level_values(L)[indices]
    and its gradient w.r.t. z is the identity (straight-through); indices are uint8 (L <= 256), no gradient.
    """
    table = level_values(levels, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        idx = torch.round((z.clamp(-1.0, 1.0) + 1.0) * ((levels - 1) / 2.0)).clamp_(0, levels - 1).long()
    # exact forward value (adding an exact zero), identity backward
    z_hat = table[idx] + (z - z.detach())
    return z_hat, idx.to(torch.uint8)


def soft_rate_bits(z: torch.Tensor, levels: int, kernel: float = _RATE_KERNEL,
                   max_elements: int = _RATE_SAMPLE) -> torch.Tensor:
    """Differentiable rate estimate in bits per element: entropy of the soft-assignment histogram of z over L levels.

    z: any shape, values in [-1, 1]. Tensors larger than `max_elements` use a fixed strided subset (deterministic,
    odd stride so that every channel is visited). Returns a scalar (0 for an empty tensor).
    """
    flat = z.reshape(-1)
    if flat.numel() == 0:
        return z.new_zeros(())
    if flat.numel() > max_elements:
        step = math.ceil(flat.numel() / max_elements) | 1
        flat = flat[::step]
    table = level_values(levels, dtype=z.dtype, device=z.device)
    tau = kernel * 2.0 / (levels - 1)
    logits = -((flat[:, None] - table[None, :]) ** 2) / (2 * tau * tau)
    m = torch.softmax(logits, dim=1).mean(0)
    return -(m * torch.log2(m.clamp_min(1e-12))).sum()


def encode_indices(idx: np.ndarray, levels: int, coder: str) -> tuple[bytes, bytes]:
    """Index array (N, C) -> (payload, side) with the named coder ("pack" or "ans")."""
    if coder == "pack":
        return pack_indices(idx, levels), b""
    if coder == "ans":
        return ans_encode(idx, levels)
    raise ValueError(f"unknown index coder {coder!r}; known: {', '.join(CODERS)}")


def decode_indices(payload: bytes, side: bytes, levels: int, coder: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `encode_indices`; raises PacketError naming what is wrong."""
    try:
        if coder == "pack":
            if side:
                raise PacketError(f"pack-coded packet carries {len(side)} bytes of side information (expected 0)")
            return unpack_indices(payload, levels, math.prod(shape)).reshape(shape)
        if coder == "ans":
            return ans_decode(payload, side, levels, shape)
    except CodingError as e:
        raise PacketError(f"{coder} payload for shape {tuple(shape)}, L={levels}: {e}") from e
    raise PacketError(f"unknown index coder {coder!r}; known: {', '.join(CODERS)}")


class FsqEncoder(ClientCodec):
    """Client half: rows (N, D) -> Linear -> robust normalisation -> L levels -> coded indices (+ the statistics)."""

    codec_name = "fsq"

    def pre_map(self) -> nn.Module:
        return self.proj

    def __init__(self, dim: int, d_code: int, levels: int, coder: str = "pack", over: str = "sample",
                 width: float = 0.0, distortion_weight: float = 0.25, rate_weight: float = 0.0,
                 send_stats: bool = True):
        super().__init__()
        _check_args(levels, coder, over, width)
        self.dim, self.d_code, self.levels, self.coder = dim, d_code, levels, coder
        self.over, self.width, self.send_stats = over, clip_width(width, levels), send_stats
        self.distortion_weight, self.rate_weight = distortion_weight, rate_weight
        self.proj = nn.Linear(dim, d_code)
        self.last_stats: dict[str, float] = {}  # distortion and rate (bits/element) of the last call, for logging
        _init_encoder(self.proj)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bytes]:
        """Rows (N, D) -> (z, values, indices, stats): the normalised code before rounding, the values the server
        will dequantize (straight-through: level values, or with `send_stats` the levels put back at each row's
        mean and scale), the level indices, and the statistics' wire bytes (b"" without `send_stats`). No entropy
        coding."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"fsq encoder expects rows (N, {self.dim}), got {tuple(x.shape)}")
        # statistics, levels and the values handed on are float32 whatever the model dtype, so that they equal
        # what the server dequantizes
        e = self.proj(x).float()
        if not self.send_stats or e.shape[0] == 0:
            z = robust_normalize(e, self.width, self.over)
            return (z, *quantize_indices(z, self.levels), b"")
        mu, sigma = (_as_sent(t) for t in normalization_stats(e, self.over))
        z = robust_normalize(e, self.width, self.over, stats=(mu, sigma))
        z_hat, idx = quantize_indices(z, self.levels)
        wire = float_to_bytes(torch.stack(torch.broadcast_tensors(mu, sigma), dim=-1).reshape(-1, 2), "fp16")
        return z, restore_stats(z_hat, mu, sigma, self.over), idx, wire

    def forward(self, x: torch.Tensor) -> Encoded:
        z, values, idx, stats_bytes = self.quantize(x)
        z_hat = level_values(self.levels, device=z.device)[idx.long()]  # what z was rounded to (no gradient)
        if z.shape[0]:
            distortion = (1.0 - F.cosine_similarity(z, z_hat, dim=-1, eps=1e-8)).mean()
        else:
            distortion = z.sum() * 0.0
        aux = self.distortion_weight * distortion
        stats = {"distortion": float(distortion.detach())}
        if self.rate_weight:
            rate = soft_rate_bits(z, self.levels)
            aux = aux + self.rate_weight * rate
            stats["rate_bits"] = float(rate.detach())
        self.last_stats = stats
        payload, side = encode_indices(idx.cpu().numpy(), self.levels, self.coder)
        packet = Packet(codec=self.codec_name, shape=(int(x.shape[0]), self.d_code), payload=payload,
                        side=stats_bytes + side, levels=self.levels, coder=self.coder)
        return Encoded(packet, aux, values)


class FsqDecoder(ServerCodec):
    """Server half: packet -> level values (N, d_code) [rescaled by the sent statistics] -> Linear(d_code -> D).
    Decodes `pack` and `ans` packets."""

    codec_name = "fsq"
    fits = True

    def fit(self, encoder: ClientCodec, rows: torch.Tensor) -> float:
        """Least-squares fit of the decoder on `rows` as `encoder` codes them (`fit_decoder`)."""
        return fit_decoder(encoder, self, rows)

    def __init__(self, dim: int, d_code: int, levels: int, width: float = 0.0, over: str = "sample",
                 send_stats: bool = True):
        super().__init__()
        _check_args(levels, "pack", over, width)
        self.dim, self.d_code, self.levels = dim, d_code, levels
        self.width = clip_width(width, levels)
        self.over, self.send_stats = over, send_stats
        # a fresh round trip returns the encoder's rows (with the statistics) or standardised rows (without)
        self.init_gain = 1.0 if send_stats else self.width
        self.proj = nn.Linear(d_code, dim)
        # Output scale, fixed (not trained): 1 for a fresh decoder; a least-squares warm start (`fit_decoder`) puts
        # the scale of its target rows here and keeps `proj` at the size of a fresh one, so that the optimizer's
        # steps (Adam: ~lr per weight, whatever the weight's size) stay small against the weights. Fitted straight
        # into `proj`, a text decoder (rows of std 0.024) was undone within the 300 steps of stage 1
        # (docs/experiments.md, "Why did fsq L = 4 cost far more on the 24000-step base than on the weak base?").
        self.register_buffer("out_scale", torch.ones(()))
        _init_decoder(self.proj, self.init_gain)

    def dequantize(self, packet: Packet) -> torch.Tensor:
        self.check(packet, self.d_code)
        if packet.levels != self.levels:
            raise PacketError(f"fsq packet has L = {packet.levels}, this decoder expects L = {self.levels}")
        n_stats = 0
        if self.send_stats and packet.shape[0]:
            n_stats = packet.shape[0] if self.over == "sample" else 1
        if len(packet.side) < 4 * n_stats:
            raise PacketError(f"fsq packet of {packet.shape[0]} rows carries {len(packet.side)} bytes of side "
                              f"information; its statistics alone need {4 * n_stats} (fp16 mean and std per "
                              f"{'row' if self.over == 'sample' else 'packet'})")
        stats_bytes, coder_side = packet.side[:4 * n_stats], packet.side[4 * n_stats:]
        idx = decode_indices(packet.payload, coder_side, packet.levels, packet.coder, packet.shape)
        table = level_values(self.levels, device=self.proj.weight.device)
        values = table[torch.from_numpy(idx.astype(np.int64)).to(table.device)]
        if not n_stats:
            return values
        stats = bytes_to_float(stats_bytes, "fp16", (n_stats, 2)).to(table.device)
        if self.over == "sample":
            return restore_stats(values, stats[:, :1], stats[:, 1:], self.over)
        return restore_stats(values, stats[0, 0], stats[0, 1], self.over)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.proj(values.to(self.proj.weight.dtype)) * self.out_scale.to(self.proj.weight.dtype)


def restore_stats(values: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, over: str) -> torch.Tensor:
    """Level values (N, C) -> rows with the sent mean mu and std sigma (per row for over="sample", of the whole
    tensor for "batch"): the levels are standardised by their own mean and std, then scaled and shifted. Matching
    both moments beats width x sigma x level + mu, which makes L = 2 rows 3x too wide (every element at +-3 sigma).
    Client and server run this same function on bit-equal inputs, so they get bit-equal rows."""
    m, s = normalization_stats(values, over)
    return (values - m) / s.clamp_min(1e-8) * sigma + mu


def _as_sent(t: torch.Tensor) -> torch.Tensor:
    # forward: the fp16 number that goes on the wire (so both sides compute with it), exactly; backward: identity
    sent = t.detach().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(t.dtype)
    return sent + (t - t.detach())


def _check_args(levels: int, coder: str, over: str, width: float) -> None:
    if not 2 <= levels <= 256:
        raise ValueError(f"fsq: levels must be in 2..256, got {levels}")
    if not (math.isfinite(width) and width >= 0):
        raise ValueError(f"fsq: norm_width must be 0 (the Gaussian-optimal width for L) or a positive number of "
                         f"standard deviations, got {width}")
    if coder not in CODERS:
        raise ValueError(f"fsq: unknown coder {coder!r}; known: {', '.join(CODERS)}")
    if over not in NORM_OVER:
        raise ValueError(f"fsq: norm_over must be one of {NORM_OVER}, got {over!r}")


@torch.no_grad()
def _init_encoder(lin: nn.Linear) -> None:
    # identity when d_code == D (a fresh codec quantizes the features themselves); else orthonormal rows
    d_code, dim = lin.weight.shape
    if d_code == dim:
        lin.weight.copy_(torch.eye(dim))
    else:
        nn.init.orthogonal_(lin.weight)
    lin.bias.zero_()


@torch.no_grad()
def _init_decoder(lin: nn.Linear, gain: float) -> None:
    # gain x identity (orthonormal columns where d_code != D): gain 1 returns rows dequantized with their sent
    # statistics as they are; gain = width undoes the 1/(width * sigma) of the normalisation, so that without
    # statistics a fresh round trip returns each row standardised (zero mean, unit std) instead of squeezed into [-1, 1]
    dim, d_code = lin.weight.shape
    if d_code == dim:
        lin.weight.copy_(torch.eye(dim) * gain)
    else:
        nn.init.orthogonal_(lin.weight)
        lin.weight.mul_(gain)
    lin.bias.zero_()


@torch.no_grad()
def fit_decoder(client: FsqEncoder, server: FsqDecoder, x: torch.Tensor, ridge: float = 1e-3) -> float:
    """Warm start: least-squares fit of the server's Linear so that decode(encode(x)) ~ x on the rows x (N, D).

    Useful once at the start of stage 1 (it restores the feature scale that the normalisation removed). The fitted
    map is stored as out_scale x proj with proj as large as a fresh decoder's (init_gain x identity in Frobenius norm),
    so training moves it no faster than a fresh one. Returns the relative squared error after the fit.
    """
    v = client.quantize(x)[1].to(torch.float64)  # the values the server would dequantize; no coding needed
    a = torch.cat([v, torch.ones(v.shape[0], 1, dtype=v.dtype, device=v.device)], dim=1)
    target = x.to(torch.float64)
    gram = a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    sol = torch.linalg.solve(gram, a.T @ target)  # (d_code + 1, D)
    fresh_norm = server.init_gain * math.sqrt(min(server.dim, server.d_code))
    scale = float(torch.linalg.matrix_norm(sol[:-1])) / fresh_norm or 1.0
    server.out_scale.fill_(scale)
    server.proj.weight.copy_((sol[:-1].T / scale).to(server.proj.weight.dtype))
    server.proj.bias.copy_((sol[-1] / scale).to(server.proj.bias.dtype))
    err = ((a @ sol - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-30)
    log.info("fsq decoder fitted on %d rows: relative squared error %.4f", x.shape[0], float(err))
    return float(err)


@register_codec("fsq", learned=True)
def build_fsq(cfg: CodecConfig, dim: int) -> tuple[FsqEncoder, FsqDecoder]:
    """The paper's FSQ-like quantizer: Linear(D -> d_code), robust normalisation, L levels, Linear(d_code -> D)."""
    d_code = cfg.d_code or dim
    client = FsqEncoder(dim, d_code, cfg.levels, coder=cfg.coder, over=cfg.norm_over, width=cfg.norm_width,
                        distortion_weight=cfg.distortion_weight, rate_weight=cfg.rate_weight,
                        send_stats=cfg.send_stats)
    return client, FsqDecoder(dim, d_code, cfg.levels, width=cfg.norm_width, over=cfg.norm_over,
                              send_stats=cfg.send_stats)
