"""Split runtimes in one process (fast): session isolation, idempotent steps, refusals that leave the server
untouched, the U-shaped cut, and client/server rollback to a common checkpoint over an in-process link."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from qtllava.compress.base import Packet, PacketError
from qtllava.config import load_config
from qtllava.data import LlavaDataset, collate, make_data
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.train.accounting import format_link_table, read_metrics, summarize_link
from qtllava.train.client_runtime import ClientRuntime, make_hello
from qtllava.train.loop import run_stage, stage_parts
from qtllava.train.serve import build_server_runtime
from qtllava.train.server_runtime import ServerRuntime, SplitError
from qtllava.train.ucut import HEAD_FOLDER, ClientHead
from qtllava.wire.grpc_transport import RemoteError
from qtllava.wire.loopback import LoopbackLink
from qtllava.wire.messages import labels_to_wire, pb

STEPS = 6


def micro(*overrides: str):
    return load_config("micro", [f"train.stage0.steps={STEPS}", f"train.stage2.steps={STEPS}",
                                 "train.checkpoint_every=2", "train.threads=1", *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    cfg = micro()
    return make_data(cfg.data, cfg.vision.image_size, root=tmp_path_factory.mktemp("data"))


def _batches(cfg, data: Path, n: int, size: int = 2) -> list[dict]:
    from qtllava.train.loop import load_tokenizer_for

    tok = load_tokenizer_for(cfg, data)
    ds = LlavaDataset.load(data / "instruct_train.json", data / "images", tok, template=cfg.data.template,
                           image_size=cfg.vision.image_size, num_image_tokens=cfg.vision.num_image_tokens,
                           max_length=cfg.data.max_length)
    return [collate([ds[i * size + j] for j in range(size)], pad_id=tok.pad_token_id) for i in range(n)]


def _request(client: ClientPart, batch: dict, sid: str, step: int, micro_index: int, count: int,
             stage: str = "stage2") -> pb.StepRequest:
    out = client(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
    mask, ids, width = labels_to_wire(batch["labels"], client.vocab_size)
    return pb.StepRequest(session_id=sid, step_id=step, micro_index=micro_index, micro_count=count, stage=stage,
                          batch=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1],
                          layout=out.layout.to_bytes(), image=out.image.packet.to_bytes(),
                          text=out.text.packet.to_bytes(), label_mask=mask, label_ids=ids, label_width=width,
                          total_steps=STEPS)


def _server(cfg, data: Path, cut: str = "paper"):
    scfg, _, client, server = stage_parts(cfg, "stage2", data)
    rt = ServerRuntime(server, scfg, "stage2", total_steps=STEPS, cut=cut)
    return rt, client, scfg


def _weights(rt: ServerRuntime) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rt.part.state_dict().items()}


def _session(rt: ServerRuntime, scfg, name: str) -> str:
    return rt.handshake(make_hello(scfg, name)).session_id


# --- several clients -----------------------------------------------------------------------------------------


def test_interleaved_accumulation_stays_per_session(data):
    """A's step over two micro-batches is the same whether or not B accumulates a micro-batch in between."""
    cfg = micro()
    b = _batches(cfg, data, 3)
    rt1, client, scfg = _server(cfg, data)
    rt2, _, _ = _server(cfg, data)  # same seed: the same weights
    for rt, interleave in ((rt1, True), (rt2, False)):
        a, other = _session(rt, scfg, "a"), _session(rt, scfg, "b")
        rt.step(_request(client, b[0], a, 0, 0, 2))
        if interleave:
            rt.step(_request(client, b[2], other, 0, 0, 2))
        assert all(p.grad is None for p in rt.trainable), "partial sums must not sit in the shared .grad"
        assert rt.step(_request(client, b[1], a, 0, 1, 2)).applied
        assert rt.sessions[other].micro_done == int(interleave) and rt.applied_steps == 1
    w1, w2 = _weights(rt1), _weights(rt2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_step_ids_make_retries_idempotent_and_refusals_change_nothing(data):
    cfg = micro()
    b = _batches(cfg, data, 2)
    rt, client, scfg = _server(cfg, data)
    sid = _session(rt, scfg, "a")
    before = _weights(rt)
    bad = _request(client, b[0], sid, 0, 0, 1)
    bad.image = b"QTPK\x01garbage"
    with pytest.raises(SplitError) as e:
        rt.step(bad)
    assert e.value.code == "INVALID_ARGUMENT"
    bad = _request(client, b[0], sid, 0, 0, 1)
    bad.label_ids = bad.label_ids[:-2]
    with pytest.raises(SplitError) as e:
        rt.step(bad)
    assert e.value.code == "INVALID_ARGUMENT"
    assert all(torch.equal(before[k], v) for k, v in _weights(rt).items())
    req = _request(client, b[0], sid, 0, 0, 1)
    first = rt.step(req)
    after = _weights(rt)
    again = rt.step(req)
    assert again.replayed and not first.replayed and again.loss == first.loss
    assert rt.applied_steps == 1 and all(torch.equal(after[k], v) for k, v in _weights(rt).items())
    with pytest.raises(SplitError, match="out of order") as e:
        rt.step(_request(client, b[1], sid, 3, 0, 1))
    assert e.value.code == "FAILED_PRECONDITION"


def test_text_rows_get_their_own_gradient_codec(data):
    """`compress.downlink_text` codes the text rows' gradients, `downlink` the image rows'; a name that is no
    gradient codec is refused when the server is built, naming the field."""
    rt, client, scfg = _server(micro("compress.downlink=\"int6-ans\"", "compress.downlink_text=\"int2-ans\""), data)
    sid = _session(rt, scfg, "a")
    reply = rt.step(_request(client, _batches(scfg, data, 1)[0], sid, 0, 0, 1))
    assert Packet.from_bytes(reply.image_grad).dtype == "int6-ans"
    assert Packet.from_bytes(reply.text_grad).dtype == "int2-ans"
    rt, client, scfg = _server(micro("compress.downlink_text=\"none\""), data)
    reply = rt.step(_request(client, _batches(scfg, data, 1)[0], _session(rt, scfg, "b"), 0, 0, 1))
    assert reply.text_grad == b"" and Packet.from_bytes(reply.image_grad).dtype == scfg.compress.downlink
    bad = micro("compress.downlink_text=\"int3\"")
    with pytest.raises(ValueError, match="compress.downlink_text: unknown gradient codec 'int3'"):
        _server(bad, data)


@pytest.mark.parametrize("text_codec", ["identity", "fsq"])
def test_merged_text_rows_give_the_client_the_same_gradient_in_fewer_rows(data, text_codec):
    """compress.merge_text_rows: the server sends one summed gradient row per distinct text row (the same token),
    and the client's token embeddings receive the gradient they get from every row sent one by one."""
    b = _batches(micro(), data, 1, size=4)[0]
    grads, sizes = {}, {}
    for merge in (False, True):
        cfg = micro('compress.downlink="fp32"', f'compress.text.name="{text_codec}"',
                    f"compress.merge_text_rows={str(merge).lower()}")
        rt, client, scfg = _server(cfg, data)
        out = client(b["input_ids"], b["attention_mask"], b.get("pixel_values"))
        reply = rt.step(_request(client, b, _session(rt, scfg, "a"), 0, 0, 1))
        runtime = ClientRuntime(client, scfg, LoopbackLink(rt), "stage2", total_steps=STEPS)
        g = runtime._text_grad(reply.text_grad, out.text.values)
        client.embed_tokens.weight.grad = None
        out.text.values.backward(g)
        grads[merge] = client.embed_tokens.weight.grad.clone()
        sizes[merge] = Packet.from_bytes(reply.text_grad).shape[0], out.text.values.shape[0]
    assert sizes[True][0] < sizes[False][0] == sizes[False][1]
    ids = b["input_ids"][b["attention_mask"].bool() & (b["input_ids"] != client.image_token_id)]
    assert sizes[True][0] == torch.unique(ids).numel()  # one row per distinct token
    assert grads[True].abs().sum() > 0
    assert (grads[True] - grads[False]).norm() <= 1e-5 * grads[False].norm()  # the same sums in another order
    other = out.text.values.detach().clone()
    other[0] += 1.0  # one row more distinct than the server saw
    with pytest.raises(PacketError, match="distinct values"):
        runtime._text_grad(reply.text_grad, other)


def test_handshake_names_the_differing_key_and_cut(data):
    cfg = micro()
    rt, _, scfg = _server(cfg, data)
    other = copy.deepcopy(scfg)
    other.llm.num_layers = 3
    with pytest.raises(SplitError, match=r"llm\.num_layers: server 2, client 3"):
        rt.handshake(make_hello(other))
    with pytest.raises(SplitError, match="cut differs"):
        rt.handshake(make_hello(scfg, cut="u"))
    with pytest.raises(SplitError, match="session id"):
        rt.handshake(make_hello(scfg, session_id="../../etc"))


# --- the U-shaped cut ----------------------------------------------------------------------------------------


class RecordingLink(LoopbackLink):
    def __init__(self, handler):
        super().__init__(handler)
        self.requests: list[pb.StepRequest] = []

    def step(self, request):
        self.requests.append(request)
        return super().step(request)


def test_u_cut_sends_no_label_bytes_and_matches_the_paper_loss(data, tmp_path):
    cfg = micro("train.stage0.steps=2")
    paper = run_stage(cfg, "stage0", data, tmp_path / "paper", progress=False)
    server_rt = build_server_runtime(cfg, "stage0", data, tmp_path / "u-server", cut="u")
    link = RecordingLink(server_rt)
    u = run_stage(cfg, "stage0", data, tmp_path / "u-client", link=link, cut="u", progress=False)
    assert link.requests and all(not r.label_mask and not r.label_ids for r in link.requests)
    assert sum(bool(r.hidden_grad) for r in link.requests) == len(link.requests) // 2
    rows = read_metrics(tmp_path / "u-client" / "metrics.jsonl")
    assert all(r["payload_up"]["labels"] == 0 and r["payload_down"]["hidden"] > 0 for r in rows)
    server_rows = [r for r in read_metrics(tmp_path / "u-server" / "metrics.jsonl") if "step" in r]
    assert len(server_rows) == 2
    assert all(r["fields_up"]["label_mask"] + r["fields_up"]["label_ids"] == 0 for r in server_rows)
    # Stage 0 sends fp32 both ways, so the client's head sees the server's hidden states exactly.
    first = [read_metrics(d / "metrics.jsonl")[0]["loss"] for d in (tmp_path / "paper", tmp_path / "u-client")]
    assert first[0] == pytest.approx(first[1], abs=1e-5)
    assert (u.final / HEAD_FOLDER / "model.safetensors").exists()
    table = format_link_table(summarize_link(rows))
    assert "hidden (U)" in table and "hidden grad (U)" in table
    assert paper.steps == u.steps == 2


def test_u_cut_generation_equals_the_paper_cut_with_the_same_head(data, tmp_path):
    cfg = micro("train.stage0.steps=1")
    run_stage(cfg, "stage0", data, tmp_path / "c", link=LoopbackLink(
        build_server_runtime(cfg, "stage0", data, tmp_path / "s", cut="u")), cut="u", progress=False)
    client = ClientPart.from_pretrained(tmp_path / "c" / "final" / "client")
    head = ClientHead(client.hidden_size, client.vocab_size)
    head.load(tmp_path / "c" / "final" / HEAD_FOLDER)
    server = ServerPart.from_pretrained(tmp_path / "s" / "final" / "server")
    u_rt = ClientRuntime(client, client.cfg, LoopbackLink(ServerRuntime(copy.deepcopy(server), server.cfg, cut="u")),
                         cut="u", head=head)
    with torch.no_grad():
        server.llm.get_output_embeddings().weight.copy_(head.lm_head.weight)
    paper_rt = ClientRuntime(client, client.cfg, LoopbackLink(ServerRuntime(server, server.cfg)))
    batch = _batches(cfg, data, 1, size=3)[0]
    gen = collate_left(batch)
    out = []
    for rt in (u_rt, paper_rt):
        rt.connect()
        out.append(rt.generate(gen, max_new_tokens=4, eos_token_id=-1))
    assert out[0] == out[1] and all(len(r) == 4 for r in out[0])


def collate_left(batch: dict) -> dict:
    """Right-padded batch -> the same rows left-padded (generation needs left padding)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new_ids, new_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        new_ids[i, -n:] = ids[i, :n]
        new_mask[i, -n:] = 1
    return {"input_ids": new_ids, "attention_mask": new_mask, "pixel_values": batch["pixel_values"]}


# --- rollback to a common checkpoint -------------------------------------------------------------------------


class RestartableLink(LoopbackLink):
    """Loopback that turns refusals into gRPC statuses (as the gRPC transport does) and can swap its server for
    a freshly started one that resumed from its latest checkpoint (a server crash and `serve --resume`)."""

    def __init__(self, handler, restart_after: int | None = None, rebuild=None):
        super().__init__(handler)
        self.restart_after = restart_after
        self.rebuild = rebuild
        self.calls = 0

    def call(self, kind, request):
        if kind == "step":
            self.calls += 1
            if self.calls == self.restart_after:
                self.handler = self.rebuild()
        try:
            return super().call(kind, request)
        except SplitError as e:
            raise RemoteError(getattr(grpc.StatusCode, e.code), str(e)) from None


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for side in ("client", "server"):
        if (folder / side).exists():
            out.update({f"{side}.{k}": v for k, v in load_file(folder / side / "model.safetensors").items()})
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted in-process stage-2 run of STEPS steps."""
    out = tmp_path_factory.mktemp("reference")
    run_stage(micro(), "stage2", data, out, progress=False)
    return out


def test_no_text_downlink_leaves_the_embeddings_and_sends_no_text_bytes(data, reference, tmp_path):
    """compress.downlink_text = "none": a stage-2 run sends no text-row gradient bytes, the client's token
    embeddings end where they started, the connector still trains."""
    run_stage(micro("compress.downlink_text=\"none\""), "stage2", data, tmp_path, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert sum(r["payload_down"]["text"] for r in rows) == 0 and sum(r["payload_down"]["image"] for r in rows) > 0
    _, _, start, _ = stage_parts(micro(), "stage2", data)
    got, ref = _final_weights(tmp_path / "final"), _final_weights(reference / "final")
    emb = "client.embed_tokens.weight"
    assert torch.equal(got[emb], start.embed_tokens.weight.detach())
    assert not torch.equal(ref[emb], got[emb])  # with text gradients they do train
    conn = [k for k in got if k.startswith("client.connector.")]
    assert conn and any(not torch.equal(got[k], start.state_dict()[k[len("client."):]]) for k in conn)


def _assert_same_run(reference: Path, client_out: Path, server_final: Path) -> None:
    ref = _final_weights(reference / "final")
    got = {**_final_weights(client_out / "final"), **_final_weights(server_final)}
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_loss = [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    got_loss = [r["loss"] for r in read_metrics(client_out / "metrics.jsonl")]
    assert got_loss == pytest.approx(ref_loss, abs=1e-5)


def test_client_crash_then_resume_rolls_the_server_back(data, tmp_path, reference):
    cfg = micro()
    server_rt = build_server_runtime(cfg, "stage2", data, tmp_path / "server")
    link = RestartableLink(server_rt)
    run_stage(cfg, "stage2", data, tmp_path / "client", link=link, max_steps=3, progress=False)
    assert server_rt.applied_steps == 3  # the server is one step ahead of the client's last checkpoint (2)
    run = run_stage(cfg, "stage2", data, tmp_path / "client", link=link, resume=True, progress=False)
    assert run.steps == STEPS and server_rt.applied_steps == 3 + (STEPS - 2)
    _assert_same_run(reference, tmp_path / "client", tmp_path / "server" / "final")


def test_server_crash_then_resume_rolls_the_client_back(data, tmp_path, reference):
    cfg = micro()

    def restarted():
        return build_server_runtime(cfg, "stage2", data, tmp_path / "server", resume=True)

    link = RestartableLink(build_server_runtime(cfg, "stage2", data, tmp_path / "server"), restart_after=4,
                           rebuild=restarted)
    run = run_stage(cfg, "stage2", data, tmp_path / "client", link=link, progress=False)
    assert run.steps == STEPS and run.rollbacks == 1
    assert link.handler.applied_steps == STEPS
    steps = [r["step"] for r in read_metrics(tmp_path / "client" / "metrics.jsonl")]
    assert steps == list(range(STEPS))
    _assert_same_run(reference, tmp_path / "client", tmp_path / "server" / "final")
    events = [json.loads(x) for x in (tmp_path / "server" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in events if "step" in r][-STEPS + 2:] == list(range(2, STEPS))


def test_two_u_cut_clients_in_threads_take_turns(data, tmp_path):
    """Concurrent U-cut clients: a session's forward and backward are never split by another session's step."""
    import threading

    from qtllava.train.batches import stage_batches
    from qtllava.train.loop import client_head

    cfg = micro("train.stage0.steps=3")
    server_rt = build_server_runtime(cfg, "stage0", data, tmp_path / "server", cut="u")
    runtimes, errors = [], []
    for i in range(2):
        scfg, tok, client, server = stage_parts(cfg, "stage0", data)
        rt = ClientRuntime(client, scfg, LoopbackLink(server_rt), "stage0", total_steps=3, vocab_size=len(tok),
                           name=f"c{i}", cut="u", head=client_head(server, None))
        rt.connect()
        runtimes.append((rt, stage_batches(cfg, "stage0", data, tok, shard=(i, 2))))

    def train(rt, batches):
        try:
            for step in range(3):
                rt.train_step(batches(step))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=train, args=pair) for pair in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and server_rt.applied_steps == 6
    assert sorted(s.next_step for s in server_rt.sessions.values()) == [3, 3]
