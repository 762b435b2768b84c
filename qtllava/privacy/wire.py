"""What an honest-but-curious server sees: the serialized messages of a session, recorded and parsed back.

`RecordingLink` wraps any link (the in-process `LoopbackLink`, or a gRPC link) and keeps the serialized bytes of
every request and reply it passes on. A `Capture` is that list of messages; it saves to a plain binary file (no
pickle) so an attack can run in another process from the recording alone. `parse_steps` turns the recorded
`StepRequest`/`StepReply` bytes back into what the attacker works on, using only the protobuf classes,
`Layout.from_bytes`, `Packet.from_bytes` and the label fields of the message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtllava.compress.base import Packet
from qtllava.model.layout import Layout
from qtllava.wire.messages import MESSAGE_TYPES, Link, labels_from_wire, pb

__all__ = ["Message", "Capture", "RecordingLink", "WireStep", "parse_steps", "label_bytes"]

_MAGIC = b"QTCAP\x01"
_DIRECTIONS = ("up", "down")


@dataclass(frozen=True)
class Message:
    """One message as the transport carried it: RPC kind ("step", ...), direction ("up" = client -> server)."""

    kind: str
    direction: str
    data: bytes


@dataclass
class Capture:
    """The recorded messages of one session, in the order they crossed the wire."""

    messages: list[Message] = field(default_factory=list)

    def nbytes(self, direction: str | None = None, kind: str | None = None) -> int:
        return sum(len(m.data) for m in self.messages
                   if (direction is None or m.direction == direction) and (kind is None or m.kind == kind))

    def save(self, path: str | Path) -> Path:
        """Write `QTCAP\\x01` then per message: kind length (u8), kind, direction (u8), size (u32 LE), bytes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = [_MAGIC]
        for m in self.messages:
            kind = m.kind.encode("ascii")
            parts += [struct.pack("<B", len(kind)), kind, struct.pack("<BI", _DIRECTIONS.index(m.direction),
                                                                       len(m.data)), m.data]
        path.write_bytes(b"".join(parts))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Capture":
        data = Path(path).read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError(f"{path}: not a qtllava capture (bad magic)")
        pos, out = len(_MAGIC), []
        while pos < len(data):
            (n,) = struct.unpack_from("<B", data, pos)
            kind = data[pos + 1:pos + 1 + n].decode("ascii")
            pos += 1 + n
            d, size = struct.unpack_from("<BI", data, pos)
            pos += 5
            if pos + size > len(data):
                raise ValueError(f"{path}: truncated message {len(out)}")
            out.append(Message(kind, _DIRECTIONS[d], data[pos:pos + size]))
            pos += size
        return cls(out)


class RecordingLink(Link):
    """Passes every call to `inner` (a link) and records the serialized request and reply of each call."""

    def __init__(self, inner: Any, capture: Capture | None = None):
        self.inner = inner
        self.capture = capture if capture is not None else Capture()

    @property
    def traffic(self):
        return self.inner.traffic

    def call(self, kind: str, request: Any) -> Any:
        self.capture.messages.append(Message(kind, "up", request.SerializeToString()))
        reply = getattr(self.inner, kind)(request)
        self.capture.messages.append(Message(kind, "down", reply.SerializeToString()))
        return reply


@dataclass
class WireStep:
    """One micro-batch as parsed from the wire. Packets are None where the field was empty."""

    step_id: int
    micro_index: int
    layout: Layout
    image: Packet | None
    text: Packet | None
    labels: torch.Tensor | None  # (B, T), -100 where no label; None when no label field was sent (U cut)
    label_bytes: int  # bytes of label_mask + label_ids + label_width's varint as they sit in the message
    image_grad: Packet | None = None  # reply (server -> client)
    text_grad: Packet | None = None
    hidden: Packet | None = None  # U cut: final hidden states the server returned
    hidden_grad: Packet | None = None  # U cut: the client's gradient w.r.t. those hidden states (second request)


def label_bytes(req: pb.StepRequest) -> int:
    """Bytes the label fields take in a serialized StepRequest (tag + length prefix + payload)."""
    probe = pb.StepRequest(label_mask=req.label_mask, label_ids=req.label_ids, label_width=req.label_width)
    return probe.ByteSize()


def _packet(data: bytes) -> Packet | None:
    return Packet.from_bytes(data) if data else None


def parse_steps(capture: Capture) -> list[WireStep]:
    """Every training micro-batch of the capture, in order (a U-cut backward request joins its forward)."""
    req_type, reply_type = MESSAGE_TYPES["step"]
    steps: list[WireStep] = []
    by_key: dict[tuple[int, int], WireStep] = {}
    pending: pb.StepRequest | None = None
    for m in capture.messages:
        if m.kind != "step":
            continue
        if m.direction == "up":
            pending = req_type.FromString(m.data)
            continue
        reply = reply_type.FromString(m.data)
        req, pending = pending, None
        if req is None:
            raise ValueError("a step reply without its request in the capture")
        key = (req.step_id, req.micro_index)
        if req.hidden_grad:  # U cut, second message of a micro-batch
            ws = by_key[key]
            ws.hidden_grad = _packet(req.hidden_grad)
        else:
            layout = Layout.from_bytes(req.layout, (req.batch, req.seq_len))
            labels = None
            if req.label_mask:
                labels = labels_from_wire(req.label_mask, req.label_ids, req.label_width, (req.batch, req.seq_len))
            ws = WireStep(req.step_id, req.micro_index, layout, _packet(req.image), _packet(req.text), labels,
                          label_bytes(req), hidden=_packet(reply.hidden))
            by_key[key] = ws
            steps.append(ws)
        if reply.image_grad or reply.text_grad:
            ws.image_grad, ws.text_grad = _packet(reply.image_grad), _packet(reply.text_grad)
    return steps
