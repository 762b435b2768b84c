"""Compressors on the cut: one small interface (`base`), one file per codec, each registered by exact name."""

from qtllava.compress.base import (ClientCodec, Encoded, Packet, PacketError, ServerCodec, build_codec, codec_names,
                                   nbytes, register_codec)
from qtllava.compress import identity  # noqa: F401  (registers "identity")

__all__ = ["ClientCodec", "Encoded", "Packet", "PacketError", "ServerCodec", "build_codec", "codec_names", "nbytes",
           "register_codec"]
