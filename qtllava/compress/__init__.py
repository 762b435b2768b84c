"""Compressors on the cut: one small interface (`base`), one file per codec, each registered by exact name.

Uplink codecs (built per modality with `build_codec(cfg, dim)`): identity, fsq, nf, topk. Index coding for fsq:
`coding` (pack, ans). Downlink gradient codecs: `grad` (fp32, fp16, bf16, int8, int4). Choosing L: `levels`.
"""

from qtllava.compress.base import (ClientCodec, Encoded, Packet, PacketError, ServerCodec, build_codec, codec_names,
                                   nbytes, register_codec)
from qtllava.compress import identity  # noqa: F401  (registers "identity")
from qtllava.compress import fsq  # noqa: F401  (registers "fsq")
from qtllava.compress import nf  # noqa: F401  (registers "nf")
from qtllava.compress import topk  # noqa: F401  (registers "topk")
from qtllava.compress.grad import decode_grad, encode_grad, grad_codec_names

__all__ = ["ClientCodec", "Encoded", "Packet", "PacketError", "ServerCodec", "build_codec", "codec_names", "nbytes",
           "register_codec", "encode_grad", "decode_grad", "grad_codec_names"]
