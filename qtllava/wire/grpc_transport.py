"""gRPC transport: a server that hosts any `SplitHandler`, and a client link with the loopback's interface.

Security: a shared token or per-client keys in call metadata (compared in constant time), TLS or mutual TLS from
certificate files, 127.0.0.1 by default. Size: messages above `chunk_bytes` travel as a stream of chunks; messages
above `max_message_bytes` are refused with RESOURCE_EXHAUSTED and the server keeps serving. The server parses
requests itself (raw-bytes handlers), so a malformed message gets INVALID_ARGUMENT instead of gRPC's INTERNAL.
Retries: the client retries UNAVAILABLE (server away) and ABORTED (server busy) with exponential backoff; step ids
make a retried step idempotent on the server.

Capacity: the token is checked from the call's metadata before any request byte is read (`_TokenGate`); every method
is served by a streaming handler that reads its request under a deadline (`read_seconds`; a call that has not
delivered its whole request by then is cancelled), so no peer holds a worker by sending slowly; each identity may have
`max_calls_per_client` calls in flight and the server `max_concurrent_calls` in all (more are refused with
RESOURCE_EXHAUSTED, never queued); small messages have small limits (`REQUEST_LIMITS`), checked before parsing.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from qtllava.wire import messages, split_pb2_grpc
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
# The largest request of each unary kind the server reads (bytes, serialized); steps and generation prompts are
# bounded by `max_message_bytes`. A handshake carries the client's configuration (a few kB).
REQUEST_LIMITS = {"handshake": 1 << 18, "checkpoint": 1 << 12, "close": 1 << 12}


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
    # a call must have delivered its whole request (every chunk of a streamed step) this long after it began
    read_seconds: float = 120.0
    # calls in flight per identity (the authenticated name; the claimed name under a shared token)
    max_calls_per_client: int = 4
    # an internal error's traceback is logged once per kind of error per this many seconds; the rest are counted
    traceback_seconds: float = 60.0


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


class RemoteError(messages.RemoteError):
    """The server refused a call; `code` is the grpc.StatusCode (`status` its name, as every transport gives it)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code.name, details)
        self.code = code


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
    """Streaming handlers around a `SplitHandler`: admit, read under a deadline, parse, call, map errors to
    statuses."""

    def __init__(self, handler, options: ServerOptions):
        self.handler = handler
        self.options = options
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._logged: dict[tuple[str, str], float] = {}  # (call kind, error type) -> when its traceback was logged
        self.refused: dict[str, int] = {}  # refusals of the transport by reason (read deadline, per-client limit)

    def _count(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

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

    @contextlib.contextmanager
    def _admit(self, peer: str, context):
        """At most `max_calls_per_client` calls in flight per identity (the claimed client name where the token
        names nobody); one more is refused at once."""
        who = peer or "claimed:" + str(dict(context.invocation_metadata()).get(CLIENT_KEY, ""))[:64]
        with self._lock:
            n = self._in_flight.get(who, 0)
            if n < self.options.max_calls_per_client:
                self._in_flight[who] = n + 1
        if n >= self.options.max_calls_per_client:
            self._count("calls_per_client")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"client {bounded(who)} has {n} calls in flight (at most "
                          f"{self.options.max_calls_per_client})")
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[who] -= 1
                if not self._in_flight[who]:
                    del self._in_flight[who]

    def _read(self, request_iterator, context, limit: int, chunked: bool) -> bytes:
        """The whole request, read before `read_seconds` have passed since the call began (the call is cancelled
        then). Unary kinds: exactly one message of at most `limit` bytes. Streamed steps: chunks in order, at most
        `limit` bytes in all, and nothing after the last."""
        expired = threading.Event()

        def expire():
            expired.set()
            context.cancel()

        timer = threading.Timer(self.options.read_seconds, expire)
        timer.daemon = True
        timer.start()
        try:  # the iterator of a cancelled call raises, or ends early
            data = self._read_all(request_iterator, context, limit, chunked)
        finally:
            timer.cancel()
            if expired.is_set():
                self._count("read_deadline")
                log.warning("a call did not deliver its request within %.0f s; cancelled", self.options.read_seconds)
        if expired.is_set():  # read in full, but only after the deadline had cancelled the call
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request arrived after the read deadline")
        return data

    def _read_all(self, request_iterator, context, limit: int, chunked: bool) -> bytes:
        parts: list[bytes] = []
        total = 0
        count = None
        for raw in request_iterator:
            if not chunked:
                if parts:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more than one request message in a unary call")
                if len(raw) > limit:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request of {len(raw)} bytes exceeds {limit}")
                parts.append(raw)
                continue
            if count is not None and len(parts) == count:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk after the last of {count}")
            try:
                chunk = pb.Chunk.FromString(raw)
            except DecodeError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed Chunk: {e}")
            if chunk.kind != "step":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected chunk kind {bounded(chunk.kind)}")
            if count is None:
                count = chunk.count
            if chunk.index != len(parts) or chunk.count != count:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"chunk {chunk.index}/{chunk.count} out of order (expected {len(parts)}/{count})")
            total += len(chunk.data)
            if total > limit:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"streamed message exceeds {limit} bytes")
            parts.append(chunk.data)
        if not parts or (chunked and len(parts) != count):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request ended before its last "
                          + ("chunk" if chunked else "message"))
        return b"".join(parts)

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
                self._log_internal(kind, e)
            context.abort(status, bounded(e, 1000, quote=False))

    def _log_internal(self, kind: str, e: Exception) -> None:
        """A traceback once per (call kind, error type) per `traceback_seconds`; the others one counted line."""
        key = (kind, type(e).__name__)
        now = time.monotonic()
        with self._lock:
            first = now - self._logged.get(key, -1e18) >= self.options.traceback_seconds
            if first:
                self._logged[key] = now
        self._count("internal")
        if first:
            log.error("%s failed (traceback logged once per %.0f s for %s)", kind, self.options.traceback_seconds,
                      key[1], exc_info=e)
        else:
            log.debug("%s failed again: %s", kind, bounded(e, 200, quote=False))

    @staticmethod
    def _parse(kind: str, data: bytes, context):
        """Parse a request; one that does not parse, or that carries fields this protocol does not define, is
        refused (INVALID_ARGUMENT)."""
        name = MESSAGE_TYPES[kind][0].__name__
        try:
            message = MESSAGE_TYPES[kind][0].FromString(data)
        except (DecodeError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name}: {e}")
        unknown = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(message)})
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} has fields this protocol does not define: "
                          f"{bounded(unknown[:8])}")
        return message

    def unary(self, kind: str, request_iterator, context):
        """A unary method served by a streaming handler (the same on the wire), so its request is read under the
        deadline; yields the one reply."""
        peer = self._authorize(context)
        with self._admit(peer, context):
            limit = REQUEST_LIMITS.get(kind, self.options.max_message_bytes)
            request = self._parse(kind, self._read(request_iterator, context, limit, chunked=False), context)
            reply = self._dispatch(kind, request, context, peer).SerializeToString()
        yield reply

    def step_stream(self, request_iterator, context):
        peer = self._authorize(context)
        with self._admit(peer, context):
            data = self._read(request_iterator, context, self.options.max_message_bytes, chunked=True)
            request = self._parse("step", data, context)
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


def _check_key_pair(cert: str, key: str) -> None:
    """Refuse, with a message that says so, a private key that does not belong to its certificate (gRPC itself
    reports only that the port could not be bound)."""
    for path in (cert, key):
        _read(path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ValueError(f"TLS: the key {key} does not match the certificate {cert}, or one of them is not PEM "
                         f"({e.reason or e})") from None


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
    if isinstance(getattr(handler, "refused", None), dict):
        servicer.refused = handler.refused  # one count of refusals, the runtime's and the transport's
    # No (de)serializers: handlers see raw bytes and parse them, so malformed input maps to INVALID_ARGUMENT.
    # Streaming handlers for the unary methods too (a unary call is one message each way on the wire): the
    # handler, not gRPC, reads the request, under the read deadline.
    handlers = {name: grpc.stream_stream_rpc_method_handler(partial(servicer.unary, kind))
                for kind, name in METHODS.items()}
    handlers["StepStream"] = grpc.stream_stream_rpc_method_handler(servicer.step_stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    if options.tls_cert:
        _check_key_pair(options.tls_cert, options.tls_key)
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
