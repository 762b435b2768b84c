"""`identity`: float passthrough (fp32 / fp16 / bf16) with exact byte accounting; no learned parameters."""

from __future__ import annotations

import torch

from qtllava.compress.base import (WIRE_FLOAT_DTYPES, ClientCodec, Encoded, Packet, PacketError, ServerCodec,
                                   bytes_to_float, float_to_bytes, register_codec)
from qtllava.config import CodecConfig


class IdentityEncoder(ClientCodec):
    codec_name = "identity"

    def __init__(self, dtype: str = "fp16"):
        super().__init__()
        if dtype not in WIRE_FLOAT_DTYPES:
            raise ValueError(f"identity codec: unknown dtype {dtype!r}; known: {', '.join(WIRE_FLOAT_DTYPES)}")
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> Encoded:
        wire = x.detach().to(WIRE_FLOAT_DTYPES[self.dtype]).to(x.dtype)
        values = x + (wire - x).detach()  # forward: exactly what the server sees; backward: identity
        packet = Packet(codec=self.codec_name, shape=tuple(x.shape), payload=float_to_bytes(x, self.dtype),
                        dtype=self.dtype)
        return Encoded(packet, x.new_zeros(()), values)


class IdentityDecoder(ServerCodec):
    codec_name = "identity"

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def dequantize(self, packet: Packet) -> torch.Tensor:
        self.check(packet, self.dim)
        if packet.dtype not in WIRE_FLOAT_DTYPES:
            raise PacketError(f"identity packet has unknown dtype {packet.dtype!r}")
        return bytes_to_float(packet.payload, packet.dtype, packet.shape)


@register_codec("identity")
def build_identity(cfg: CodecConfig, dim: int) -> tuple[IdentityEncoder, IdentityDecoder]:
    """Float passthrough in cfg.dtype."""
    return IdentityEncoder(cfg.dtype), IdentityDecoder(dim)
