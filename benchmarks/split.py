"""Split benchmark (`make bench-split`) -> results/split.json.

1. Step time of a split run over gRPC on loopback (server = a `qtllava serve` process, client = this process) vs the
   same stage in one process, tiny preset: paired steps on the same batches (alternating which goes first), median
   seconds per optimizer step after warm-up, one run.
2. Communication time per step for the paper's tensor shapes (the `paper` preset: 729 image tokens and a width of
   896 per sample; batch and text length below) for fp16 both ways, fsq L=4 with `pack` and fsq L=4 with `ans`
   (int8 gradients back), on two links: 100 Mbit/s with 20 ms one-way delay and 1 Gbit/s with 1 ms. Message sizes
   are the serialized sizes of real messages built with the real codecs on Gaussian features and gradients
   (real gradients are heavier-tailed, so entropy-coded gradient codecs gain more on them than here).

   Link emulation: `tc netem` (rate + delay) in a network namespace when the kernel has it. Otherwise the figure
   is an analytic model, labelled as such: (bytes_up + bytes_down) * 8 / rate + round_trips * 2 * delay
   (framing, TCP slow start and flow control ignored: a lower bound). Where `tc tbf` works (rate only), the same
   messages are also timed over a rate-shaped loopback in a namespace (`measured_rate_only_s`), which checks the
   bandwidth term of the model against real gRPC.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from qtllava.compress import build_codec
from qtllava.compress.grad import encode_grad
from qtllava.config import CodecConfig, load_config
from qtllava.wire.messages import labels_to_wire, pb

log = logging.getLogger("bench-split")

LINKS = [  # name, rate in bit/s, one-way delay in s
    ("100Mbit/s+20ms", 100e6, 0.020),
    ("1Gbit/s+1ms", 1e9, 0.001),
]
CONFIGS = {  # name -> (uplink codec for both modalities, downlink gradient codec)
    "fp16": (CodecConfig(name="identity", dtype="fp16"), "fp16"),
    "fsq4-pack+int8": (CodecConfig(name="fsq", levels=4, coder="pack"), "int8"),
    "fsq4-ans+int8": (CodecConfig(name="fsq", levels=4, coder="ans"), "int8"),
    # also entropy-coded int8 and plain int4 gradients
    "fsq4-ans+int8-ans": (CodecConfig(name="fsq", levels=4, coder="ans"), "int8-ans"),
    "fsq4-ans+int4": (CodecConfig(name="fsq", levels=4, coder="ans"), "int4"),
}
PAPER_BATCH = 16  # samples per step (one micro-batch), as the paper preset's stage 2 micro-batch
PAPER_TEXT_TOKENS = 128  # non-pad text tokens per sample (prompt + answer)
NETNS = "qtllava-bench"


# --- 1. loopback vs in process --------------------------------------------------------------------------------


def loopback_ratio(preset: str, stage: str, steps: int, warmup: int, threads: int, work: Path) -> dict:
    """Paired steps: the same micro-batches through an in-process server and through a server process over gRPC,
    alternating which goes first, so that load from other processes on the machine hits both alike."""
    from qtllava.data import prepare_data
    from qtllava.train.client_runtime import ClientRuntime
    from qtllava.train.batches import stage_batches
    from qtllava.train.loop import stage_parts
    from qtllava.train.procs import spawn_server
    from qtllava.train.server_runtime import ServerRuntime
    from qtllava.wire.grpc_transport import ClientOptions, GrpcLink
    from qtllava.wire.loopback import LoopbackLink

    overrides = [f"train.{stage}.steps={steps}", f"train.threads={threads}", "train.checkpoint_every=0"]
    cfg = load_config(preset, overrides)
    data = prepare_data(cfg, root=ROOT / cfg.data.root)
    args = ["--config", preset, *[a for o in overrides for a in ("-o", o)], "--data", str(data)]
    server, port = spawn_server(["--stage", stage, *args, "--out", str(work / "server")], work / "port",
                                work / "server.log")
    link = GrpcLink(ClientOptions(target=f"127.0.0.1:{port}"))
    try:
        scfg, tok, client, server_part = stage_parts(cfg, stage, data)
        local = ClientRuntime(client, scfg, LoopbackLink(ServerRuntime(server_part, scfg, stage, total_steps=steps)),
                              stage, total_steps=steps, vocab_size=len(tok))
        scfg, tok, client, _ = stage_parts(cfg, stage, data)
        remote = ClientRuntime(client, scfg, link, stage, total_steps=steps, vocab_size=len(tok))
        for rt in (local, remote):
            rt.connect()
        batches = stage_batches(cfg, stage, data, tok)
        seconds: dict[str, list[float]] = {"inprocess": [], "loopback": []}
        losses: dict[str, list[float]] = {"inprocess": [], "loopback": []}
        up = down = 0
        for step in range(steps):
            micro = batches(step)
            order = [("inprocess", local), ("loopback", remote)]
            for name, rt in order if step % 2 == 0 else order[::-1]:
                stats = rt.train_step(micro)
                seconds[name].append(stats.seconds)
                losses[name].append(stats.loss)
                if name == "loopback":
                    up, down = up + stats.bytes_up, down + stats.bytes_down
    finally:
        link.shutdown()
        server.stop()
    a, b = (statistics.median(seconds[k][warmup:]) for k in ("inprocess", "loopback"))
    return {"preset": preset, "stage": stage, "steps": steps, "warmup_steps_excluded": warmup, "threads": threads,
            "method": "paired steps (same batches, alternating order), median seconds per optimizer step",
            "inprocess_s_per_step": a, "loopback_s_per_step": b, "ratio": b / a,
            "mean_ratio": statistics.mean(seconds["loopback"][warmup:]) / statistics.mean(seconds["inprocess"][warmup:]),
            "bytes_up_per_step": up / steps, "bytes_down_per_step": down / steps,
            "losses_equal_1e-5": all(abs(x - y) <= 1e-5 for x, y in zip(losses["inprocess"], losses["loopback"]))}


# --- 2. messages of the paper's shapes ----------------------------------------------------------------------------


def paper_messages(config: str, seed: int = 0) -> tuple[pb.StepRequest, pb.StepReply, dict]:
    """One step's request and reply (paper cut) for the paper preset's shapes, with real codecs."""
    paper = load_config("paper")
    dim, n_img = paper.llm.hidden_size, paper.vision.num_image_tokens
    codec_cfg, down = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    rows = {"image": PAPER_BATCH * n_img, "text": PAPER_BATCH * PAPER_TEXT_TOKENS}
    packets, grads = {}, {}
    for name, n in rows.items():
        client, _ = build_codec(codec_cfg, dim)
        with torch.no_grad():
            enc = client(torch.randn(n, dim, generator=g))
        packets[name] = enc.packet.to_bytes()
        grads[name] = encode_grad(torch.randn(n, dim, generator=g) * 1e-3, down).to_bytes()
    seq = n_img + PAPER_TEXT_TOKENS
    labels = torch.full((PAPER_BATCH, seq), -100)
    labels[:, seq - PAPER_TEXT_TOKENS // 2:] = torch.randint(0, 151_000, (PAPER_BATCH, PAPER_TEXT_TOKENS // 2),
                                                             generator=g)
    mask, ids, width = labels_to_wire(labels, 151_936)
    req = pb.StepRequest(session_id="0" * 32, step_id=1, micro_index=0, micro_count=1, stage="stage2",
                         batch=PAPER_BATCH, seq_len=seq, layout=b"\x55" * ((PAPER_BATCH * seq + 3) // 4),
                         image=packets["image"], text=packets["text"], label_mask=mask, label_ids=ids,
                         label_width=width, total_steps=5000)
    reply = pb.StepReply(step_id=1, micro_index=0, loss=1.0, n_label_tokens=int((labels != -100).sum()),
                         image_grad=grads["image"], text_grad=grads["text"], applied=True)
    elements = sum(rows.values()) * dim
    shapes = {"batch": PAPER_BATCH, "image_tokens_per_sample": n_img, "text_tokens_per_sample": PAPER_TEXT_TOKENS,
              "width": dim, "elements_per_direction": elements,
              "bits_per_element_up": 8 * (len(packets["image"]) + len(packets["text"])) / elements,
              "bits_per_element_down": 8 * (len(grads["image"]) + len(grads["text"])) / elements}
    return req, reply, shapes


def analytic_seconds(bytes_up: int, bytes_down: int, rate: float, delay: float, round_trips: int = 1) -> float:
    return (bytes_up + bytes_down) * 8 / rate + round_trips * 2 * delay


# --- link emulation in a network namespace ------------------------------------------------------------------------


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def emulation_support() -> dict:
    """Which qdiscs work in a fresh network namespace here (needs root and iproute2)."""
    out = {"netns": False, "netem": False, "tbf": False, "why": ""}
    if shutil.which("ip") is None or shutil.which("tc") is None:
        out["why"] = "iproute2 (ip, tc) not installed"
        return out
    _sh("ip", "netns", "del", NETNS)
    r = _sh("ip", "netns", "add", NETNS)
    if r.returncode:
        out["why"] = f"cannot create a network namespace: {r.stderr.strip()}"
        return out
    try:
        out["netns"] = _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up").returncode == 0
        r = _sh("ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", "lo", "root", "netem", "delay", "1ms")
        out["netem"] = r.returncode == 0
        if not out["netem"]:
            out["why"] = f"tc netem: {r.stderr.strip()}"
        r = _sh("ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate",
                "100mbit", "burst", "512kb", "limit", "64mb")
        out["tbf"] = r.returncode == 0
    finally:
        _sh("ip", "netns", "del", NETNS)
    return out


def _qdisc(kind: str, rate: float, delay: float) -> list[str]:
    mbit = f"{int(rate / 1e6)}mbit"
    if kind == "netem":  # on loopback each direction passes the qdisc once: one-way delay per packet
        return ["netem", "rate", mbit, "delay", f"{delay * 1e3:g}ms", "limit", "100000"]
    burst = f"{max(512, int(rate / 8 / 1000 * 4 / 1024))}kb"  # >= 4 ms of traffic and well above the 64 KiB MTU
    return ["tbf", "rate", mbit, "burst", burst, "limit", "64mb"]


def measure_in_netns(messages: dict, kind: str, reps: int, work: Path) -> dict:
    """Time real gRPC step calls with the given messages over loopback shaped by `kind` in a namespace.
    -> {(link, config): median seconds per call}"""
    work.mkdir(parents=True, exist_ok=True)
    for config, (req, reply) in messages.items():
        (work / f"{config}.req").write_bytes(req.SerializeToString())
        (work / f"{config}.reply").write_bytes(reply.SerializeToString())
    out = {}
    _sh("ip", "netns", "del", NETNS)
    if _sh("ip", "netns", "add", NETNS).returncode:
        raise RuntimeError("cannot create the network namespace")
    try:
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        for link, rate, delay in LINKS:
            r = _sh("ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", "lo", "root",
                    *_qdisc(kind, rate, delay))
            if r.returncode:
                raise RuntimeError(f"tc: {r.stderr.strip()}")
            r = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, __file__, "--probe", str(work),
                                "--reps", str(reps), *[a for c in messages for a in ("--probe-config", c)]],
                               capture_output=True, text=True, timeout=1800, env={**os.environ,
                                                                                   "PYTHONPATH": str(ROOT)})
            if r.returncode:
                raise RuntimeError(f"probe failed: {r.stderr[-2000:]}")
            for config, seconds in json.loads(r.stdout.strip().splitlines()[-1]).items():
                out[(link, config)] = seconds
    finally:
        _sh("ip", "netns", "del", NETNS)
    return out


class _EchoHandler:
    """A server that answers every step with a fixed reply (what the real server would send back)."""

    def __init__(self, replies: dict[int, pb.StepReply]):
        self.replies = replies

    def handshake(self, req, peer: str = ""):
        return pb.HelloReply(protocol_version=1, session_id="0" * 32)

    def step(self, req, peer: str = ""):
        return self.replies[req.step_id]


def probe(folder: Path, configs: list[str], reps: int) -> None:
    """Run inside the namespace: one process, gRPC server thread + client, median time of `reps` step calls."""
    from qtllava.wire.grpc_transport import ClientOptions, GrpcLink, ServerOptions, start_server

    replies, requests = {}, {}
    for i, config in enumerate(configs):
        req = pb.StepRequest.FromString((folder / f"{config}.req").read_bytes())
        req.step_id = i
        requests[config] = req
        reply = pb.StepReply.FromString((folder / f"{config}.reply").read_bytes())
        reply.step_id = i
        replies[i] = reply
    server, port = start_server(_EchoHandler(replies), ServerOptions(listen="127.0.0.1:0"))
    link = GrpcLink(ClientOptions(target=f"127.0.0.1:{port}"))
    out = {}
    try:
        link.handshake(pb.Hello())  # connection up before timing
        for config in configs:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                link.step(requests[config])
                times.append(time.perf_counter() - t0)
            out[config] = statistics.median(times)
    finally:
        link.shutdown()
        server.stop(0)
    print(json.dumps(out))


def link_rows(reps: int, work: Path) -> tuple[list[dict], dict, dict]:
    support = emulation_support()
    messages, shapes = {}, {}
    for config in CONFIGS:
        req, reply, shp = paper_messages(config)
        messages[config] = (req, reply)
        shapes[config] = shp
    measured, method = {}, "analytic"
    if support["netem"]:
        measured, method = measure_in_netns(messages, "netem", reps, work / "netem"), "netem"
    rate_only = measure_in_netns(messages, "tbf", reps, work / "tbf") if support["tbf"] else {}
    rows = []
    for link, rate, delay in LINKS:
        for config, (req, reply) in messages.items():
            up, down = req.ByteSize(), reply.ByteSize()
            model = analytic_seconds(up, down, rate, delay)
            row = {"link": link, "config": config, "bytes_up": up, "bytes_down": down,
                   "comm_s_per_step": measured.get((link, config), model), "method": method,
                   "analytic_s": model, "rate_bit_s": rate, "one_way_delay_s": delay,
                   "bits_per_element_up": shapes[config]["bits_per_element_up"],
                   "bits_per_element_down": shapes[config]["bits_per_element_down"]}
            if (link, config) in rate_only:
                row["measured_rate_only_s"] = rate_only[(link, config)]
                row["analytic_rate_only_s"] = analytic_seconds(up, down, rate, 0.0, 0)
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["link"] == row["link"] and r["config"] == "fp16")
        row["speedup_vs_fp16"] = base["comm_s_per_step"] / row["comm_s_per_step"]
    shape = {k: v for k, v in shapes["fp16"].items() if not k.startswith("bits")}
    return rows, support, shape


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'link':<16} {'config':<18} {'up MB':>8} {'down MB':>8} {'bits/el up':>10} {'down':>6} "
             f"{'comm s':>8} {'x fp16':>7} {'tbf s':>7}"]
    for r in rows:
        tbf = f"{r['measured_rate_only_s']:.3f}" if "measured_rate_only_s" in r else "-"
        lines.append(f"{r['link']:<16} {r['config']:<18} {r['bytes_up'] / 1e6:>8.2f} {r['bytes_down'] / 1e6:>8.2f} "
                     f"{r['bits_per_element_up']:>10.3f} {r['bits_per_element_down']:>6.2f} "
                     f"{r['comm_s_per_step']:>8.3f} {r['speedup_vs_fp16']:>7.2f} {tbf:>7}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", default="stage2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process (the machine is shared)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per message over an emulated link")
    p.add_argument("--out", default="results/split.json")
    p.add_argument("--skip-loopback", action="store_true")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-config", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        probe(Path(args.probe), args.probe_config, args.reps)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: dict = {"command": "python benchmarks/split.py " + " ".join(sys.argv[1:]),
                    "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "torch": torch.__version__}}
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        if not args.skip_loopback:
            lb = loopback_ratio(args.preset, args.stage, args.steps, args.warmup, args.threads, Path(tmp) / "lb")
            result["loopback"] = lb
            result["loopback_over_inprocess_step_ratio"] = lb["ratio"]
            print(f"{args.preset} {args.stage}: in-process {lb['inprocess_s_per_step']:.4f} s/step, split over "
                  f"loopback {lb['loopback_s_per_step']:.4f} s/step -> ratio {lb['ratio']:.3f}")
        rows, support, shape = link_rows(args.reps, Path(tmp) / "links")
    method = ("measured with tc netem in a network namespace" if support["netem"] else
              "analytic model (bytes_up + bytes_down) * 8 / rate + 2 * one_way_delay per step (1 round trip); "
              f"tc netem unavailable: {support['why']}")
    result["emulation"] = {**support, "method": method,
                           "measured_rate_only": "tc tbf on loopback in a network namespace (rate only, no delay)"
                           if support["tbf"] else "unavailable"}
    result["paper_shapes"] = shape
    result["links"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"communication per step, paper shapes ({method})")
    print(format_rows(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
