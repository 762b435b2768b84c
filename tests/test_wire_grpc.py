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
