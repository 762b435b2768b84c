"""In-process transport: the same protobuf messages as gRPC, serialised and parsed, so bytes count the same."""

from __future__ import annotations

from typing import Any, Protocol

from qtllava.wire.messages import MESSAGE_TYPES, Link, Traffic

__all__ = ["SplitHandler", "LoopbackLink"]


class SplitHandler(Protocol):
    """What a server runtime offers; gRPC and loopback transports both call these with parsed messages. `peer` is
    the identity the transport authenticated ("" where there is none, as in one process)."""

    def handshake(self, request: Any, peer: str = "") -> Any: ...
    def step(self, request: Any, peer: str = "") -> Any: ...
    def generate(self, request: Any, peer: str = "") -> Any: ...
    def checkpoint(self, request: Any, peer: str = "") -> Any: ...
    def close(self, request: Any, peer: str = "") -> Any: ...


class LoopbackLink(Link):
    """Calls a handler in this process through serialised messages, recording every message's size."""

    def __init__(self, handler: SplitHandler, traffic: Traffic | None = None):
        self.handler = handler
        self.traffic = traffic if traffic is not None else Traffic()

    def call(self, kind: str, request: Any) -> Any:
        req_type, reply_type = MESSAGE_TYPES[kind]
        if not isinstance(request, req_type):
            raise TypeError(f"{kind}: expected {req_type.__name__}, got {type(request).__name__}")
        data = request.SerializeToString()
        self.traffic.record("up", kind, len(data))
        reply = getattr(self.handler, kind)(req_type.FromString(data))
        out = reply.SerializeToString()
        self.traffic.record("down", kind, len(out))
        return reply_type.FromString(out)
