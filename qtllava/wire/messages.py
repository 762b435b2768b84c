"""Tensor <-> message conversion and traffic accounting shared by every transport.

Everything here is plain bytes: packed bit masks, little-endian integer arrays and qtllava packets. Nothing is
pickled. A `Traffic` ledger counts the serialized size of every message per direction and kind, so the in-process
loopback and gRPC report the same numbers for the same run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from qtllava.constants import IGNORE_INDEX
from qtllava.wire import split_pb2 as pb

__all__ = [
    "PROTOCOL_VERSION",
    "pb",
    "WireError",
    "labels_to_wire",
    "bounded",
    "labels_from_wire",
    "ids_to_bytes",
    "ids_from_bytes",
    "Traffic",
    "MESSAGE_TYPES",
    "Link",
]

PROTOCOL_VERSION = 2  # 2: packets carry a CRC-32

# Request and reply types per RPC, used by transports to (de)serialise and to name traffic.
MESSAGE_TYPES = {
    "handshake": (pb.Hello, pb.HelloReply),
    "step": (pb.StepRequest, pb.StepReply),
    "generate": (pb.GenerateRequest, pb.GenerateReply),
    "checkpoint": (pb.CheckpointRequest, pb.CheckpointReply),
    "close": (pb.Goodbye, pb.GoodbyeReply),
}


class WireError(ValueError):
    """A message is malformed or inconsistent (sizes that do not match its shape, unknown fields, ...)."""


class RemoteError(RuntimeError):
    """The other side refused a call, whatever the transport: `status` names the refusal as gRPC's status codes do
    ("FAILED_PRECONDITION", "PERMISSION_DENIED", ...); `details` is the server's message."""

    def __init__(self, status: str, details: str):
        super().__init__(f"{status}: {details}")
        self.status = status
        self.details = details


def bounded(value: object, limit: int = 80, quote: bool = True) -> str:
    """Untrusted input as it may appear in an error text: repr'd (with `quote`) and cut to `limit` characters."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def labels_to_wire(labels: torch.Tensor, vocab_size: int) -> tuple[bytes, bytes, int]:
    """labels (B, T) with -100 where no label -> (mask bits, ids as uint16/uint32 LE, width in bytes)."""
    flat = labels.reshape(-1).cpu().numpy()
    mask = flat != IGNORE_INDEX
    width = 2 if vocab_size <= 65536 else 4
    ids = flat[mask].astype("<u2" if width == 2 else "<u4")
    return np.packbits(mask).tobytes(), ids.tobytes(), width


def labels_from_wire(mask: bytes, ids: bytes, width: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `labels_to_wire`; raises WireError when sizes disagree."""
    n = shape[0] * shape[1]
    if len(mask) != (n + 7) // 8:
        raise WireError(f"label mask has {len(mask)} bytes, {shape} positions need {(n + 7) // 8}")
    if width not in (2, 4):
        raise WireError(f"label width must be 2 or 4 bytes, got {width}")
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), count=n).astype(bool)
    if len(ids) != int(bits.sum()) * width:
        raise WireError(f"label ids have {len(ids)} bytes, the mask announces {int(bits.sum())} of {width} bytes")
    out = np.full(n, IGNORE_INDEX, dtype=np.int64)
    out[bits] = np.frombuffer(ids, dtype="<u2" if width == 2 else "<u4")
    return torch.from_numpy(out).reshape(shape)


def ids_to_bytes(ids: torch.Tensor) -> bytes:
    """Token ids (any shape) -> uint32 little-endian bytes."""
    return ids.reshape(-1).cpu().numpy().astype("<u4").tobytes()


def ids_from_bytes(data: bytes, count: int | None = None) -> torch.Tensor:
    if len(data) % 4:
        raise WireError(f"id array of {len(data)} bytes is not a multiple of 4")
    arr = np.frombuffer(data, dtype="<u4").astype(np.int64)
    if count is not None and arr.size != count:
        raise WireError(f"expected {count} ids, got {arr.size}")
    return torch.from_numpy(arr.copy())


@dataclass
class Traffic:
    """Bytes per direction ("up" = client -> server, "down") and per message kind; also counts messages."""

    bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    messages: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def record(self, direction: str, kind: str, nbytes: int) -> None:
        self.bytes[(direction, kind)] += nbytes
        self.messages[(direction, kind)] += 1

    def total(self, direction: str) -> int:
        return sum(v for (d, _), v in self.bytes.items() if d == direction)

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (d, k), v in sorted(self.bytes.items()):
            out.setdefault(k, {})[f"bytes_{d}"] = v
            out[k][f"messages_{d}"] = self.messages[(d, k)]
        return out


class Link:
    """What every transport offers the client runtime: one method per RPC, each `call(kind, request)`; a subclass
    implements `call` (serialise, send, record sizes in `self.traffic`, return the parsed reply)."""

    traffic: Traffic

    def call(self, kind: str, request):  # pragma: no cover - interface
        raise NotImplementedError

    def handshake(self, request):
        return self.call("handshake", request)

    def step(self, request):
        return self.call("step", request)

    def generate(self, request):
        return self.call("generate", request)

    def checkpoint(self, request):
        return self.call("checkpoint", request)

    def close(self, request):
        return self.call("close", request)
