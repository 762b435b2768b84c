"""The gRPC deployment with real processes on loopback: authentication, handshake refusal, malformed and oversized
messages, two concurrent clients, TLS and mutual TLS."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.train.accounting import read_metrics
from qtllava.train.client_runtime import make_hello
from qtllava.train.loop import run_stage, stage_config
from qtllava.train.procs import spawn, spawn_server
from qtllava.wire.grpc_transport import SERVICE, ClientOptions, GrpcLink, RemoteError
from qtllava.wire.messages import pb

STEPS = 4
LIMIT = 2_000_000  # the server's message limit in these tests
CONFIG = ["--config", "micro", "-o", f"train.stage2.steps={STEPS}", "-o", "train.checkpoint_every=2",
          "-o", "train.threads=1", "-o", f"wire.max_message_bytes={LIMIT}"]
TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


def cfg():
    return load_config("micro", [f"train.stage2.steps={STEPS}", "train.checkpoint_every=2", "train.threads=1"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    c = cfg()
    return make_data(c.data, c.vision.image_size, root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def server(data, tmp_path_factory):
    """A stage-2 server with a key per client; yields (port, out dir, token files)."""
    tmp = tmp_path_factory.mktemp("grpc")
    (tmp / "tokens").write_text("".join(f"{k}={v}\n" for k, v in TOKENS.items()))
    token_files = {}
    for name, token in TOKENS.items():
        token_files[name] = tmp / f"{name}.token"
        token_files[name].write_text(token + "\n")
    proc, port = spawn_server([*CONFIG, "--data", str(data), "--stage", "stage2", "--out", str(tmp / "server"),
                               "--tokens-file", str(tmp / "tokens")], tmp / "port", tmp / "server.log")
    try:
        yield port, tmp, token_files
    finally:
        proc.stop()
        assert proc.popen.returncode == 0, proc.tail()


def _link(port: int, name: str = "alice", token: str | None = None, retry_seconds: float = 2.0, **kw) -> GrpcLink:
    return GrpcLink(ClientOptions(target=f"127.0.0.1:{port}", client_name=name,
                                  token=TOKENS.get(name, "") if token is None else token, retry_seconds=retry_seconds,
                                  **kw))


def _hello(**kw):
    return make_hello(stage_config(cfg(), "stage2"), **kw)


def test_wrong_or_missing_token_is_refused(server):
    port, _, _ = server
    for name, token in (("alice", TOKENS["bob"]), ("alice", ""), ("mallory", TOKENS["alice"])):
        with pytest.raises(RemoteError) as e:
            _link(port, name, token).handshake(_hello(name=name))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert _link(port).handshake(_hello(name="alice")).session_id


def test_handshake_with_a_different_configuration_names_the_key(server):
    port, _, _ = server
    other = stage_config(cfg(), "stage2")
    other.compress.text.dtype = "bf16"
    with pytest.raises(RemoteError) as e:
        _link(port).handshake(make_hello(other, "alice"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "compress.text.dtype: server 'fp16', client 'bf16'" in e.value.details
    with pytest.raises(RemoteError, match="cut differs"):
        _link(port).handshake(_hello(name="alice", cut="u"))


def _raw(channel, method: str, data: bytes, token: str = TOKENS["alice"]):
    call = channel.unary_unary(f"/{SERVICE}/{method}")  # no serializers: raw bytes both ways
    return call(data, metadata=[("x-qtllava-client", "alice"), ("authorization", f"Bearer {token}")], timeout=20)


def test_malformed_and_oversized_messages_are_refused_and_the_server_keeps_serving(server):
    port, _, _ = server
    sid = _link(port).handshake(_hello(name="alice")).session_id
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 * LIMIT)]) as ch:
        for method, data in (("Step", b"\xff\xfe garbage \x00\x01"), ("Handshake", b"\x0a\xff\xff\xff\xff")):
            with pytest.raises(grpc.RpcError) as e:
                _raw(ch, method, data)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.value.details()
        bad_packets = pb.StepRequest(session_id=sid, step_id=0, micro_index=0, micro_count=1, stage="stage2",
                                     batch=1, seq_len=4, layout=b"\x55", image=b"QTPK\x01\xff" + b"\x07" * 40,
                                     text=b"not a packet")
        with pytest.raises(grpc.RpcError) as e:
            _raw(ch, "Step", bad_packets.SerializeToString())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "packet" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            _raw(ch, "Step", pb.StepRequest(session_id=sid, image=b"\0" * (LIMIT + 1000)).SerializeToString())
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    streamed = _link(port, chunk_bytes=256 * 1024)
    with pytest.raises(RemoteError) as e:
        streamed.step(pb.StepRequest(session_id=sid, stage="stage2", micro_count=1, image=b"\0" * (LIMIT + 1000)))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds" in e.value.details
    # Still serving, and the session was not disturbed by the refusals.
    reply = _link(port).handshake(_hello(name="alice", session_id=sid, resume_step=0))
    assert reply.next_step == 0 and reply.session_id == sid
    # A session belongs to the client that opened it; a name is the one its key authenticates.
    with pytest.raises(RemoteError) as e:
        _link(port, "bob").handshake(_hello(name="bob", session_id=sid, resume_step=0))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "another client" in e.value.details
    with pytest.raises(RemoteError) as e:
        _link(port, "bob").handshake(_hello(name="alice"))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "not the authenticated client" in e.value.details


def test_two_concurrent_clients_each_with_its_own_session_data_and_metrics(server, data):
    port, tmp, token_files = server
    procs = {name: spawn(["client", *CONFIG, "--data", str(data), "--stage", "stage2", "--out", str(tmp / name),
                          "--server", f"127.0.0.1:{port}", "--name", name, "--token-file", str(token_files[name]),
                          "--shard", f"{i}/2", "--no-progress"], tmp / f"{name}.log")
             for i, name in enumerate(("alice", "bob"))}
    try:
        for name, p in procs.items():
            assert p.wait(120) == 0, p.tail()
    finally:
        for p in procs.values():
            p.stop()
    losses = {}
    for name in procs:
        rows = read_metrics(tmp / name / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(STEPS))
        losses[name] = [r["loss"] for r in rows]
        assert (tmp / name / "final" / "client" / "model.safetensors").exists()
    assert losses["alice"] != losses["bob"]  # different shards of the data
    server_rows = [r for r in read_metrics(tmp / "server" / "metrics.jsonl") if "step" in r]
    for name in procs:
        mine = [r for r in server_rows if r["client"] == name]
        assert [r["step"] for r in mine] == list(range(STEPS))
        assert [r["loss"] for r in mine] == pytest.approx(losses[name], abs=1e-5)
    assert len({r["session"] for r in server_rows}) == 2


# --- TLS ---------------------------------------------------------------------------------------------------


def _make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate (PEM files)."""
    if importlib.util.find_spec("cryptography") is not None:
        return _certificates_with_cryptography(folder)
    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the `cryptography` package or the `openssl` command; neither is available")
    run = lambda *a: subprocess.run(["openssl", *a], cwd=folder, check=True, capture_output=True)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=qtllava test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(ext)
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {k: folder / k for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _certificates_with_cryptography(folder: Path) -> dict[str, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn, key, issuer, issuer_key, ca=False, san=None, usage=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(name, obj):
        data = obj.public_bytes(serialization.Encoding.PEM) if hasattr(obj, "public_bytes") and not hasattr(
            obj, "private_bytes") else obj.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption())
        (folder / name).write_bytes(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qtllava test CA")])
    write("ca.pem", cert("qtllava test CA", ca_key, ca_name, ca_key, ca=True))
    for name, san, usage in (("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                              ExtendedKeyUsageOID.SERVER_AUTH), ("client", None, ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(f"{name}.key", key)
        write(f"{name}.pem", cert(name, key, ca_name, ca_key, san=san, usage=usage))
    return {k: folder / k for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mutual_tls_round_trip_and_refusal_without_a_client_certificate(data, tmp_path):
    certs = _make_certificates(tmp_path)
    proc, port = spawn_server([*CONFIG, "--data", str(data), "--stage", "stage2", "--out", str(tmp_path / "server"),
                               "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
                               "--client-ca", str(certs["ca.pem"])], tmp_path / "port", tmp_path / "server.log")
    try:
        tls = dict(tls_ca=str(certs["ca.pem"]), server_name="localhost")
        link = _link(port, token="", **tls, tls_cert=str(certs["client.pem"]), tls_key=str(certs["client.key"]))
        run = run_stage(cfg(), "stage2", data, tmp_path / "client", link=link, max_steps=2, progress=False)
        assert run.steps == 2 and run.traffic["step"]["messages_up"] == 2
        # No client certificate, or plaintext: the TLS handshake fails (gRPC says UNAVAILABLE, retried briefly).
        for bad in (_link(port, token="", retry_seconds=0.3, **tls), _link(port, token="", retry_seconds=0.3)):
            with pytest.raises(RemoteError) as e:
                bad.handshake(_hello(name="alice"))
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop()
