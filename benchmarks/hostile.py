"""A hostile-input campaign against a real `qtllava serve` process on loopback.

A training server (the `micro` preset with the product's codecs: fsq L = 4 + ans up, int4-ans gradients down; two
clients with their own keys; a short read deadline) is attacked class by class. After each class the server must be
alive and an honest client must still step at its usual time; at the end the server must have applied exactly the
honest client's steps (no hostile request reached the shared weights). Per class and in total it counts:

- cases: hostile requests sent;
- server_deaths: the server process gone after the class;
- hangs: a hostile call that got no answer within its timeout (the server held it);
- wrong_accepts: a hostile call answered OK (every case here must be refused), plus, in the total, optimizer steps
  the server applied beyond the honest client's.

    python benchmarks/hostile.py [--cases 2400] [--seed 0]      # about a minute on 2 cores; results/hostile.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from qtllava.compress.base import Packet
from qtllava.config import load_config
from qtllava.data import LlavaDataset, collate, make_data
from qtllava.data.templates import template_name
from qtllava.train.accounting import read_metrics
from qtllava.train.client_runtime import ClientRuntime, make_hello
from qtllava.train.loop import stage_parts
from qtllava.train.procs import spawn_server
from qtllava.wire.grpc_transport import SERVICE, ClientOptions, GrpcLink
from qtllava.wire.messages import labels_to_wire, pb

log = logging.getLogger("hostile")

TOKENS = {"alice": "alice-key-0123456789", "bob": "bob-key-9876543210", "honest": "honest-key-5555"}
LIMIT = 4 << 20  # the server's message limit here
READ_SECONDS = 2.0
OVERRIDES = ["train.threads=1", "train.stage2.steps=100000", f"wire.max_message_bytes={LIMIT}",
             f"wire.read_seconds={READ_SECONDS}", "wire.max_calls_per_client=2",
             'compress.image.name="fsq"', 'compress.image.coder="ans"', 'compress.text.name="fsq"',
             'compress.text.coder="ans"', 'compress.downlink="int4-ans"']
# attack class -> share of --cases
SHARES = {"no-token": 0.10, "random-bytes": 0.20, "truncated": 0.15, "bit-flip": 0.20, "non-finite": 0.10,
          "size-bomb": 0.08, "label-range": 0.05, "cross-session": 0.07, "oversized": 0.01, "stalled": 0.04}


def _md(name: str, token: str | None = None) -> list[tuple[str, str]]:
    return [("x-qtllava-client", name), ("authorization", f"Bearer {TOKENS[name] if token is None else token}")]


class Campaign:
    def __init__(self, port: int, cfg, scfg, client, batches, rng: random.Random):
        self.port, self.cfg, self.scfg, self.client, self.batches, self.rng = port, cfg, scfg, client, batches, rng
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 4 * LIMIT), ("grpc.max_receive_message_length", 4 * LIMIT)])
        self.stats: dict[str, dict] = {}
        self.honest: ClientRuntime | None = None  # the honest client, stepping between the classes
        self.during_stall = 0.0  # its mean step time while the stalled calls are in flight
        link = GrpcLink(ClientOptions(target=f"127.0.0.1:{port}", client_name="alice", token=TOKENS["alice"]))
        self.alice = link.handshake(make_hello(scfg, "alice")).session_id
        link.shutdown()

    def call(self, cls: str, method: str, data: bytes, who: str = "alice", token: str | None = None,
             timeout: float = 15.0) -> None:
        """One hostile unary call; counts its status under `cls`."""
        st = self.stats.setdefault(cls, {"cases": 0, "hangs": 0, "wrong_accepts": 0, "codes": {}})
        st["cases"] += 1
        try:
            self.channel.unary_unary(f"/{SERVICE}/{method}")(data, metadata=_md(who, token), timeout=timeout)
            code = "OK"
            st["wrong_accepts"] += 1
        except grpc.RpcError as e:
            code = e.code().name
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                st["hangs"] += 1
        st["codes"][code] = st["codes"].get(code, 0) + 1

    def step_request(self, step: int = 0, batch: dict | None = None) -> pb.StepRequest:
        batch = batch if batch is not None else self.rng.choice(self.batches)
        with torch.no_grad():
            out = self.client(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
        mask, ids, width = labels_to_wire(batch["labels"], self.client.vocab_size)
        return pb.StepRequest(session_id=self.alice, step_id=step, micro_index=0, micro_count=1, stage="stage2",
                              batch=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1],
                              layout=out.layout.to_bytes(), image=out.image.packet.to_bytes(),
                              text=out.text.packet.to_bytes(), label_mask=mask, label_ids=ids, label_width=width)

    # --- attack classes: each sends n hostile requests ------------------------------------------------------

    def no_token(self, n: int) -> None:
        for _ in range(n):
            method = self.rng.choice(["Handshake", "Step", "Checkpoint", "Close", "Generate"])
            token = self.rng.choice(["", "wrong", TOKENS["bob"], "x" * 300])
            self.call("no-token", method, self.step_request().SerializeToString() if method == "Step" else b"",
                      who="alice", token=token)

    def random_bytes(self, n: int) -> None:
        for _ in range(n):
            method = self.rng.choice(["Handshake", "Step", "Generate", "Checkpoint"])
            data = self.rng.randbytes(self.rng.choice([1, 7, 64, 1000, 30000]))
            self.call("random-bytes", method, data)

    def truncated(self, n: int) -> None:
        for _ in range(n):
            data = self.step_request().SerializeToString()
            self.call("truncated", "Step", data[:self.rng.randrange(1, len(data))])

    def bit_flip(self, n: int) -> None:
        for _ in range(n):
            req = self.step_request()
            field = self.rng.choice(["image", "text"])
            raw = bytearray(getattr(req, field))
            bit = self.rng.randrange(8 * len(raw))
            raw[bit // 8] ^= 1 << (bit % 8)
            setattr(req, field, bytes(raw))
            self.call("bit-flip", "Step", req.SerializeToString())

    def non_finite(self, n: int) -> None:
        """NaN or infinity in a row's normalisation statistics (fp16 side information), with a valid checksum."""
        for _ in range(n):
            req = self.step_request()
            field = self.rng.choice(["image", "text"])
            p = Packet.from_bytes(getattr(req, field))
            side = bytearray(p.side)
            value = self.rng.choice([0x7E00, 0x7C00, 0xFC00])  # fp16 NaN, +inf, -inf
            at = 2 * self.rng.randrange(len(side) // 2)
            side[at:at + 2] = struct.pack("<H", value)
            setattr(req, field, Packet(codec=p.codec, shape=p.shape, payload=p.payload, side=bytes(side),
                                       levels=p.levels, coder=p.coder, dtype=p.dtype).to_bytes())
            self.call("non-finite", "Step", req.SerializeToString())

    def size_bomb(self, n: int) -> None:
        for i in range(n):
            req = self.step_request()
            kind = i % 3
            if kind == 0:  # a small packet that claims a huge shape
                p = Packet.from_bytes(req.image)
                rows = 1 << self.rng.randrange(16, 31)
                req.image = Packet(codec=p.codec, shape=(rows, p.shape[1]), payload=p.payload, side=p.side,
                                   levels=p.levels, coder=p.coder, dtype=p.dtype).to_bytes()
            elif kind == 1:  # longer than the model's positions
                req.seq_len = self.rng.choice([10_000, 1 << 20, (1 << 32) - 1])
            else:  # more positions per step than the server allows
                req.batch, req.seq_len = 4096, 4096
            self.call("size-bomb", "Step", req.SerializeToString())

    def label_range(self, n: int) -> None:
        for _ in range(n):
            batch = self.rng.choice(self.batches)
            req = self.step_request(batch=batch)
            labels = batch["labels"].clone()
            labels[labels != -100] = self.client.vocab_size + self.rng.randrange(1, 1000)
            req.label_mask, req.label_ids, req.label_width = labels_to_wire(labels, self.client.vocab_size + 1000)
            self.call("label-range", "Step", req.SerializeToString())

    def cross_session(self, n: int) -> None:
        for i in range(n):
            kind = i % 4
            if kind == 0:
                self.call("cross-session", "Step", self.step_request().SerializeToString(), who="bob")
            elif kind == 1:
                self.call("cross-session", "Checkpoint", pb.CheckpointRequest(session_id=self.alice)
                          .SerializeToString(), who="bob")
            elif kind == 2:
                self.call("cross-session", "Handshake", make_hello(self.scfg, "bob", session_id=self.alice,
                                                                   resume_step=0).SerializeToString(), who="bob")
            else:  # bob claims alice's name
                self.call("cross-session", "Handshake", make_hello(self.scfg, "alice").SerializeToString(), who="bob")

    def oversized(self, n: int) -> None:
        for _ in range(n):
            req = self.step_request()
            req.image = b"\0" * (LIMIT + self.rng.randrange(1, 1 << 20))
            self.call("oversized", "Step", req.SerializeToString())

    def stalled(self, n: int) -> None:
        """Calls that send part of a request and then nothing: bob's beyond his 2 calls in flight are refused at
        once, the rest are cancelled at the read deadline."""
        release = threading.Event()
        st = self.stats.setdefault("stalled", {"cases": 0, "hangs": 0, "wrong_accepts": 0, "codes": {}})
        threads = []
        for i in range(n):
            chunk = pb.Chunk(kind="step", index=0, count=2, data=b"y" * 100).SerializeToString()

            def requests(first=chunk):
                yield first
                release.wait(4 * READ_SECONDS)

            def one(method="StepStream" if i % 2 else "Step", it=requests()):
                try:
                    for _ in self.channel.stream_stream(f"/{SERVICE}/{method}")(it, metadata=_md("bob"),
                                                                               timeout=4 * READ_SECONDS):
                        pass
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                st["codes"][code] = st["codes"].get(code, 0) + 1
                st["cases"] += 1
                st["hangs"] += code == "DEADLINE_EXCEEDED"
                st["wrong_accepts"] += code == "OK"
            threads.append(threading.Thread(target=one, daemon=True))
        for t in threads:
            t.start()
        time.sleep(0.2)
        self.during_stall = self.honest_steps(3)
        for t in threads:
            t.join(6 * READ_SECONDS)
        release.set()

    # --- the honest client ----------------------------------------------------------------------------------

    def honest_steps(self, k: int) -> float:
        """k honest steps; -> mean seconds per step."""
        t0 = time.perf_counter()
        for _ in range(k):
            self.honest.train_step([self.rng.choice(self.batches)])
        return (time.perf_counter() - t0) / k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/hostile")
    p.add_argument("--results", default="results/hostile.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qtllava").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("micro", OVERRIDES)
    data = make_data(cfg.data, cfg.vision.image_size, root=out / "data")
    scfg, tok, client, _ = stage_parts(cfg, "stage2", data)
    ds = LlavaDataset.load(data / "instruct_train.json", data / "images", tok, template=template_name(cfg),
                           image_size=cfg.vision.image_size, num_image_tokens=cfg.vision.num_image_tokens,
                           max_length=cfg.data.max_length)
    batches = [collate([ds[2 * i], ds[2 * i + 1]], pad_id=tok.pad_token_id) for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text("".join(f"{k}={v}\n" for k, v in TOKENS.items()))
        overrides = [x for o in OVERRIDES for x in ("-o", o)]
        server, port = spawn_server(["--config", "micro", *overrides, "--data", str(data), "--stage", "stage2",
                                     "--out", str(out / "server"), "--tokens-file", str(tokens)],
                                    out / "port", out / "server.log")
        try:
            rng = random.Random(args.seed)
            camp = Campaign(port, cfg, scfg, client, batches, rng)
            hcfg, _, hclient, _ = stage_parts(cfg, "stage2", data)
            link = GrpcLink(ClientOptions(target=f"127.0.0.1:{port}", client_name="honest", token=TOKENS["honest"]))
            camp.honest = ClientRuntime(hclient, hcfg, link, "stage2", total_steps=100000, name="honest")
            camp.honest.connect()
            usual = camp.honest_steps(5)
            honest_steps = 5
            per_class_step: dict[str, float] = {}
            deaths: dict[str, int] = {}
            t_start = time.perf_counter()
            for cls, share in SHARES.items():
                n = max(1, round(share * args.cases))
                getattr(camp, cls.replace("-", "_"))(n)
                deaths[cls] = int(not server.alive())
                if deaths[cls]:
                    log.error("the server died during %s", cls)
                    break
                per_class_step[cls] = camp.honest_steps(2)
                honest_steps += 2
                log.info("%s: %s", cls, camp.stats.get(cls))
            honest_steps += 3 if "stalled" in camp.stats else 0
            wall = time.perf_counter() - t_start
            link.shutdown()
        finally:
            server.stop()
    applied = [r for r in read_metrics(out / "server" / "metrics.jsonl") if "step" in r]
    extra = len(applied) - honest_steps
    classes = {cls: {**camp.stats.get(cls, {"cases": 0, "hangs": 0, "wrong_accepts": 0, "codes": {}}),
                     "server_deaths": deaths.get(cls, 0),
                     "honest_step_s_after": round(per_class_step.get(cls, float("nan")), 4)} for cls in SHARES}
    total = {k: sum(c[k] for c in classes.values()) for k in ("cases", "server_deaths", "hangs", "wrong_accepts")}
    total["wrong_accepts"] += max(0, extra)
    result = {
        "command": "python benchmarks/hostile.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread per process",
        "server": {"preset": "micro", "overrides": OVERRIDES, "clients": sorted(TOKENS)},
        "classes": classes, "total": total,
        "applied_steps": len(applied), "honest_steps": honest_steps,
        "hostile_steps_applied": extra,
        "honest_step_s": {"usual": round(usual, 4), "while_stalled": round(camp.during_stall, 4),
                          "after_each_class_max": round(max(per_class_step.values()), 4)},
        "wall_s": round(wall, 1),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(f"{'class':<14} {'cases':>6} {'deaths':>6} {'hangs':>6} {'wrong':>6}  codes")
    for cls, c in classes.items():
        print(f"{cls:<14} {c['cases']:>6} {c['server_deaths']:>6} {c['hangs']:>6} {c['wrong_accepts']:>6}  "
              f"{c['codes']}")
    print(f"{'total':<14} {total['cases']:>6} {total['server_deaths']:>6} {total['hangs']:>6} "
          f"{total['wrong_accepts']:>6}")
    print(f"honest step: usual {usual:.3f} s, while stalled {result['honest_step_s']['while_stalled']:.3f} s; "
          f"steps applied {len(applied)} = honest {honest_steps}: {extra == 0}")
    print(f"wrote {args.results}")
    return 0 if total["server_deaths"] == total["hangs"] == total["wrong_accepts"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
