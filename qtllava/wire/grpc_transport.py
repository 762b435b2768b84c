"""gRPC transport: a server that hosts any `SplitHandler`, and a client link with the loopback's interface.

Security: a shared token or per-client keys in call metadata (compared in constant time), TLS or mutual TLS from
certificate files, 127.0.0.1 by default. Size: messages above `chunk_bytes` travel as a stream of chunks; messages
above `max_message_bytes` are refused with RESOURCE_EXHAUSTED and the server keeps serving. The server parses
requests itself (raw-bytes handlers), so a malformed message gets INVALID_ARGUMENT instead of gRPC's INTERNAL.
Retries: the client retries UNAVAILABLE (server away) and ABORTED (server busy) with exponential backoff; step ids
make a retried step idempotent on the server.
"""

from __future__ import annotations

import hmac
import logging
import time
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from qtllava.wire import split_pb2_grpc
from qtllava.wire.messages import MESSAGE_TYPES, Link, Traffic, WireError, bounded, pb

__all__ = ["ServerOptions", "ClientOptions", "start_server", "GrpcLink", "RemoteError", "read_tokens",
           "SERVICE", "METHODS"]

log = logging.getLogger(__name__)

AUTH_KEY = "authorization"
CLIENT_KEY = "x-qtllava-client"
SERVICE = "qtllava.split.v1.Split"
# RPC method name per message kind (see MESSAGE_TYPES); StepStream carries big steps as chunks.
METHODS = {"handshake": "Handshake", "step": "Step", "generate": "Generate", "checkpoint": "Checkpoint",
           "close": "Close"}
REPLY_CHUNK_BYTES = 1 << 20


@dataclass
class ServerOptions:
    listen: str = "127.0.0.1:50551"
    tokens: dict[str, str] = field(default_factory=dict)  # client name -> token; {"*": t} = one shared token
    tls_cert: str = ""  # server certificate chain (PEM file)
    tls_key: str = ""  # server private key (PEM file)
    client_ca: str = ""  # set: mutual TLS, clients must present a certificate signed by this CA
    max_message_bytes: int = 64 * 1024 * 1024
    workers: int = 8
    # calls in flight at once; more are refused with RESOURCE_EXHAUSTED instead of queueing behind stalled ones
    max_concurrent_calls: int = 16
    # HTTP/2 connections idle this long are closed; keepalive pings from clients more often than every 10 s (or
    # without calls in flight) are refused by gRPC's ping policy
    idle_seconds: float = 300.0


@dataclass
class ClientOptions:
    target: str = "127.0.0.1:50551"
    token: str = ""
    client_name: str = "client"
    tls_ca: str = ""  # CA that signed the server certificate (PEM file); set: use TLS
    tls_cert: str = ""  # client certificate for mutual TLS
    tls_key: str = ""
    server_name: str = ""  # TLS name override (e.g. "localhost" for a test certificate)
    max_message_bytes: int = 64 * 1024 * 1024
    chunk_bytes: int = 1024 * 1024
    retry_seconds: float = 60.0  # give up after this long without a server
    timeout_seconds: float = 600.0


class RemoteError(RuntimeError):
    """The server refused a call; `code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


_STATUS = {name: getattr(grpc.StatusCode, name) for name in
           ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
            "NOT_FOUND", "ABORTED", "INTERNAL")}
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


def _read(path: str) -> bytes:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"certificate or key file not found: {path}")
    return p.read_bytes()


def read_tokens(path: str | Path) -> dict[str, str]:
    """A tokens file: one `name=token` per line (`#` comments, blank lines skipped) -> {name: token}."""
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition("=")
        if not sep or not name.strip() or not token.strip():
            raise ValueError(f"{path}:{n}: expected name=token")
        out[name.strip()] = token.strip()
    if not out:
        raise ValueError(f"{path}: no tokens")
    return out


class _Servicer:
    """Raw-bytes handlers around a `SplitHandler`: authorise, parse, call, map errors to statuses."""

    def __init__(self, handler, options: ServerOptions):
        self.handler = handler
        self.options = options

    def _authorize(self, context) -> str:
        """Check the call's token; -> the authenticated identity: the client's name under per-client keys, the
        common name of its certificate under mutual TLS without keys, else "" (a shared token names nobody)."""
        tokens = self.options.tokens
        if not tokens:
            return _certificate_name(context)
        md = dict(context.invocation_metadata())
        name = _token_name(tokens, md)
        if name is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"bad or missing token for client {bounded(md.get(CLIENT_KEY, ''))}")
        return name or _certificate_name(context)

    def _dispatch(self, kind: str, request, context, peer: str = ""):
        try:
            return getattr(self.handler, kind)(request, peer=peer)
        except Exception as e:  # map every refusal to a status; the server keeps serving
            code = getattr(e, "code", None)
            status = _STATUS.get(code, None) if isinstance(code, str) else None
            if status is None:
                status = grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, (ValueError, WireError)) \
                    else grpc.StatusCode.INTERNAL
            if status == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", kind)
            context.abort(status, bounded(e, 1000, quote=False))

    @staticmethod
    def _parse(kind: str, data: bytes, context):
        try:
            return MESSAGE_TYPES[kind][0].FromString(data)
        except (DecodeError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {MESSAGE_TYPES[kind][0].__name__}: {e}")

    def unary(self, kind: str, data: bytes, context) -> bytes:
        peer = self._authorize(context)
        request = self._parse(kind, data, context)
        return self._dispatch(kind, request, context, peer).SerializeToString()

    def step_stream(self, request_iterator, context):
        peer = self._authorize(context)
        parts: list[bytes] = []
        total = 0
        count = None
        for raw in request_iterator:
            try:
                chunk = pb.Chunk.FromString(raw)
            except DecodeError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed Chunk: {e}")
            if chunk.kind != "step":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected chunk kind {chunk.kind!r}")
            if count is None:
                count = chunk.count
            if chunk.index != len(parts) or chunk.count != count:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"chunk {chunk.index}/{chunk.count} out of order (expected {len(parts)}/{count})")
            total += len(chunk.data)
            if total > self.options.max_message_bytes:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"streamed message exceeds {self.options.max_message_bytes} bytes")
            parts.append(chunk.data)
            if len(parts) == count:
                break
        if count is None or len(parts) != count:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before the last chunk")
        request = self._parse("step", b"".join(parts), context)
        reply = self._dispatch("step", request, context, peer).SerializeToString()
        n = max(1, -(-len(reply) // REPLY_CHUNK_BYTES))
        for i in range(n):
            data = reply[i * REPLY_CHUNK_BYTES:(i + 1) * REPLY_CHUNK_BYTES]
            yield pb.Chunk(kind="step_reply", index=i, count=n, data=data).SerializeToString()


def _token_name(tokens: dict[str, str], metadata: dict) -> str | None:
    """The client a call's token authenticates: its name under per-client keys, "" under the shared token ("*"),
    None when the token is wrong or missing. Compared in constant time, against a dummy for an unknown name, so
    that timing does not tell names apart."""
    name = str(metadata.get(CLIENT_KEY, ""))
    expected = tokens.get(name, tokens.get("*"))
    presented = str(metadata.get(AUTH_KEY, "")).removeprefix("Bearer ").encode()
    if not hmac.compare_digest(presented, (expected or "\0invalid").encode()) or expected is None:
        return None
    return name if name in tokens else ""


def _certificate_name(context) -> str:
    """The common name of a mutual-TLS client's certificate, "" without one."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except (AttributeError, ValueError):
        return ""
    return names[0].decode("utf-8", "replace") if names else ""


class _TokenGate(grpc.ServerInterceptor):
    """Checks the token in the call's metadata when the call arrives, before any request byte is read: an
    unauthenticated call is answered UNAUTHENTICATED at once by a handler that never reads its request stream, so a
    stranger who never finishes a request holds no worker."""

    def __init__(self, options: ServerOptions):
        self.options = options

    def intercept_service(self, continuation, handler_call_details):
        tokens = self.options.tokens
        if tokens:
            md = dict(handler_call_details.invocation_metadata or ())
            if _token_name(tokens, md) is None:
                detail = f"bad or missing token for client {bounded(md.get(CLIENT_KEY, ''))}"

                def refuse(request_iterator, context):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

                return grpc.stream_stream_rpc_method_handler(refuse)
        return continuation(handler_call_details)


def start_server(handler, options: ServerOptions) -> tuple[grpc.Server, int]:
    """Start serving `handler`; returns (server, bound port). Call `server.stop(grace)` to end."""
    limit = options.max_message_bytes
    idle_ms = int(options.idle_seconds * 1000)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.workers),
                         interceptors=[_TokenGate(options)],
                         maximum_concurrent_rpcs=options.max_concurrent_calls,
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", limit),
                                  ("grpc.max_connection_idle_ms", idle_ms),
                                  ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                                  ("grpc.http2.max_ping_strikes", 2),
                                  ("grpc.keepalive_permit_without_calls", 0)])
    servicer = _Servicer(handler, options)
    # No (de)serializers: handlers see raw bytes and parse them, so malformed input maps to INVALID_ARGUMENT.
    handlers = {name: grpc.unary_unary_rpc_method_handler(partial(servicer.unary, kind))
                for kind, name in METHODS.items()}
    handlers["StepStream"] = grpc.stream_stream_rpc_method_handler(servicer.step_stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    if options.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(_read(options.tls_key), _read(options.tls_cert))],
            root_certificates=_read(options.client_ca) if options.client_ca else None,
            require_client_auth=bool(options.client_ca))
        port = server.add_secure_port(options.listen, creds)
    else:
        port = server.add_insecure_port(options.listen)
    if port == 0:
        raise OSError(f"could not bind {options.listen}")
    server.start()
    log.info("serving on %s (port %d, tls=%s, mtls=%s, auth=%s)", options.listen, port, bool(options.tls_cert),
             bool(options.client_ca), bool(options.tokens))
    return server, port


class GrpcLink(Link):
    """Client side of the gRPC transport; same methods and traffic ledger as `LoopbackLink`.

    The ledger counts serialized message sizes (as the loopback does), not chunk or HTTP/2 framing.
    """

    def __init__(self, options: ClientOptions, traffic: Traffic | None = None):
        self.options = options
        self.traffic = traffic if traffic is not None else Traffic()
        self._channel = None
        self._stub = None

    def _connect(self):
        if self._stub is not None:
            return self._stub
        o = self.options
        chan_opts = [("grpc.max_receive_message_length", o.max_message_bytes),
                     ("grpc.max_send_message_length", o.max_message_bytes),
                     # Reconnect quickly to a restarted server (gRPC's default backoff grows to two minutes).
                     ("grpc.initial_reconnect_backoff_ms", 200),
                     ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 2000)]
        if o.server_name:
            chan_opts.append(("grpc.ssl_target_name_override", o.server_name))
        if o.tls_ca:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(o.tls_ca),
                private_key=_read(o.tls_key) if o.tls_key else None,
                certificate_chain=_read(o.tls_cert) if o.tls_cert else None)
            self._channel = grpc.secure_channel(o.target, creds, options=chan_opts)
        else:
            self._channel = grpc.insecure_channel(o.target, options=chan_opts)
        self._stub = split_pb2_grpc.SplitStub(self._channel)
        return self._stub

    def _metadata(self):
        md = [(CLIENT_KEY, self.options.client_name)]
        if self.options.token:
            md.append((AUTH_KEY, f"Bearer {self.options.token}"))
        return md

    def _with_retry(self, fn):
        deadline = time.monotonic() + self.options.retry_seconds
        delay = 0.1
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()
                if code in _RETRY and time.monotonic() < deadline:
                    log.warning("server %s (%s); retrying in %.1f s", code.name.lower(), e.details(), delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                raise RemoteError(code, e.details() or "") from None

    def call(self, kind: str, request: Any) -> Any:
        req_type, _ = MESSAGE_TYPES[kind]
        if not isinstance(request, req_type):
            raise TypeError(f"{kind}: expected {req_type.__name__}, got {type(request).__name__}")
        size = request.ByteSize()
        stub = self._connect()
        if kind == "step" and size > self.options.chunk_bytes:
            data = request.SerializeToString()
            reply = self._with_retry(lambda: self._stream_step(stub, data))
        else:
            method = getattr(stub, METHODS[kind])
            reply = self._with_retry(lambda: method(request, metadata=self._metadata(),
                                                    timeout=self.options.timeout_seconds))
        self.traffic.record("up", kind, size)
        self.traffic.record("down", kind, reply.ByteSize())
        return reply

    def _stream_step(self, stub, data: bytes):
        size = self.options.chunk_bytes
        n = max(1, -(-len(data) // size))
        chunks = (pb.Chunk(kind="step", index=i, count=n, data=data[i * size:(i + 1) * size]) for i in range(n))
        parts = [c.data for c in stub.StepStream(chunks, metadata=self._metadata(),
                                                  timeout=self.options.timeout_seconds)]
        return pb.StepReply.FromString(b"".join(parts))

    def shutdown(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None
