"""The compressor interface: packets, their exact wire format, and the registry of codecs.

A codec has two halves. The client half (`ClientCodec`) turns feature rows (N, D) into a `Packet` plus an auxiliary
loss, and keeps a differentiable tensor equal to what the server will reconstruct, so that the gradient the server
returns can be applied to it (the straight-through estimator across the network). The server half (`ServerCodec`)
turns a packet back into values (`dequantize`, no parameters) and maps them to the model width (`forward`, learned
where the codec learns). One codec instance is built per modality, each with its own parameters.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from qtllava.config import CodecConfig

__all__ = [
    "Packet",
    "PacketError",
    "Encoded",
    "ClientCodec",
    "ServerCodec",
    "CodecSpec",
    "register_codec",
    "codec_names",
    "build_codec",
    "nbytes",
    "float_to_bytes",
    "bytes_to_float",
    "WIRE_FLOAT_DTYPES",
]


class PacketError(ValueError):
    """A packet is malformed: wrong codec id, truncated payload, shape that does not match the payload, ..."""


_MAGIC = b"QTPK"
_VERSION = 2  # 2: a CRC-32 of the packet's bytes closes it
_CRC = struct.Struct("<I")
_MAX_DIMS = 8


@dataclass(frozen=True)
class Packet:
    """Plain data that crosses the wire for one tensor.

    codec: registry name of the codec that made it ("identity", "fsq", ...).
    shape: shape of the tensor the server reconstructs before its learned map, e.g. (rows, d_code).
    levels: number of quantization levels (0 where it does not apply).
    coder: how `payload` is coded ("raw", "pack", "ans", ...).
    dtype: element type on the wire where it applies ("fp16", "int8", ...).
    payload: the coded values or indices.
    side: side information (scales, entropy model), counted like the payload.
    """

    codec: str
    shape: tuple[int, ...]
    payload: bytes = b""
    side: bytes = b""
    levels: int = 0
    coder: str = "raw"
    dtype: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_bytes(self) -> bytes:
        """The exact bytes sent on the wire (little-endian header + payload + side information + CRC-32 of all of
        it, so that corruption is detected instead of decoding to other valid codes)."""
        if len(self.shape) > _MAX_DIMS:
            raise PacketError(f"packet shape {self.shape} has more than {_MAX_DIMS} dimensions")
        parts = [_MAGIC, struct.pack("<B", _VERSION)]
        for text in (self.codec, self.coder, self.dtype):
            raw = text.encode("ascii")
            if len(raw) > 255:
                raise PacketError(f"packet field {text!r} longer than 255 bytes")
            parts += [struct.pack("<B", len(raw)), raw]
        parts.append(struct.pack("<HB", self.levels, len(self.shape)))
        parts.append(struct.pack(f"<{len(self.shape)}I", *self.shape))
        parts += [struct.pack("<I", len(self.payload)), self.payload, struct.pack("<I", len(self.side)), self.side]
        body = b"".join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Packet":
        """Parse wire bytes; raises PacketError naming what is wrong (a checksum that does not match included)."""
        if len(data) < 5 + _CRC.size or bytes(data[:4]) != _MAGIC:
            raise PacketError("not a qtllava packet (bad magic)")
        if data[4] != _VERSION:
            raise PacketError(f"packet version {data[4]} not supported (expected {_VERSION})")
        (crc,) = _CRC.unpack(data[-_CRC.size:])
        view = memoryview(data)[:-_CRC.size]
        if zlib.crc32(view) != crc:
            raise PacketError("packet checksum does not match: the packet was corrupted on the way")
        pos = 0

        def take(n: int, what: str) -> memoryview:
            nonlocal pos
            if pos + n > len(view):
                raise PacketError(f"truncated packet: {what} needs {n} bytes at offset {pos}, {len(view) - pos} left")
            out = view[pos:pos + n]
            pos += n
            return out

        if bytes(take(4, "magic")) != _MAGIC:
            raise PacketError("not a qtllava packet (bad magic)")
        (version,) = struct.unpack("<B", take(1, "version"))
        if version != _VERSION:
            raise PacketError(f"packet version {version} not supported (expected {_VERSION})")
        texts = []
        for what in ("codec", "coder", "dtype"):
            (n,) = struct.unpack("<B", take(1, what))
            try:
                texts.append(bytes(take(n, what)).decode("ascii"))
            except UnicodeDecodeError as e:
                raise PacketError(f"packet {what} is not ASCII") from e
        levels, ndim = struct.unpack("<HB", take(3, "levels/ndim"))
        if ndim > _MAX_DIMS:
            raise PacketError(f"packet has {ndim} dimensions (at most {_MAX_DIMS})")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim, "shape"))
        (n_payload,) = struct.unpack("<I", take(4, "payload length"))
        payload = bytes(take(n_payload, "payload"))
        (n_side,) = struct.unpack("<I", take(4, "side length"))
        side = bytes(take(n_side, "side information"))
        if pos != len(view):
            raise PacketError(f"packet has {len(view) - pos} trailing bytes")
        return cls(codec=texts[0], coder=texts[1], dtype=texts[2], levels=levels, shape=tuple(shape),
                   payload=payload, side=side)


def nbytes(packet: Packet) -> int:
    """Exact size in bytes of what goes on the wire for this packet (header included)."""
    return len(packet.to_bytes())


class Encoded(NamedTuple):
    packet: Packet
    aux_loss: torch.Tensor  # scalar, added to the client's loss (e.g. distortion)
    values: torch.Tensor  # (N, d_code), differentiable; equal to ServerCodec.dequantize(packet)


class ClientCodec(nn.Module):
    """Client half of a codec: rows (N, D) -> packet. Subclasses implement `forward`."""

    codec_name: str = ""

    def pre_map(self) -> nn.Module | None:
        """The learned map applied to the rows before quantization, if the codec has one (None: the rows are
        quantized as they are)."""
        return None

    def forward(self, x: torch.Tensor) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> tuple[Packet, torch.Tensor]:
        """x: (N, D) float rows -> (packet, aux_loss)."""
        enc = self(x)
        return enc.packet, enc.aux_loss


class ServerCodec(nn.Module):
    """Server half of a codec: packet -> values (N, d_code) -> learned map -> (N, D)."""

    codec_name: str = ""
    fits: bool = False  # whether `fit` warm-starts anything (a learned decoder)

    def fit(self, encoder: "ClientCodec", rows: torch.Tensor) -> float | None:
        """Warm start of the learned decoder on rows (N, D) that `encoder` will send, so that decoding hands back
        rows close to them from the first step; -> the relative squared error of the fit, or None where the codec
        has nothing to fit (the default)."""
        return None

    def dequantize(self, packet: Packet) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def decode(self, packet: Packet) -> torch.Tensor:
        """packet -> (N, D) float tensor."""
        return self(self.dequantize(packet))

    def check(self, packet: Packet, width: int | None = None) -> None:
        """Raise PacketError if the packet was not made by this codec or has the wrong rank/width."""
        if packet.codec != self.codec_name:
            raise PacketError(f"packet codec {packet.codec!r} does not match this decoder ({self.codec_name!r})")
        if len(packet.shape) != 2:
            raise PacketError(f"packet shape {packet.shape} is not (rows, width)")
        if width is not None and packet.shape[1] != width:
            raise PacketError(f"packet width {packet.shape[1]} does not match the decoder's width {width}")


@dataclass(frozen=True)
class CodecSpec:
    name: str
    build: Callable[[CodecConfig, int], tuple[ClientCodec, ServerCodec]]
    learned: bool = False
    doc: str = field(default="", compare=False)


_REGISTRY: dict[str, CodecSpec] = {}


def register_codec(name: str, learned: bool = False) -> Callable:
    """Decorator: register `build(cfg, dim) -> (ClientCodec, ServerCodec)` under an exact name."""

    def deco(build: Callable[[CodecConfig, int], tuple[ClientCodec, ServerCodec]]):
        if name in _REGISTRY:
            raise ValueError(f"codec {name!r} is already registered")
        _REGISTRY[name] = CodecSpec(name=name, build=build, learned=learned, doc=(build.__doc__ or "").strip())
        return build

    return deco


def codec_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_codec(cfg: CodecConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    """Build both halves of the codec named `cfg.name` for rows of width `dim`. Raises on unknown names."""
    _load_builtin()
    if cfg.name not in _REGISTRY:
        raise KeyError(f"unknown codec {cfg.name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.name].build(cfg, dim)


def _load_builtin() -> None:
    # Importing the package registers every built-in codec exactly once.
    import qtllava.compress  # noqa: F401


# --- float tensors on the wire ------------------------------------------------------------------------------

WIRE_FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def float_to_bytes(x: torch.Tensor, dtype: str) -> bytes:
    """Little-endian bytes of `x` cast to the wire dtype ("fp32", "fp16", "bf16")."""
    t = x.detach().to(WIRE_FLOAT_DTYPES[dtype]).contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def bytes_to_float(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `float_to_bytes`; returns float32. Raises PacketError if the size does not match the shape."""
    if dtype not in WIRE_FLOAT_DTYPES:
        raise PacketError(f"unknown wire dtype {dtype!r}")
    wdt = WIRE_FLOAT_DTYPES[dtype]
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.tensor([], dtype=wdt).element_size()
    if len(data) != numel * itemsize:
        raise PacketError(f"payload has {len(data)} bytes, shape {shape} in {dtype} needs {numel * itemsize}")
    if numel == 0:
        return torch.zeros(shape, dtype=torch.float32)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(wdt).reshape(shape).to(torch.float32)
