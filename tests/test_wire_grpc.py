"""The gRPC transport on its own (server in a thread of this process): chunked steps, byte accounting equal to the
loopback's, retries while the server is away, error statuses, per-client keys, the tokens file."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from qtllava.train.server_runtime import SplitError
from qtllava.wire.grpc_transport import ClientOptions, GrpcLink, RemoteError, ServerOptions, read_tokens, start_server
from qtllava.wire.loopback import LoopbackLink
from qtllava.wire.messages import pb


class Echo:
    """Answers a step with gradients as large as the request's rows; refuses what a real server would refuse."""

    def __init__(self):
        self.steps = 0

    def handshake(self, req, peer=""):
        if req.config_hash == "bad":
            raise SplitError("configuration hash differs from the server's: llm.num_layers: server 2, client 3")
        return pb.HelloReply(protocol_version=1, session_id="s1", next_step=req.resume_step)

    def step(self, req, peer=""):
        if req.image.startswith(b"boom"):
            raise RuntimeError("unexpected")
        if not req.image:
            raise ValueError("empty image packet")
        self.steps += 1
        return pb.StepReply(step_id=req.step_id, image_grad=req.image[::-1], text_grad=req.text, loss=0.5)

    def generate(self, req, peer=""):
        return pb.GenerateReply(generation_id=req.generation_id, next_ids=b"\0\0\0\0")

    def checkpoint(self, req, peer=""):
        return pb.CheckpointReply(step_id=req.step_id)

    def close(self, req, peer=""):
        return pb.GoodbyeReply(steps_applied=self.steps)


@pytest.fixture
def echo_server():
    handler = Echo()
    server, port = start_server(handler, ServerOptions(listen="127.0.0.1:0", tokens={"alice": "a-key", "bob": "b-key"},
                                                       max_message_bytes=8 << 20))
    yield handler, port
    server.stop(0)


def _link(port, name="alice", token="a-key", **kw):
    return GrpcLink(ClientOptions(target=f"127.0.0.1:{port}", client_name=name, token=token, retry_seconds=1, **kw))


def test_chunked_step_round_trip_counts_the_same_bytes_as_loopback(echo_server):
    handler, port = echo_server
    req = pb.StepRequest(session_id="s1", step_id=3, image=bytes(range(256)) * 12_000, text=b"t" * 5000)
    streamed = _link(port, chunk_bytes=64 * 1024)  # 3 MB request, 64 KiB chunks; the reply comes back chunked too
    unary = _link(port)
    loop = LoopbackLink(Echo())
    replies = [link.step(req) for link in (streamed, unary, loop)]
    assert replies[0] == replies[1] == replies[2] and replies[0].image_grad == req.image[::-1]
    assert streamed.traffic.summary() == unary.traffic.summary() == loop.traffic.summary()
    assert streamed.traffic.total("up") == req.ByteSize()


def test_statuses_name_the_refusal(echo_server):
    _, port = echo_server
    link = _link(port)
    with pytest.raises(RemoteError) as e:
        link.handshake(pb.Hello(config_hash="bad"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "llm.num_layers" in e.value.details
    with pytest.raises(RemoteError) as e:
        link.step(pb.StepRequest(step_id=1))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty image packet" in e.value.details
    with pytest.raises(RemoteError) as e:
        link.step(pb.StepRequest(image=b"boom"))
    assert e.value.code == grpc.StatusCode.INTERNAL
    with pytest.raises(RemoteError) as e:
        _link(port, chunk_bytes=1024).step(pb.StepRequest(image=b"x" * (9 << 20)))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert link.handshake(pb.Hello(resume_step=4)).next_step == 4  # still serving


def test_per_client_keys(echo_server):
    _, port = echo_server
    assert _link(port, "bob", "b-key").handshake(pb.Hello()).session_id == "s1"
    for name, token in (("bob", "a-key"), ("alice", ""), ("carol", "a-key")):
        with pytest.raises(RemoteError) as e:
            _link(port, name, token).handshake(pb.Hello())
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_while_the_server_is_away():
    port = _free_port()
    started = []

    def start_later():
        time.sleep(1.0)
        started.append(start_server(Echo(), ServerOptions(listen=f"127.0.0.1:{port}"))[0])

    t = threading.Thread(target=start_later)
    t.start()
    try:
        link = GrpcLink(ClientOptions(target=f"127.0.0.1:{port}", retry_seconds=20))
        t0 = time.monotonic()
        assert link.step(pb.StepRequest(image=b"x")).loss == 0.5
        assert time.monotonic() - t0 >= 0.9
        with pytest.raises(RemoteError) as e:  # gives up after retry_seconds
            GrpcLink(ClientOptions(target=f"127.0.0.1:{_free_port()}", retry_seconds=0.3)).handshake(pb.Hello())
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        t.join()
        for s in started:
            s.stop(0)


def test_tokens_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# clients\nalice = a-key\n\nbob=b=key\n")
    assert read_tokens(f) == {"alice": "a-key", "bob": "b=key"}
    f.write_text("alice\n")
    with pytest.raises(ValueError, match="name=token"):
        read_tokens(f)


def test_strangers_with_unfinished_requests_hold_no_worker(echo_server):
    """Twelve calls without a token whose request never finishes (more than the server's 8 workers; a unary
    Handshake whose body never comes, a StepStream whose second chunk never comes) are refused UNAUTHENTICATED from
    their metadata alone, and an honest client's handshake still answers at once."""
    _, port = echo_server
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    never = threading.Event()

    def stalled(first: bool):
        if first:
            yield pb.Chunk(kind="step", index=0, count=2, data=b"x").SerializeToString()
        never.wait(30)
        yield from ()

    calls = [channel.stream_stream(f"/qtllava.split.v1.Split/{'StepStream' if i % 2 else 'Handshake'}")(
        stalled(bool(i % 2)), metadata=(("x-qtllava-client", "mallory"),)) for i in range(12)]
    try:
        codes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                next(iter(call))
            codes.append(e.value.code())
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        t0 = time.perf_counter()
        assert _link(port).handshake(pb.Hello(protocol_version=1, client_name="alice")).session_id == "s1"
        assert time.perf_counter() - t0 < 2.0
    finally:
        never.set()
        channel.close()


METHOD = "/qtllava.split.v1.Split/"


def _stalled(channel, method: str, first: bytes, token: str, name: str, release: threading.Event):
    """A call that sends `first` and then nothing until `release` is set; -> a future of its status code."""
    def requests():
        yield first
        release.wait(30)

    call = channel.stream_stream(METHOD + method)(requests(), metadata=[("x-qtllava-client", name),
                                                                        ("authorization", f"Bearer {token}")],
                                                 timeout=30)
    result = {}

    def drain():
        try:
            for _ in call:
                pass
            result["code"] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            result["code"] = e.code()
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return t, result


def test_stalled_calls_neither_hold_the_server_nor_slow_an_honest_client():
    """Calls that never finish their request: strangers are refused from their metadata at once; an authenticated
    staller gets `max_calls_per_client` calls in flight (the rest RESOURCE_EXHAUSTED at once), each cancelled at the
    read deadline; an honest client keeps stepping at its usual time throughout."""
    handler = Echo()
    handler.refused = {}
    server, port = start_server(handler, ServerOptions(
        listen="127.0.0.1:0", tokens={"alice": "a-key", "mallory": "m-key"}, workers=4, read_seconds=1.5,
        max_calls_per_client=2))
    release = threading.Event()
    try:
        honest = _link(port)
        req = pb.StepRequest(session_id="s1", step_id=0, image=b"x" * 1000)
        t0 = time.perf_counter()
        for _ in range(5):
            honest.step(req)
        usual = (time.perf_counter() - t0) / 5
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            strangers = [_stalled(ch, "Handshake", b"\x0a\x01", "wrong", "alice", release) for _ in range(8)]
            chunk = pb.Chunk(kind="step", index=0, count=2, data=b"y" * 100).SerializeToString()
            stallers = [_stalled(ch, "StepStream" if i % 2 else "Step", chunk if i % 2 else b"\x0a\x01", "m-key",
                                 "mallory", release) for i in range(6)]
            time.sleep(0.3)
            t0 = time.perf_counter()
            for _ in range(5):
                honest.step(req)
            under_attack = (time.perf_counter() - t0) / 5
            for t, _ in strangers + stallers:
                t.join(10)
            codes = [r["code"] for _, r in stallers]
            assert all(r["code"] == grpc.StatusCode.UNAUTHENTICATED for _, r in strangers)
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4
            assert codes.count(grpc.StatusCode.CANCELLED) == 2  # cancelled at the read deadline
        assert handler.refused == {"calls_per_client": 4, "read_deadline": 2}
        assert under_attack < max(5 * usual, 0.5), (usual, under_attack)
        assert honest.step(req).loss == 0.5 and handler.steps == 11
    finally:
        release.set()
        server.stop(0)


def test_a_chunk_after_the_last_and_a_second_unary_message_are_refused(echo_server):
    _, port = echo_server
    md = [("x-qtllava-client", "alice"), ("authorization", "Bearer a-key")]
    step = pb.StepRequest(session_id="s1", image=b"z" * 10).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        chunks = [pb.Chunk(kind="step", index=0, count=1, data=step).SerializeToString(),
                  pb.Chunk(kind="step", index=1, count=1, data=b"extra").SerializeToString()]
        with pytest.raises(grpc.RpcError) as e:
            list(ch.stream_stream(METHOD + "StepStream")(iter(chunks), metadata=md, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "after the last" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(ch.stream_stream(METHOD + "Step")(iter([step, step]), metadata=md, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than one" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # a field the protocol does not define (number 100)
            ch.unary_unary(METHOD + "Step")(step + b"\xa0\x06\x01", metadata=md, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not define: [100]" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # a handshake larger than any configuration
            ch.unary_unary(METHOD + "Handshake")(b"\x1a\x80\x80\x40" + b"c" * (1 << 20), metadata=md, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_internal_errors_log_one_traceback_per_kind_and_are_counted(echo_server, caplog):
    handler, port = echo_server
    handler.refused = {}
    link = _link(port)
    with caplog.at_level("DEBUG", logger="qtllava.wire.grpc_transport"):
        for _ in range(5):
            with pytest.raises(RemoteError) as e:
                link.step(pb.StepRequest(image=b"boom"))
            assert e.value.code == grpc.StatusCode.INTERNAL
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "RuntimeError" in tracebacks[0].getMessage()


def test_a_tls_key_that_does_not_match_its_certificate_is_named(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.pem")],
                       check=True, capture_output=True)
    with pytest.raises(ValueError, match=r"b.key does not match the certificate .*a.pem"):
        start_server(Echo(), ServerOptions(listen="127.0.0.1:0", tls_cert=str(tmp_path / "a.pem"),
                                           tls_key=str(tmp_path / "b.key")))
    server, port = start_server(Echo(), ServerOptions(listen="127.0.0.1:0", tls_cert=str(tmp_path / "a.pem"),
                                                      tls_key=str(tmp_path / "a.key")))
    server.stop(0)
    assert port > 0
