"""`topk`: per-row top-k magnitudes in fp16 at a budget of b bits per element; no learned parameters.

Each row of width D sends a D-bit mask (1 = kept) and its k kept values in fp16, column order; k is the largest
integer with (D + 16 k) / D <= b, i.e. k = floor((b - 1) D / 16) (b = 2, D = 256 -> k = 16, exactly 2 bits per
element). Wire: payload = the N x D mask bits packed row-major (little-endian bit order, ceil(N D / 8) bytes) followed
by the N k fp16 values (row-major). Dropped entries decode to 0.

Gradient (client side): only the kept entries receive the server's gradient (identity there); the gradient for a
dropped entry is discarded, since the server's value for it did not depend on x.
"""

from __future__ import annotations

import numpy as np
import torch

from qtllava.compress.base import (ClientCodec, Encoded, Packet, PacketError, ServerCodec, bytes_to_float,
                                   float_to_bytes, register_codec)
from qtllava.config import CodecConfig

__all__ = ["topk_k", "TopkEncoder", "TopkDecoder"]


def topk_k(dim: int, bits: float) -> int:
    """Entries kept per row of width `dim` at `bits` bits per element: the largest k with (dim + 16 k)/dim <= bits."""
    k = int((bits - 1) * dim // 16)
    if k < 1:
        raise ValueError(f"topk: a budget of {bits} bits per element at width {dim} keeps no entry (needs > 1 + 16/D)")
    return min(k, dim)


class TopkEncoder(ClientCodec):
    codec_name = "topk"

    def __init__(self, dim: int, bits: float):
        super().__init__()
        self.dim, self.k = dim, topk_k(dim, bits)

    def forward(self, x: torch.Tensor) -> Encoded:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"topk encoder expects rows (N, {self.dim}), got {tuple(x.shape)}")
        xd = x.detach()
        pos = xd.abs().topk(self.k, dim=1).indices
        mask = torch.zeros_like(xd, dtype=torch.bool).scatter_(1, pos, True)
        kept = xd[mask]  # row-major: rows in order, columns ascending within a row
        wire = torch.zeros(xd.shape, dtype=torch.float32, device=xd.device)
        wire[mask] = kept.to(torch.float16).float()
        values = wire + mask * (x - xd).float()  # float32, exact forward; gradient only through kept entries
        bits = np.packbits(mask.cpu().numpy().reshape(-1), bitorder="little").tobytes()
        packet = Packet(codec=self.codec_name, shape=tuple(int(s) for s in x.shape),
                        payload=bits + float_to_bytes(kept, "fp16"), levels=0, coder="mask", dtype="fp16")
        return Encoded(packet, x.new_zeros(()), values)


class TopkDecoder(ServerCodec):
    codec_name = "topk"

    def __init__(self, dim: int, bits: float):
        super().__init__()
        self.dim, self.k = dim, topk_k(dim, bits)

    def dequantize(self, packet: Packet) -> torch.Tensor:
        self.check(packet, self.dim)
        if packet.dtype != "fp16" or packet.coder != "mask":
            raise PacketError(f"topk packet has dtype {packet.dtype!r}, coder {packet.coder!r}; expected fp16/mask")
        if packet.side:
            raise PacketError(f"topk packet carries {len(packet.side)} bytes of side information (expected 0)")
        n, d = packet.shape
        mask_bytes = (n * d + 7) // 8
        need = mask_bytes + 2 * n * self.k
        if len(packet.payload) != need:
            raise PacketError(f"topk payload has {len(packet.payload)} bytes, shape {packet.shape} with k = {self.k} "
                              f"needs {need}")
        bits = np.unpackbits(np.frombuffer(packet.payload[:mask_bytes], dtype=np.uint8), bitorder="little")
        mask = torch.from_numpy(bits[: n * d].astype(bool)).reshape(n, d)
        if n and not bool((mask.sum(1) == self.k).all()):
            raise PacketError(f"topk mask does not keep exactly k = {self.k} entries in every row")
        out = torch.zeros(n, d, dtype=torch.float32)
        out[mask] = bytes_to_float(packet.payload[mask_bytes:], "fp16", (n * self.k,))
        return out


@register_codec("topk")
def build_topk(cfg: CodecConfig, dim: int) -> tuple[TopkEncoder, TopkDecoder]:
    """Per-row top-k magnitudes in fp16 plus a 1-bit mask, at cfg.bits bits per element; no parameters."""
    return TopkEncoder(dim, cfg.bits), TopkDecoder(dim, cfg.bits)
