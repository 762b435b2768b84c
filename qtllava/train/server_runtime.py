"""The server side of a split training step: packets in, loss and compressed gradients out.

One `ServerRuntime` serves one stage for any number of client sessions. Every transport (in-process loopback,
gRPC) calls the same methods with the same parsed protobuf messages, so simulation and deployment share this code.
Steps are applied in arrival order under one lock; step ids make retries idempotent.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtllava.compress.base import Packet, PacketError
from qtllava.compress.grad import decode_grad, encode_grad
from qtllava.config import Config, config_hash, to_dict
from qtllava.model.parts import Layout, ServerPart
from qtllava.train.recipes import apply_trainable, lr_at, make_optimizer, recipe
from qtllava.wire.messages import (PROTOCOL_VERSION, WireError, ids_to_bytes, labels_from_wire, pb)

__all__ = ["ServerRuntime", "SplitError", "describe_config_difference"]

log = logging.getLogger(__name__)


class SplitError(RuntimeError):
    """A request the server refuses; `code` names the gRPC status the transport should return."""

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION"):
        super().__init__(message)
        self.code = code


def describe_config_difference(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_config_difference(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: server {a!r}, client {b!r}")
    return out


@dataclass
class Session:
    session_id: str
    name: str = ""
    next_step: int = 0  # first optimizer step not yet applied
    micro_done: int = 0  # micro-batches of `next_step` already accumulated
    last_reply: bytes = b""  # serialized reply of the last micro-batch, for idempotent retries
    last_key: tuple[int, int] = (-1, -1)
    losses: list[float] = field(default_factory=list)


HASH_SECTIONS = ("vision", "connector", "llm", "compress")


class ServerRuntime:
    """Hosts a `ServerPart` for one training stage (or for generation only, with `stage=None`)."""

    def __init__(self, part: ServerPart, cfg: Config, stage: str | None = None, total_steps: int = 0,
                 checkpoint_dir: str | Path | None = None, generator_seed: int = 0):
        self.part = part
        self.cfg = cfg
        self.stage = stage
        self.total_steps = total_steps
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.hash = config_hash(cfg, HASH_SECTIONS)
        self.optimizer = None
        self.stage_cfg = None
        if stage is not None:
            rec = recipe(stage)
            self.stage_cfg = getattr(cfg.train, stage)
            params = apply_trainable(part, rec.server_trainable)
            self.optimizer = make_optimizer(params, self.stage_cfg)
            self.trainable = [p for p in params if p.requires_grad]
        else:
            part.requires_grad_(False)
            self.trainable = []
        self.generator = torch.Generator().manual_seed(generator_seed)  # stochastic rounding of gradients
        self.generations: dict[tuple[str, int], tuple] = {}
        self.applied_steps = 0

    # --- handshake --------------------------------------------------------------------------------------------

    def handshake(self, req: pb.Hello) -> pb.HelloReply:
        if req.protocol_version != PROTOCOL_VERSION:
            raise SplitError(f"protocol version {req.protocol_version} not supported (server speaks "
                             f"{PROTOCOL_VERSION})", "FAILED_PRECONDITION")
        if req.config_hash != self.hash:
            diff = []
            if req.config_json:
                try:
                    theirs = json.loads(req.config_json)
                    ours = {k: v for k, v in to_dict(self.cfg).items() if k in HASH_SECTIONS}
                    diff = describe_config_difference(ours, theirs)
                except json.JSONDecodeError:
                    diff = ["(client sent unreadable configuration JSON)"]
            raise SplitError("configuration hash differs from the server's: " + ("; ".join(diff) or "unknown keys"),
                             "FAILED_PRECONDITION")
        with self.lock:
            sid = req.session_id or uuid.uuid4().hex
            sess = self.sessions.get(sid)
            if sess is None:
                sess = self.sessions[sid] = Session(session_id=sid, name=req.client_name)
                log.info("new session %s (%s)", sid, req.client_name)
            else:
                log.info("session %s resumes at step %d", sid, sess.next_step)
            return pb.HelloReply(protocol_version=PROTOCOL_VERSION, session_id=sid, next_step=sess.next_step,
                                 server_config_hash=self.hash)

    def _session(self, sid: str) -> Session:
        if sid not in self.sessions:
            raise SplitError(f"unknown session {sid!r}: call Handshake first", "UNAUTHENTICATED")
        return self.sessions[sid]

    # --- training ---------------------------------------------------------------------------------------------

    def _values(self, data: bytes, codec, what: str) -> torch.Tensor:
        try:
            packet = Packet.from_bytes(data)
            return codec.dequantize(packet)
        except PacketError as e:
            raise SplitError(f"{what} packet: {e}", "INVALID_ARGUMENT") from e

    def step(self, req: pb.StepRequest) -> pb.StepReply:
        if self.optimizer is None and self.stage is None:
            raise SplitError("this server was started for generation only", "FAILED_PRECONDITION")
        if req.stage != self.stage:
            raise SplitError(f"step for {req.stage!r}, but this server runs {self.stage!r}", "FAILED_PRECONDITION")
        with self.lock:
            sess = self._session(req.session_id)
            key = (req.step_id, req.micro_index)
            if key == sess.last_key:
                reply = pb.StepReply.FromString(sess.last_reply)
                reply.replayed = True
                return reply
            if req.step_id != sess.next_step or req.micro_index != sess.micro_done:
                raise SplitError(f"out of order: got step {req.step_id} micro {req.micro_index}, expected step "
                                 f"{sess.next_step} micro {sess.micro_done}", "FAILED_PRECONDITION")
            if req.micro_count < 1 or req.micro_index >= req.micro_count:
                raise SplitError(f"micro_index {req.micro_index} not below micro_count {req.micro_count}",
                                 "INVALID_ARGUMENT")
            reply = self._train_micro(req)
            sess.micro_done += 1
            if req.micro_index + 1 == req.micro_count:
                self._apply(req.step_id, req.total_steps or self.total_steps)
                sess.next_step += 1
                sess.micro_done = 0
                reply.applied = True
            sess.last_key = key
            sess.last_reply = reply.SerializeToString()
            return reply

    def _train_micro(self, req: pb.StepRequest) -> pb.StepReply:
        shape = (req.batch, req.seq_len)
        try:
            layout = Layout.from_bytes(req.layout, shape)
            labels = labels_from_wire(req.label_mask, req.label_ids, req.label_width, shape)
        except (ValueError, WireError) as e:
            raise SplitError(f"step {req.step_id}: {e}", "INVALID_ARGUMENT") from e
        image = self._values(req.image, self.part.image_codec, "image").requires_grad_(True)
        text = self._values(req.text, self.part.text_codec, "text").requires_grad_(True)
        try:
            out = self.part(image, text, layout, labels=labels)
        except ValueError as e:
            raise SplitError(f"step {req.step_id}: {e}", "INVALID_ARGUMENT") from e
        loss = out.loss
        (loss / req.micro_count).backward()
        down = self.cfg.compress.downlink if self._compressed() else "fp32"
        sr = self.cfg.compress.stochastic_rounding
        grads = {}
        for name, v in (("image", image), ("text", text)):
            g = v.grad if v.grad is not None else torch.zeros_like(v)
            grads[name] = encode_grad(g, down, stochastic=sr, generator=self.generator).to_bytes()
        return pb.StepReply(step_id=req.step_id, micro_index=req.micro_index, loss=float(loss.detach()),
                            n_label_tokens=int(out.n_tokens), image_grad=grads["image"], text_grad=grads["text"])

    def _compressed(self) -> bool:
        return self.stage is None or recipe(self.stage).compressed

    def _apply(self, step_id: int, total_steps: int) -> None:
        if self.optimizer is None:
            return
        if self.stage_cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.stage_cfg.max_grad_norm)
        lr = lr_at(self.stage_cfg, step_id, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.applied_steps += 1

    # --- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, req: pb.GenerateRequest) -> pb.GenerateReply:
        with self.lock:
            self._session(req.session_id)
            key = (req.session_id, req.generation_id)
            if req.close:
                self.generations.pop(key, None)
                return pb.GenerateReply(generation_id=req.generation_id, round=req.round)
            text = self._values(req.text, self.part.text_codec, "text")
            if req.round == 0:
                shape = (req.batch, req.seq_len)
                try:
                    layout = Layout.from_bytes(req.layout, shape)
                except ValueError as e:
                    raise SplitError(f"generation {req.generation_id}: {e}", "INVALID_ARGUMENT") from e
                image = self._values(req.image, self.part.image_codec, "image")
                logits, cache = self.part.prefill(image, text, layout)
                self.generations[key] = (cache, layout)
            else:
                if key not in self.generations:
                    raise SplitError(f"generation {req.generation_id} has no prompt (round 0) on this server",
                                     "FAILED_PRECONDITION")
                cache, layout = self.generations[key]
                logits, cache = self.part.extend(text, cache, layout)
                # The layout grows by one text column per round; keep it for the next round's positions.
                layout = layout.append_text() if hasattr(layout, "append_text") else layout
                self.generations[key] = (cache, layout)
            next_ids = logits.argmax(dim=-1)
            return pb.GenerateReply(generation_id=req.generation_id, round=req.round, next_ids=ids_to_bytes(next_ids))

    # --- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint(self, req: pb.CheckpointRequest) -> pb.CheckpointReply:
        with self.lock:
            sess = self._session(req.session_id)
            if self.checkpoint_dir is None:
                raise SplitError("this server has no checkpoint directory", "FAILED_PRECONDITION")
            path = self.save(self.checkpoint_dir / (req.tag or f"step-{sess.next_step:06d}"))
            return pb.CheckpointReply(path=str(path), step_id=sess.next_step)

    def close(self, req: pb.Goodbye) -> pb.GoodbyeReply:
        with self.lock:
            sess = self.sessions.get(req.session_id)
            return pb.GoodbyeReply(steps_applied=sess.next_step if sess else 0)

    def state(self) -> dict:
        return {
            "stage": self.stage,
            "applied_steps": self.applied_steps,
            "sessions": {s.session_id: {"name": s.name, "next_step": s.next_step} for s in self.sessions.values()},
        }

    def save(self, path: str | Path) -> Path:
        """Weights (safetensors), optimizer and session state; `load` continues exactly from here."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.part.save_pretrained(path / "server")
        torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                    "generator": self.generator.get_state()}, path / "server_optim.pt")
        (path / "server_state.json").write_text(json.dumps(self.state(), indent=2))
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path)
        loaded = ServerPart.from_pretrained(path / "server")
        self.part.load_state_dict(loaded.state_dict())
        blob = torch.load(path / "server_optim.pt", weights_only=True)
        if self.optimizer is not None and blob["optimizer"] is not None:
            self.optimizer.load_state_dict(blob["optimizer"])
        self.generator.set_state(blob["generator"])
        state = json.loads((path / "server_state.json").read_text())
        self.applied_steps = state["applied_steps"]
        self.sessions = {sid: Session(session_id=sid, name=s["name"], next_step=s["next_step"])
                         for sid, s in state["sessions"].items()}
