"""`nf`: QLoRA NormalFloat (k = 2, 3, 4 bits) with double-quantized block scales; no learned parameters.

The tensor (N, D) is flattened row-major and cut into blocks of 64 elements (the last one may be short; nothing is
padded on the wire). Each block is scaled by its absmax and each element is rounded to the nearest of the 2^k
NormalFloat values. The block scales (fp32 absmax) are double-quantized as in QLoRA: their mean is subtracted, the
residuals are cut into groups of 256 and each group is quantized to int8 with its own fp32 absmax. Elements are
rounded against the *dequantized* scale, the one the server will use, so the client rounds for the real
reconstruction.

Wire: payload = k-bit indices packed (ceil(n k / 8) bytes); side = [mean fp32] + [group absmax fp32 x ceil(nb/256)]
+ [int8 code x nb], nb = ceil(n / 64). For D a multiple of 64 that is k + 8/64 + 32/(64*256) bits per element
(4.127 at k = 4, QLoRA's figure). Gradient (client side): straight-through (identity).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

from qtllava.compress.base import ClientCodec, Encoded, Packet, PacketError, ServerCodec, register_codec
from qtllava.compress.coding import CodingError, pack_indices, unpack_indices
from qtllava.config import CodecConfig

__all__ = ["nf_codebook", "nf_quantize", "nf_dequantize", "NfEncoder", "NfDecoder", "BLOCK", "SCALE_BLOCK"]

BLOCK = 64  # elements per absmax block
SCALE_BLOCK = 256  # block scales per second-level group
NF_BITS = (2, 3, 4)


def nf_codebook(bits: int) -> torch.Tensor:
    """The 2^k NormalFloat values (float32, ascending, from -1 to 1, with an exact 0), QLoRA's construction.

    2^(k-1) positive values at the normal quantiles of linspace(offset, 1/2, 2^(k-1) + 1) (last dropped),
    2^(k-1) - 1 negative ones at those of linspace(offset, 1/2, 2^(k-1)) (last dropped), and 0, all divided by the
    largest; offset = (1 - 1/(2(2^k - 1)) + 1 - 1/(2 * 2^k)) / 2 (0.9677 for k = 4).
    """
    if bits not in NF_BITS:
        raise ValueError(f"nf: bits must be one of {NF_BITS}, got {bits}")
    n = 1 << bits
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    values = np.sort(np.array(pos + [0.0] + neg, dtype=np.float64))
    return torch.tensor(values / values.max(), dtype=torch.float32)


def _scales(mean: torch.Tensor, group_absmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Dequantized block scales (nb,) from the double-quantized side information; used by both sides."""
    step = (group_absmax / 127.0).repeat_interleave(SCALE_BLOCK)[: codes.numel()]
    return mean + codes.to(torch.float32) * step


def nf_quantize(x: torch.Tensor, bits: int) -> tuple[np.ndarray, bytes, torch.Tensor]:
    """x (any shape, float) -> (indices uint8 (numel,), side bytes, dequantized values float32 of x's shape)."""
    cb = nf_codebook(bits).to(x.device)
    f = x.detach().reshape(-1).to(torch.float32)
    n = f.numel()
    nb = math.ceil(n / BLOCK)
    padded = torch.zeros(nb * BLOCK, dtype=torch.float32, device=f.device)
    padded[:n] = f
    absmax = padded.view(nb, BLOCK).abs().amax(dim=1) if nb else padded[:0]
    mean = absmax.mean() if nb else torch.zeros((), device=f.device)
    ng = math.ceil(nb / SCALE_BLOCK)
    resid = torch.zeros(ng * SCALE_BLOCK, dtype=torch.float32, device=f.device)
    resid[:nb] = absmax - mean
    group_absmax = resid.view(ng, SCALE_BLOCK).abs().amax(dim=1) if ng else resid[:0]
    step = (group_absmax / 127.0).repeat_interleave(SCALE_BLOCK)[:nb]
    codes = torch.where(step > 0, torch.round(resid[:nb] / torch.where(step > 0, step, 1.0)), 0.0)
    codes = codes.clamp(-127, 127).to(torch.int8)
    scale = _scales(mean, group_absmax, codes)
    elem_scale = scale.repeat_interleave(BLOCK)[:n]
    y = f / torch.where(elem_scale != 0, elem_scale, 1.0)
    mid = (cb[1:] + cb[:-1]) / 2
    idx = torch.bucketize(y, mid)
    zero = int(torch.nonzero(cb == 0)[0])
    idx = torch.where(elem_scale != 0, idx, zero)
    values = (cb[idx] * elem_scale).reshape(x.shape)
    side = (mean.reshape(1).cpu().numpy().astype("<f4").tobytes() + group_absmax.cpu().numpy().astype("<f4").tobytes()
            + codes.cpu().numpy().astype(np.int8).tobytes())
    return idx.to(torch.uint8).cpu().numpy(), side, values


def nf_side_bytes(numel: int) -> int:
    """Bytes of side information for `numel` elements: 4 + 4 * ceil(nb / 256) + nb, nb = ceil(numel / 64)."""
    nb = math.ceil(numel / BLOCK)
    return 4 + 4 * math.ceil(nb / SCALE_BLOCK) + nb


def nf_dequantize(indices: np.ndarray, side: bytes, bits: int, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """Server side: indices (numel,) + side bytes -> float32 tensor of `shape`. Raises PacketError on a bad size."""
    n = math.prod(shape)
    if len(side) != nf_side_bytes(n):
        raise PacketError(f"nf side information has {len(side)} bytes, shape {shape} needs {nf_side_bytes(n)}")
    nb = math.ceil(n / BLOCK)
    ng = math.ceil(nb / SCALE_BLOCK)
    raw = np.frombuffer(side, dtype=np.uint8)
    mean = torch.from_numpy(raw[:4].copy().view("<f4").astype(np.float32)).reshape(())
    group_absmax = torch.from_numpy(raw[4:4 + 4 * ng].copy().view("<f4").astype(np.float32))
    codes = torch.from_numpy(raw[4 + 4 * ng:].copy().view(np.int8))
    scale = _scales(mean, group_absmax, codes)
    elem_scale = scale.repeat_interleave(BLOCK)[:n]
    cb = nf_codebook(bits)
    values = cb[torch.from_numpy(indices.astype(np.int64))] * elem_scale
    return values.reshape(shape).to(device) if device is not None else values.reshape(shape)


class NfEncoder(ClientCodec):
    codec_name = "nf"

    def __init__(self, dim: int, bits: int):
        super().__init__()
        if bits not in NF_BITS:
            raise ValueError(f"nf: bits must be one of {NF_BITS}, got {bits}")
        self.dim, self.bits = dim, bits

    def forward(self, x: torch.Tensor) -> Encoded:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"nf encoder expects rows (N, {self.dim}), got {tuple(x.shape)}")
        idx, side, deq = nf_quantize(x, self.bits)
        values = deq.detach() + (x - x.detach()).float()  # float32, exact forward, straight-through backward
        packet = Packet(codec=self.codec_name, shape=tuple(int(s) for s in x.shape),
                        payload=pack_indices(idx, 1 << self.bits), side=side, levels=1 << self.bits, coder="pack",
                        dtype=f"nf{self.bits}")
        return Encoded(packet, x.new_zeros(()), values)


class NfDecoder(ServerCodec):
    codec_name = "nf"

    def __init__(self, dim: int, bits: int):
        super().__init__()
        self.dim, self.bits = dim, bits

    def dequantize(self, packet: Packet) -> torch.Tensor:
        self.check(packet, self.dim)
        if packet.levels != 1 << self.bits or packet.dtype != f"nf{self.bits}":
            raise PacketError(f"nf packet is {packet.dtype!r} with L = {packet.levels}; this decoder expects "
                              f"nf{self.bits} (L = {1 << self.bits})")
        if packet.coder != "pack":
            raise PacketError(f"nf packet coder {packet.coder!r} is not 'pack'")
        try:
            idx = unpack_indices(packet.payload, packet.levels, packet.numel)
        except CodingError as e:
            raise PacketError(f"nf payload for shape {packet.shape}: {e}") from e
        return nf_dequantize(idx, packet.side, self.bits, packet.shape)


@register_codec("nf")
def build_nf(cfg: CodecConfig, dim: int) -> tuple[NfEncoder, NfDecoder]:
    """QLoRA NormalFloat at cfg.bits (2, 3, 4) bits, blocks of 64, double-quantized scales; no parameters."""
    return NfEncoder(dim, cfg.bits), NfDecoder(dim, cfg.bits)
