"""Hostile input, bounded: each case asserts the refusal (its status), that the shared weights did not change, and
that a legitimate client still steps afterwards. In one process (the runtimes behind the transports); the gRPC
statuses of the same refusals are covered in tests/test_split_grpc.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qtllava.compress.base import Packet
from qtllava.compress.grad import encode_grad
from qtllava.config import load_config
from qtllava.data import LlavaDataset, collate, make_data
from qtllava.data.templates import template_name
from qtllava.model.parts import ClientPart
from qtllava.train.client_runtime import ClientRuntime, make_hello
from qtllava.train.loop import load_tokenizer_for, stage_parts
from qtllava.train.server_runtime import ServerRuntime, SplitError
from qtllava.wire.loopback import LoopbackLink
from qtllava.wire.messages import WireError, labels_to_wire, pb

STEPS = 4


def micro(*overrides: str):
    return load_config("micro", [f"train.stage2.steps={STEPS}", "train.threads=1", *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    cfg = micro()
    return make_data(cfg.data, cfg.vision.image_size, root=tmp_path_factory.mktemp("data"))


@pytest.fixture
def setup(data):
    cfg = micro()
    scfg, tok, client, server = stage_parts(cfg, "stage2", data)
    rt = ServerRuntime(server, scfg, "stage2", total_steps=STEPS)
    ds = LlavaDataset.load(data / "instruct_train.json", data / "images", tok, template=template_name(cfg),
                           image_size=cfg.vision.image_size, num_image_tokens=cfg.vision.num_image_tokens,
                           max_length=cfg.data.max_length)
    batches = [collate([ds[2 * i], ds[2 * i + 1]], pad_id=tok.pad_token_id) for i in range(3)]
    return rt, client, scfg, batches


def _request(client: ClientPart, batch: dict, sid: str, step: int = 0) -> pb.StepRequest:
    out = client(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
    mask, ids, width = labels_to_wire(batch["labels"], client.vocab_size)
    return pb.StepRequest(session_id=sid, step_id=step, micro_index=0, micro_count=1, stage="stage2",
                          batch=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1],
                          layout=out.layout.to_bytes(), image=out.image.packet.to_bytes(),
                          text=out.text.packet.to_bytes(), label_mask=mask, label_ids=ids, label_width=width,
                          total_steps=STEPS)


def _weights(rt: ServerRuntime) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rt.part.state_dict().items()}


def _unchanged(rt: ServerRuntime, before: dict) -> bool:
    return all(torch.equal(before[k], v) for k, v in rt.part.state_dict().items())


def _refused(rt, req, code: str, match: str = "", peer: str = "") -> None:
    with pytest.raises(SplitError, match=match) as e:
        rt.step(req, peer=peer)
    assert e.value.code == code, e.value


def _poisoned(client: ClientPart, batch: dict, sid: str, value: float) -> pb.StepRequest:
    """A step whose image rows hold one `value` (NaN or infinity), sent as the fp32 identity packet would."""
    req = _request(client, batch, sid)
    packet = Packet.from_bytes(req.image)
    rows = torch.zeros(packet.shape)
    rows[0, 0] = value
    req.image = Packet(codec="identity", shape=packet.shape, payload=rows.numpy().astype("<f4").tobytes(),
                       dtype="fp32").to_bytes()
    return req


def test_non_finite_rows_are_refused_counted_and_never_reach_the_weights(setup):
    rt, client, scfg, b = setup
    sid = rt.handshake(make_hello(scfg, "a")).session_id
    before = _weights(rt)
    for value in (math.nan, math.inf, -math.inf):
        _refused(rt, _poisoned(client, b[0], sid, value), "INVALID_ARGUMENT", "non-finite")
    assert rt.refused["non_finite"] == 3 and rt.state()["refused"]["non_finite"] == 3
    assert _unchanged(rt, before) and rt.applied_steps == 0
    reply = rt.step(_request(client, b[0], sid))  # the honest step still goes through, at step 0
    assert reply.applied and math.isfinite(reply.loss) and not _unchanged(rt, before)


def test_a_non_finite_loss_is_refused_before_the_optimizer(setup):
    rt, client, scfg, b = setup
    sid = rt.handshake(make_hello(scfg, "a")).session_id
    before = _weights(rt)
    req = _request(client, b[0], sid)
    packet = Packet.from_bytes(req.image)  # finite rows, but so large that the LLM overflows
    rows = torch.full(packet.shape, 3e38)
    req.image = Packet(codec="identity", shape=packet.shape, payload=rows.numpy().astype("<f4").tobytes(),
                       dtype="fp32").to_bytes()
    _refused(rt, req, "INVALID_ARGUMENT", "not finite")
    assert _unchanged(rt, before) and rt.sessions[sid].micro_done == 0
    assert rt.step(_request(client, b[0], sid)).applied


def test_label_ids_outside_the_vocabulary_and_misplaced_fields_are_invalid(setup):
    rt, client, scfg, b = setup
    sid = rt.handshake(make_hello(scfg, "a")).session_id
    before = _weights(rt)
    req = _request(client, b[0], sid)
    labels = b[0]["labels"].clone()
    labels[labels != -100] = client.vocab_size + 7
    req.label_mask, req.label_ids, req.label_width = labels_to_wire(labels, client.vocab_size + 100)
    _refused(rt, req, "INVALID_ARGUMENT", "outside the vocabulary")
    req = _request(client, b[0], sid)
    req.hidden_grad = encode_grad(torch.zeros(2, 3), "fp16").to_bytes()
    _refused(rt, req, "INVALID_ARGUMENT", "U-shaped cut")
    assert _unchanged(rt, before)


def test_size_bombs_are_refused_before_decoding(setup):
    rt, client, scfg, b = setup
    sid = rt.handshake(make_hello(scfg, "a")).session_id
    req = _request(client, b[0], sid)
    packet = Packet.from_bytes(req.image)  # a few bytes that claim 2^28 rows
    req.image = Packet(codec=packet.codec, shape=(1 << 28, packet.shape[1]), payload=packet.payload[:64],
                       side=packet.side, levels=packet.levels, coder=packet.coder, dtype=packet.dtype).to_bytes()
    _refused(rt, req, "INVALID_ARGUMENT", "does not fit the layout")
    long = _request(client, b[0], sid)
    long.seq_len = rt.part.llm.config.max_position_embeddings + 1
    _refused(rt, long, "INVALID_ARGUMENT", "positions")
    rt.cfg.wire.max_tokens_per_step = 8
    _refused(rt, _request(client, b[0], sid), "RESOURCE_EXHAUSTED", "max_tokens_per_step")


def test_sessions_belong_to_who_authenticated(setup):
    rt, client, scfg, b = setup
    alice = rt.handshake(make_hello(scfg, "alice"), peer="alice").session_id
    bob = rt.handshake(make_hello(scfg, "bob"), peer="bob").session_id
    with pytest.raises(SplitError, match="not the authenticated client") as e:
        rt.handshake(make_hello(scfg, "alice"), peer="bob")
    assert e.value.code == "PERMISSION_DENIED"
    before = _weights(rt)
    _refused(rt, _request(client, b[0], alice), "PERMISSION_DENIED", "another client", peer="bob")
    for call, req in ((rt.checkpoint, pb.CheckpointRequest(session_id=alice, step_id=0)),
                      (rt.close, pb.Goodbye(session_id=alice)),
                      (rt.handshake, make_hello(scfg, "bob", session_id=alice, resume_step=0))):
        with pytest.raises(SplitError) as e:
            call(req, peer="bob")
        assert e.value.code == "PERMISSION_DENIED", call
    assert _unchanged(rt, before)
    assert rt.step(_request(client, b[0], alice), peer="alice").applied  # alice is undisturbed
    rt.close(pb.Goodbye(session_id=bob), peer="bob")
    _refused(rt, _request(client, b[1], bob), "FAILED_PRECONDITION", "closed", peer="bob")


def test_one_client_cannot_roll_the_shared_model_back_under_another(setup, tmp_path):
    rt, client, scfg, b = setup
    rt.checkpoint_dir = tmp_path / "checkpoints"
    rt.final_dir = tmp_path / "final"
    a = rt.handshake(make_hello(scfg, "a")).session_id
    rt.checkpoint(pb.CheckpointRequest(session_id=a, step_id=0))
    rt.step(_request(client, b[0], a))
    other = rt.handshake(make_hello(scfg, "b")).session_id
    rt.step(_request(client, b[1], other))
    before = _weights(rt)
    with pytest.raises(SplitError, match="does not roll back") as e:
        rt.handshake(make_hello(scfg, "a", session_id=a, resume_step=0))
    assert e.value.code == "FAILED_PRECONDITION" and _unchanged(rt, before)
    reply = rt.checkpoint(pb.CheckpointRequest(session_id=a, step_id=1))
    assert reply.path == f"{a}/step-000001" and str(tmp_path) not in reply.path  # no server path in replies


class _HostileServer:
    """Answers every step with what `reply` makes of the honest server's reply."""

    def __init__(self, honest: ServerRuntime, reply):
        self.honest, self.reply = honest, reply

    def handshake(self, req, peer=""):
        return self.honest.handshake(req)

    def step(self, req, peer=""):
        return self.reply(self.honest.step(req))


@pytest.mark.parametrize("attack", ["nan-gradient", "oversized-gradient", "nan-loss", "garbage"])
def test_the_client_refuses_a_hostile_server_and_keeps_its_weights(setup, attack):
    rt, client, scfg, b = setup

    def hostile(reply: pb.StepReply) -> pb.StepReply:
        if attack == "nan-loss":
            reply.loss = math.nan
        elif attack == "garbage":
            reply.image_grad = b"QTPK\x01" + b"\xff" * 40
        else:
            packet = Packet.from_bytes(reply.image_grad)
            rows = packet.shape[0] * (1000 if attack == "oversized-gradient" else 1)
            g = torch.full((rows, packet.shape[1]), math.nan if attack == "nan-gradient" else 0.0)
            reply.image_grad = encode_grad(g, "fp16").to_bytes()
        return reply

    crt = ClientRuntime(client, scfg, LoopbackLink(_HostileServer(rt, hostile)), "stage2", total_steps=STEPS)
    crt.connect()
    before = {k: v.detach().clone() for k, v in client.state_dict().items()}
    with pytest.raises(WireError):
        crt.train_step([b[0]])
    assert all(torch.equal(before[k], v) for k, v in client.state_dict().items())
    assert all(p.grad is None for p in client.parameters())


def _prompt(client: ClientPart, batch: dict, sid: str, gid: int) -> pb.GenerateRequest:
    out = client(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
    return pb.GenerateRequest(session_id=sid, generation_id=gid, round=0, batch=batch["input_ids"].shape[0],
                              seq_len=batch["input_ids"].shape[1], layout=out.layout.to_bytes(),
                              image=out.image.packet.to_bytes(), text=out.text.packet.to_bytes())


def test_generation_only_on_a_generation_server_with_open_calls_bounded(setup, data):
    rt, client, scfg, b = setup
    sid = rt.handshake(make_hello(scfg, "a"), peer="a").session_id
    with pytest.raises(SplitError, match="generation is served by a server started for it") as e:
        rt.generate(_prompt(client, b[0], sid, 1), peer="a")  # a training server's weights move under it
    assert e.value.code == "FAILED_PRECONDITION"
    gen = ServerRuntime(rt.part, scfg, None, max_generations_per_client=2, generation_idle_seconds=60)
    sid = gen.handshake(make_hello(scfg, "a"), peer="a").session_id
    n = int(b[0]["attention_mask"][0].sum())  # one sequence without its (right) padding
    one = dict(input_ids=b[0]["input_ids"][:1, :n], attention_mask=b[0]["attention_mask"][:1, :n],
               pixel_values=b[0]["pixel_values"][:1])
    for gid in (1, 2):
        assert len(gen.generate(_prompt(client, one, sid, gid), peer="a").next_ids) > 0
    with pytest.raises(SplitError, match="2 generations open") as e:
        gen.generate(_prompt(client, one, sid, 3), peer="a")
    assert e.value.code == "RESOURCE_EXHAUSTED" and gen.refused["open_generations"] == 1
    gen.generate(pb.GenerateRequest(session_id=sid, generation_id=1, close=True), peer="a")
    assert gen.generate(_prompt(client, one, sid, 3), peer="a").next_ids  # a closed one frees its place
    gen.generation_idle_seconds = 0.0  # idle ones are dropped with their caches
    gen.generate(pb.GenerateRequest(session_id=sid, generation_id=99, close=True), peer="a")
    assert not gen.generations
    bomb = _prompt(client, one, sid, 4)  # a prompt packet that claims 2^20 rows
    packet = Packet.from_bytes(bomb.text)
    bomb.text = Packet(codec=packet.codec, shape=(1 << 20, packet.shape[1]), payload=packet.payload,
                       side=packet.side, levels=packet.levels, coder=packet.coder, dtype=packet.dtype).to_bytes()
    with pytest.raises(SplitError, match="does not fit the layout"):
        gen.generate(bomb, peer="a")


def test_checkpoints_once_per_step_and_the_final_folder_after_the_last_step(setup, tmp_path):
    rt, client, scfg, b = setup
    rt.checkpoint_dir, rt.final_dir = tmp_path / "checkpoints", tmp_path / "final"
    sid = rt.handshake(make_hello(scfg, "a")).session_id
    writes = []
    save = rt._save_atomic
    rt._save_atomic = lambda target: writes.append(target) or save(target)
    for _ in range(3):  # asked again at the same step: the one written is named, nothing is written again
        assert rt.checkpoint(pb.CheckpointRequest(session_id=sid, step_id=0)).path == f"{sid}/step-000000"
    assert len(writes) == 1
    with pytest.raises(SplitError, match="after the stage's 4 steps") as e:
        rt.checkpoint(pb.CheckpointRequest(session_id=sid, step_id=0, tag="final"))
    assert e.value.code == "FAILED_PRECONDITION" and not rt.final_dir.exists()
    for step in range(STEPS):
        assert rt.step(_request(client, b[step % 3], sid, step)).applied
    for _ in range(2):
        assert rt.checkpoint(pb.CheckpointRequest(session_id=sid, step_id=STEPS, tag="final")).path == "final"
    assert (rt.final_dir / "DONE").exists() and len(writes) == 2


def test_a_handshake_with_an_oversized_configuration_or_name_is_refused(setup):
    rt, _, scfg, _ = setup
    hello = make_hello(scfg, "a")
    hello.config_hash = "differs"
    hello.config_json = "[" * 70_000
    with pytest.raises(SplitError, match="configuration JSON of 70000 bytes") as e:
        rt.handshake(hello)
    assert e.value.code == "INVALID_ARGUMENT"
    hello.config_json = "[" * 60_000  # within the limit but nested too deep to read: named, not INTERNAL
    with pytest.raises(SplitError, match="unreadable configuration JSON"):
        rt.handshake(hello)
    with pytest.raises(SplitError, match="longer than 64") as e:
        rt.handshake(make_hello(scfg, "x" * 65))
    assert e.value.code == "INVALID_ARGUMENT" and not rt.sessions


def test_a_u_cut_forward_without_its_backward_loses_the_turn_and_then_the_right_to_forward(data):
    cfg = micro()
    scfg, tok, client, server = stage_parts(cfg, "stage2", data)
    rt = ServerRuntime(server, scfg, "stage2", total_steps=STEPS, cut="u", busy_timeout=0.2, max_turn_expiries=2)
    ds = LlavaDataset.load(data / "instruct_train.json", data / "images", tok, template=template_name(cfg),
                           image_size=cfg.vision.image_size, num_image_tokens=cfg.vision.num_image_tokens,
                           max_length=cfg.data.max_length)
    batch = collate([ds[0], ds[1]], pad_id=tok.pad_token_id)

    def forward(sid, step=0):
        req = _request(client, batch, sid, step)
        req.label_mask, req.label_ids, req.label_width = b"", b"", 0
        return rt.step(req, peer=rt.sessions[sid].owner)

    mallory = rt.handshake(make_hello(scfg, "mallory", cut="u"), peer="mallory").session_id
    honest = rt.handshake(make_hello(scfg, "honest", cut="u"), peer="honest").session_id
    for strike in (1, 2):
        assert forward(mallory).hidden  # takes the turn and never sends the backward
        assert forward(honest).hidden  # waits at most busy_timeout, then the turn is taken from mallory
        assert rt.turn_expiries == {"mallory": strike} and rt.sessions[mallory].turn_expired
        with pytest.raises(SplitError, match="lost the U-cut turn"):
            forward(mallory)
        rt.handshake(make_hello(scfg, "mallory", session_id=mallory, resume_step=0, cut="u"), peer="mallory")
        rt.handshake(make_hello(scfg, "honest", session_id=honest, resume_step=0, cut="u"), peer="honest")
    with pytest.raises(SplitError, match="held the U-cut turn past") as e:
        forward(mallory)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert forward(honest).hidden


def test_a_short_hostile_campaign_against_a_real_server(benchmark_module, tmp_path):
    """benchmarks/hostile.py on a few cases per class: a real server process survives every class, answers every
    hostile call with a refusal in time, and applies only the honest client's steps."""
    hostile = benchmark_module("hostile")
    out = tmp_path / "hostile.json"
    assert hostile.main(["--cases", "150", "--out", str(tmp_path / "run"), "--results", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["total"]["cases"] >= 140 and set(result["classes"]) == set(hostile.SHARES)
    assert result["total"] == {**result["total"], "server_deaths": 0, "hangs": 0, "wrong_accepts": 0}
    assert result["applied_steps"] == result["honest_steps"] and result["hostile_steps_applied"] == 0
    assert result["classes"]["stalled"]["codes"].get("CANCELLED", 0) >= 1  # cut at the read deadline
    assert result["classes"]["cross-session"]["codes"] == {"PERMISSION_DENIED": result["classes"]["cross-session"]
                                                           ["cases"]}
