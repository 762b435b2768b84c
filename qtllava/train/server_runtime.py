"""The server side of a split training step: packets in, loss and compressed gradients out.

One `ServerRuntime` serves one stage for any number of client sessions. Every transport (in-process loopback,
gRPC) calls the same methods with the same parsed protobuf messages, so simulation and deployment share this code.

Several clients: the server model is shared; each session has its own step counter, its own gradient accumulation
(partial sums live with the session, never in the shared parameters' `.grad` between calls) and its own metrics.
Steps are applied in arrival order under one lock; step ids make retries idempotent. In the U-shaped cut a session
holds the server between its forward and its backward message (other sessions wait), because a stale graph cannot
be backpropagated once another session has moved the shared weights.

Checkpoints (Checkpoint RPC): `checkpoint_dir/<session>/step-NNNNNN`, written at the steps the client saves its own.
A client that resumes from step k (Hello.resume) makes the server roll back to its checkpoint of step k for that
session if it is ahead. A rollback restores the shared server model; the other sessions keep their counters, so with
several clients it is exact only if they resume together from the same checkpoint moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtllava.compress.base import Packet, PacketError
from qtllava.compress.grad import decode_grad, encode_grad, grad_codec_names, merge_rows
from qtllava.config import HASH_SECTIONS, Config, config_hash, to_dict
from qtllava.model.parts import IGNORE_INDEX, Layout, ServerPart
from qtllava.train.checkpoints import newest_intact, write_atomic
from qtllava.train.recipes import apply_trainable, codec_parameters, lr_at, make_optimizer, recipe, set_lr
from qtllava.train.ucut import check_cut, identity_head, predicting_mask
from qtllava.wire.messages import PROTOCOL_VERSION, WireError, bounded, ids_to_bytes, labels_from_wire, pb

__all__ = ["ServerRuntime", "SplitError", "describe_config_difference"]

log = logging.getLogger(__name__)

MAX_CONFIG_JSON = 1 << 16  # bytes of a handshake's configuration JSON the server reads
MAX_NAME = 64  # characters of a client name
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
STEP_FIELDS_UP = ("layout", "image", "text", "label_mask", "label_ids", "hidden_grad")
STEP_FIELDS_DOWN = ("image_grad", "text_grad", "hidden")
NO_GRADIENT = "none"  # compress.downlink_text: no text-row gradients go back (the client's embeddings stay fixed)


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
class _Pending:
    """U cut: the graph of a forward whose hidden-state gradient has not arrived yet."""

    key: tuple[int, int]
    image: torch.Tensor
    text: torch.Tensor
    rows: torch.Tensor  # (N, D) hidden rows that were sent


@dataclass
class Session:
    session_id: str
    name: str = ""
    next_step: int = 0  # first optimizer step not yet applied
    micro_done: int = 0  # micro-batches of `next_step` already accumulated
    grads: list | None = None  # this session's partial gradient sums over its micro-batches of `next_step`
    pending: _Pending | None = None
    last_reply: bytes = b""  # serialized reply of the last message, for idempotent retries
    last_key: tuple[int, int, int] = (-1, -1, -1)  # (step, micro, phase)
    acc: dict = field(default_factory=dict)  # metrics of `next_step` so far
    steps_applied: int = 0
    loss_sum: float = 0.0
    owner: str = ""  # the identity the transport authenticated when the session was opened ("" = none)
    closed: bool = False
    checkpointed_step: int = -1  # the step of this session's last checkpoint (one per step)
    final_written: bool = False
    turn_expired: bool = False  # U cut: its pending forward was dropped; it must resume before stepping again

    @property
    def identity(self) -> str:
        """Who the session's limits are counted for: the authenticated identity, else the name it gave."""
        return self.owner or self.name

    def reset_step(self) -> None:
        self.micro_done = 0
        self.grads = None
        self.pending = None
        self.acc = {}


class ServerRuntime:
    """Hosts a `ServerPart` for one training stage (or for generation only, with `stage=None`)."""

    def __init__(self, part: ServerPart, cfg: Config, stage: str | None = None, total_steps: int = 0,
                 checkpoint_dir: str | Path | None = None, generator_seed: int = 0, cut: str = "paper",
                 final_dir: str | Path | None = None, metrics_path: str | Path | None = None,
                 busy_timeout: float | None = None, max_generations_per_client: int | None = None,
                 generation_idle_seconds: float | None = None, max_turn_expiries: int | None = None):
        """Limits left at None come from `cfg.wire` (turn_seconds, max_generations_per_client,
        generation_idle_seconds, max_turn_expiries)."""
        self.part = part
        self.cfg = cfg
        self.stage = stage
        self.total_steps = total_steps
        self.cut = check_cut(cut)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.final_dir = Path(final_dir) if final_dir else (self.checkpoint_dir.parent / "final"
                                                            if self.checkpoint_dir else None)
        self.metrics_path = Path(metrics_path) if metrics_path else None
        w = cfg.wire

        def pick(value, default):
            return default if value is None else value

        self.busy_timeout = pick(busy_timeout, w.turn_seconds)
        self.max_generations_per_client = pick(max_generations_per_client, w.max_generations_per_client)
        self.generation_idle_seconds = pick(generation_idle_seconds, w.generation_idle_seconds)
        self.max_turn_expiries = pick(max_turn_expiries, w.max_turn_expiries)
        self._owner_since = 0.0
        self.turn_expiries: dict[str, int] = {}  # U cut: turns held past `busy_timeout`, by identity
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self._turn = threading.Condition(self.lock)
        self._owner: str | None = None  # U cut: session between its forward and backward message
        self.hash = config_hash(cfg, HASH_SECTIONS)
        for key in ("downlink", "downlink_text"):
            name = getattr(cfg.compress, key)
            if name and name not in grad_codec_names() and (key, name) != ("downlink_text", NO_GRADIENT):
                raise ValueError(f"compress.{key}: unknown gradient codec {name!r}; known: "
                                 f"{', '.join(grad_codec_names())}")
        self.optimizer = None
        self.stage_cfg = None
        if stage is not None:
            rec = recipe(cfg, stage)
            self.stage_cfg = getattr(cfg.train, stage)
            params = apply_trainable(part, rec.server_trainable, lora=rec.llm == "lora")
            if self.cut == "u":  # the client trains the LM head; the server's copy stays as it is
                head = part.llm.get_output_embeddings()
                head.requires_grad_(False)
            self.optimizer = make_optimizer(params, self.stage_cfg, codec_parameters(part))
            self.trainable = [p for p in params if p.requires_grad]
        else:
            part.requires_grad_(False)
            self.trainable = []
        self.generator = torch.Generator().manual_seed(generator_seed)  # stochastic rounding of gradients
        # the server's own stream for the default generator (dropout, e.g. LoRA's): the same whether the client's
        # work runs in this process or another, and saved with each checkpoint, so that resume stays exact
        self.rng_state = torch.Generator().manual_seed(generator_seed + 1).get_state()
        self.generations: dict[tuple[str, int], tuple] = {}
        self.applied_steps = 0
        self.refused: dict[str, int] = {}  # refused requests by reason (non_finite, ...)

    # --- handshake --------------------------------------------------------------------------------------------

    def handshake(self, req: pb.Hello, peer: str = "") -> pb.HelloReply:
        """Open or resume a session. `peer`: the identity the transport authenticated ("" where it does not);
        a session belongs to the identity that opened it, and `client_name` must be that identity."""
        if peer and req.client_name and req.client_name != peer:
            raise SplitError(f"client_name {bounded(req.client_name)} is not the authenticated client "
                             f"{bounded(peer)}", "PERMISSION_DENIED")
        if len(req.client_name) > MAX_NAME:
            raise SplitError(f"client_name longer than {MAX_NAME} characters", "INVALID_ARGUMENT")
        if len(req.config_json) > MAX_CONFIG_JSON:
            raise SplitError(f"configuration JSON of {len(req.config_json)} bytes (at most {MAX_CONFIG_JSON})",
                             "INVALID_ARGUMENT")
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
                except (json.JSONDecodeError, AttributeError, RecursionError):
                    diff = ["(client sent unreadable configuration JSON)"]
            raise SplitError("configuration hash differs from the server's: " + ("; ".join(diff) or "unknown keys"),
                             "FAILED_PRECONDITION")
        cut = req.cut or "paper"
        if cut != self.cut:
            raise SplitError(f"cut differs: server {self.cut!r}, client {cut!r}", "FAILED_PRECONDITION")
        if req.session_id and not _SESSION_ID.match(req.session_id):
            raise SplitError("session id must be 1-64 letters, digits, '-' or '_'", "INVALID_ARGUMENT")
        with self.lock:
            sid = req.session_id or uuid.uuid4().hex
            sess = self.sessions.get(sid)
            rolled_back = False
            if sess is None:
                sess = self.sessions[sid] = Session(session_id=sid, name=peer or req.client_name, owner=peer)
                log.info("new session %s (%s)", sid, sess.name)
            else:
                self._check_owner(sess, peer)
                if sess.closed:
                    raise SplitError(f"session {sid} is closed; open a new one", "FAILED_PRECONDITION")
            if req.resume:
                self._release(sid)
                sess.reset_step()
                sess.turn_expired = False
                sess.last_key, sess.last_reply = (-1, -1, -1), b""
                if req.resume_step < sess.next_step or (req.resume_step > 0 and sess.next_step == 0):
                    rolled_back = self._roll_back(sess, req.resume_step)
                    sess = self.sessions[sid]
                log.info("session %s (%s) resumes: client at step %d, server at step %d", sid, sess.name,
                         req.resume_step, sess.next_step)
            return pb.HelloReply(protocol_version=PROTOCOL_VERSION, session_id=sid, next_step=sess.next_step,
                                 server_config_hash=self.hash, rolled_back=rolled_back)

    def _roll_back(self, sess: Session, step: int) -> bool:
        """Restore this session's latest checkpoint at or below `step`; drop its later ones. -> restored?

        The server model is shared: it is rolled back only when no other open session has steps applied to it
        (server-side policy; one client alone never rolls back what others trained)."""
        others = [s for s in self.sessions.values() if s.session_id != sess.session_id and not s.closed
                  and s.next_step > 0]
        if others:
            raise SplitError(f"session {sess.session_id} asks to roll the shared model back to step {step}, but "
                             f"{len(others)} other open session(s) trained it since; the server does not roll back "
                             "(restart all clients with --resume together)", "FAILED_PRECONDITION")
        ck = self._session_checkpoint(sess.session_id, step)
        if ck is None:
            log.warning("session %s: no checkpoint at or below step %d; staying at step %d", sess.session_id, step,
                        sess.next_step)
            return False
        self.load(ck, session=sess.session_id)
        sess = self.sessions[sess.session_id]
        for d in self._session_checkpoints(sess.session_id):
            if _step_of(d) > _step_of(ck):
                shutil.rmtree(d, ignore_errors=True)  # an abandoned future; `--resume` must never pick it
        self._log_event({"event": "rollback", "session": sess.session_id, "client": sess.name,
                         "to_step": sess.next_step})
        log.warning("session %s rolled back to step %d (%s)", sess.session_id, sess.next_step, ck)
        return True

    def _session(self, sid: str, peer: str = "", open_only: bool = True) -> Session:
        """The session `sid`, if `peer` owns it (PERMISSION_DENIED otherwise) and it is open."""
        if sid not in self.sessions:
            raise SplitError(f"unknown session {bounded(sid)}: call Handshake first", "FAILED_PRECONDITION")
        sess = self.sessions[sid]
        self._check_owner(sess, peer)
        if open_only and sess.closed:
            raise SplitError(f"session {sid} is closed", "FAILED_PRECONDITION")
        return sess

    @staticmethod
    def _check_owner(sess: Session, peer: str) -> None:
        if sess.owner != peer:
            raise SplitError(f"session {sess.session_id} belongs to another client", "PERMISSION_DENIED")

    def _count(self, reason: str) -> None:
        """Count a refusal by reason (reported in `state()`)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _refuse(self, reason: str, error: SplitError) -> SplitError:
        """Count a refusal by reason and hand the error back to raise."""
        self._count(reason)
        return error

    # --- training ---------------------------------------------------------------------------------------------

    def _values(self, data: bytes, codec, what: str, rows: int | None = None) -> torch.Tensor:
        """Decode one modality's packet; with `rows`, its shape is checked against the layout before any decoding
        (a small packet may claim a huge shape). Non-finite values are refused."""
        try:
            packet = Packet.from_bytes(data)
            width = getattr(codec, "d_code", None) or self.part.hidden_size
            if rows is not None and (len(packet.shape) != 2 or packet.shape[0] != rows or packet.shape[1] > 2 * width):
                raise PacketError(f"shape {tuple(packet.shape)[:4]} does not fit the layout's {rows} rows of width "
                                  f"{width}")
            values = codec.dequantize(packet)
        except (PacketError, ValueError, RuntimeError, KeyError) as e:
            raise SplitError(f"{what} packet: {e}", "INVALID_ARGUMENT") from e
        if not bool(torch.isfinite(values).all()):
            raise self._refuse("non_finite", SplitError(
                f"{what} packet: {int((~torch.isfinite(values)).sum())} non-finite values (NaN or infinity)",
                "INVALID_ARGUMENT"))
        return values

    def _wait_turn(self, sid: str) -> None:
        """U cut: wait (lock released) while another session is between its forward and backward message.

        A session that keeps the turn longer than `busy_timeout` from when it took it (its client died, or it never
        sends its backward) loses its pending forward and must resume before it steps again; an identity that does
        so `max_turn_expiries` times is refused U-cut forwards from then on. The time is counted from when the
        owner took the turn, so waiting sessions never take it from one another."""
        while self._owner not in (None, sid):
            left = self._owner_since + self.busy_timeout - time.monotonic()
            if left <= 0:
                stale = self.sessions.get(self._owner)
                log.warning("session %s held the U-cut turn for %.1f s; dropping its pending forward", self._owner,
                            self.busy_timeout)
                if stale is not None:  # its forward's reply is not replayed either: that graph is gone
                    stale.pending = None
                    stale.turn_expired = True
                    stale.last_key, stale.last_reply = (-1, -1, -1), b""
                    self.turn_expiries[stale.identity] = self.turn_expiries.get(stale.identity, 0) + 1
                self._count("turn_expired")
                self._release(self._owner)
                break
            self._turn.wait(left)

    def _take_turn(self, sess: Session) -> None:
        self._owner = sess.session_id
        self._owner_since = time.monotonic()

    def _release(self, sid: str) -> None:
        if self._owner == sid:
            self._owner = None
            self._turn.notify_all()

    def step(self, req: pb.StepRequest, peer: str = "") -> pb.StepReply:
        if self.stage is None:
            raise SplitError("this server was started for generation only", "FAILED_PRECONDITION")
        if req.stage != self.stage:
            raise SplitError(f"step for {req.stage!r}, but this server runs {self.stage!r}", "FAILED_PRECONDITION")
        backward = self.cut == "u" and len(req.hidden_grad) > 0
        if req.hidden_grad and self.cut != "u":
            raise SplitError("hidden-state gradients belong to the U-shaped cut; this server runs the paper cut",
                             "INVALID_ARGUMENT")
        if not backward:  # a U-cut backward message carries the pending forward's gradient only
            self._check_size(req.batch, req.seq_len)
        with self.lock:
            sess = self._session(req.session_id, peer)
            key = (req.step_id, req.micro_index, int(backward))
            if key == sess.last_key:
                reply = pb.StepReply.FromString(sess.last_reply)
                reply.replayed = True
                return reply
            if self.cut == "u":
                if not backward and sess.turn_expired:
                    raise SplitError(f"session {sess.session_id} lost the U-cut turn after {self.busy_timeout:.0f} s "
                                     "without its backward; reconnect with resume", "FAILED_PRECONDITION")
                if not backward and self.turn_expiries.get(sess.identity, 0) >= self.max_turn_expiries:
                    raise self._refuse("turn_expired", SplitError(
                        f"client {bounded(sess.identity)} held the U-cut turn past {self.busy_timeout:.0f} s "
                        f"{self.max_turn_expiries} times; its forwards are refused", "RESOURCE_EXHAUSTED"))
                self._wait_turn(sess.session_id)
                sess = self._session(req.session_id, peer)
            if backward:
                if sess.pending is None or sess.pending.key != key[:2]:
                    raise SplitError(f"out of order: hidden-state gradient for step {req.step_id} micro "
                                     f"{req.micro_index} without its forward", "FAILED_PRECONDITION")
            elif req.step_id != sess.next_step or req.micro_index != sess.micro_done or sess.pending is not None:
                raise SplitError(f"out of order: got step {req.step_id} micro {req.micro_index}, expected step "
                                 f"{sess.next_step} micro {sess.micro_done}", "FAILED_PRECONDITION")
            if req.micro_count < 1 or req.micro_index >= req.micro_count:
                raise SplitError(f"micro_index {req.micro_index} not below micro_count {req.micro_count}",
                                 "INVALID_ARGUMENT")
            t0 = time.perf_counter()
            with self._own_rng():
                if self.cut == "paper":
                    reply = self._train_micro(req, sess)
                elif not backward:
                    reply = self._forward_u(req, sess)
                    self._take_turn(sess)
                else:
                    try:
                        reply = self._backward_u(req, sess)
                    finally:
                        self._release(sess.session_id)
            self._account(sess, req, reply, time.perf_counter() - t0)
            if self.cut == "paper" or backward:
                sess.micro_done += 1
                if req.micro_index + 1 == req.micro_count:
                    self._apply(sess, req.step_id, req.total_steps or self.total_steps)
                    reply.applied = True
            sess.last_key = key
            sess.last_reply = reply.SerializeToString()
            return reply

    @contextlib.contextmanager
    def _own_rng(self):
        """Run a step's forward and backward on the server's own random stream (`rng_state`; the CPU generator:
        on an accelerator, dropout draws from that device's generator instead)."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            try:
                yield
            finally:
                self.rng_state = torch.get_rng_state()

    def _check_size(self, batch: int, seq_len: int) -> None:
        """Refuse, before anything is decoded, a batch longer than the model's positions or larger than
        `wire.max_tokens_per_step` positions."""
        positions = int(getattr(self.part.llm.config, "max_position_embeddings", 0) or 0)
        if batch < 1 or seq_len < 1 or (positions and seq_len > positions):
            raise SplitError(f"batch {batch} x {seq_len} positions: need at least one sequence of 1 to {positions} "
                             "positions", "INVALID_ARGUMENT")
        if batch * seq_len > self.cfg.wire.max_tokens_per_step:
            raise SplitError(f"batch {batch} x {seq_len} positions exceeds wire.max_tokens_per_step "
                             f"({self.cfg.wire.max_tokens_per_step})", "RESOURCE_EXHAUSTED")

    def _inputs(self, req: pb.StepRequest) -> tuple[Layout, torch.Tensor, torch.Tensor]:
        try:
            layout = Layout.from_bytes(req.layout, (req.batch, req.seq_len))
        except ValueError as e:
            raise SplitError(f"step {req.step_id}: {e}", "INVALID_ARGUMENT") from e
        image = self._values(req.image, self.part.image_codec, "image", layout.n_image).requires_grad_(True)
        text = self._values(req.text, self.part.text_codec, "text", layout.n_text).requires_grad_(True)
        return layout, image, text

    def _backward(self, sess: Session, tensors: list[torch.Tensor], grads: list) -> None:
        """Backpropagate into this session's own gradient sums (the shared parameters' .grad stays empty). A
        non-finite loss or gradient is refused before it reaches the sums: the session's step starts over."""
        for t in tensors:
            if t.ndim == 0 and not bool(torch.isfinite(t)):
                sess.reset_step()
                raise self._refuse("non_finite", SplitError("the loss is not finite; the step is refused",
                                                            "INVALID_ARGUMENT"))
        # accumulate in place: a refused micro-batch discards the session's whole step, so its sums need no copy
        for i, p in enumerate(self.trainable):
            p.grad = sess.grads[i] if sess.grads is not None else None
        try:
            torch.autograd.backward(tensors, grads)
            new = [p.grad for p in self.trainable]
        finally:
            for p in self.trainable:
                p.grad = None
        if not all(g is None or bool(torch.isfinite(g).all()) for g in new):
            sess.reset_step()
            raise self._refuse("non_finite", SplitError("the gradient is not finite; the step is refused",
                                                        "INVALID_ARGUMENT"))
        sess.grads = new

    def _grad_packets(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, bytes]:
        sr = self.cfg.compress.stochastic_rounding
        grads = {}
        for name, v in (("image", image), ("text", text)):
            codec = self._downlink(name)
            if codec == NO_GRADIENT:  # the client trains nothing behind these rows: nothing is sent
                grads[name] = b""
                continue
            g = v.grad if v.grad is not None else torch.zeros_like(v)
            if name == "text" and self.cfg.compress.merge_text_rows:
                g = merge_rows(g, v)
            grads[name] = encode_grad(g, codec, stochastic=sr, generator=self.generator).to_bytes()
        return grads

    def _train_micro(self, req: pb.StepRequest, sess: Session) -> pb.StepReply:
        layout, image, text = self._inputs(req)
        try:
            labels = labels_from_wire(req.label_mask, req.label_ids, req.label_width, (req.batch, req.seq_len))
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.part.vocab_size))
            if bool(bad.any()):
                raise SplitError(f"step {req.step_id}: {int(bad.sum())} label ids outside the vocabulary "
                                 f"(0..{self.part.vocab_size - 1})", "INVALID_ARGUMENT")
            out = self.part(image, text, layout, labels=labels, loss_average=self.cfg.train.loss_average)
        except (ValueError, WireError, RuntimeError) as e:
            raise SplitError(f"step {req.step_id}: {e}", "INVALID_ARGUMENT") from e
        loss = out.loss
        self._backward(sess, [loss / req.micro_count], [None])
        grads = self._grad_packets(image, text)
        return pb.StepReply(step_id=req.step_id, micro_index=req.micro_index, loss=float(loss.detach()),
                            n_label_tokens=int(out.n_tokens), image_grad=grads["image"], text_grad=grads["text"])

    def _forward_u(self, req: pb.StepRequest, sess: Session) -> pb.StepReply:
        if req.label_mask or req.label_ids:
            raise SplitError("labels must not be sent in the U-shaped cut", "INVALID_ARGUMENT")
        layout, image, text = self._inputs(req)
        try:
            embeds = self.part.assemble(image, text, layout)
            lay = layout.to(embeds.device)
            hidden = self.part.llm.model(inputs_embeds=embeds, attention_mask=lay.attention_mask,
                                         position_ids=lay.position_ids).last_hidden_state
        except (ValueError, RuntimeError) as e:
            raise SplitError(f"step {req.step_id}: {e}", "INVALID_ARGUMENT") from e
        rows = hidden[:, :-1][predicting_mask(lay)]
        sess.pending = _Pending(key=(req.step_id, req.micro_index), image=image, text=text, rows=rows)
        packet = encode_grad(rows.detach(), self._downlink())
        return pb.StepReply(step_id=req.step_id, micro_index=req.micro_index, hidden=packet.to_bytes())

    def _backward_u(self, req: pb.StepRequest, sess: Session) -> pb.StepReply:
        pending, sess.pending = sess.pending, None
        try:
            packet = Packet.from_bytes(req.hidden_grad)
            if tuple(packet.shape) != tuple(pending.rows.shape):  # before decoding: a shape may claim gigabytes
                raise PacketError(f"shape {tuple(packet.shape)[:4]} for {tuple(pending.rows.shape)} rows")
            g = decode_grad(packet)
        except (PacketError, ValueError) as e:
            raise SplitError(f"hidden-state gradient packet: {e}", "INVALID_ARGUMENT") from e
        if not bool(torch.isfinite(g).all()):
            raise self._refuse("non_finite", SplitError("hidden-state gradient: non-finite values",
                                                        "INVALID_ARGUMENT"))
        self._backward(sess, [pending.rows], [g.to(pending.rows.dtype)])
        grads = self._grad_packets(pending.image, pending.text)
        return pb.StepReply(step_id=req.step_id, micro_index=req.micro_index, image_grad=grads["image"],
                            text_grad=grads["text"])

    def _downlink(self, modality: str = "") -> str:
        """The gradient codec of `modality`'s rows ("text": `downlink_text` where set); "" = the U cut's hidden
        states."""
        if not (self.stage is None or recipe(self.cfg, self.stage).compressed):
            return "fp32"
        c = self.cfg.compress
        return c.downlink_text or c.downlink if modality == "text" else c.downlink

    def _apply(self, sess: Session, step_id: int, total_steps: int) -> None:
        if self.optimizer is not None:
            for i, p in enumerate(self.trainable):
                p.grad = sess.grads[i] if sess.grads is not None else None
            if self.stage_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.stage_cfg.max_grad_norm)
            lr = lr_at(self.stage_cfg, step_id, total_steps)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.applied_steps += 1
        sess.steps_applied += 1
        row = {"session": sess.session_id, "client": sess.name, "step": step_id, **sess.acc}
        sess.loss_sum += row.get("loss", 0.0)
        sess.next_step += 1
        sess.reset_step()
        self._log_event(row)

    def _account(self, sess: Session, req: pb.StepRequest, reply: pb.StepReply, seconds: float) -> None:
        """Per-session, per-step sums of message and field sizes as received and sent (serialized bytes)."""
        a = sess.acc
        if not a:
            a.update(loss=0.0, n_label_tokens=0, messages=0, bytes_up=0, bytes_down=0, seconds=0.0,
                     fields_up={k: 0 for k in STEP_FIELDS_UP}, fields_down={k: 0 for k in STEP_FIELDS_DOWN})
        a["messages"] += 1
        a["bytes_up"] += req.ByteSize()
        a["bytes_down"] += reply.ByteSize()
        a["seconds"] += seconds
        for k in STEP_FIELDS_UP:
            a["fields_up"][k] += len(getattr(req, k))
        for k in STEP_FIELDS_DOWN:
            a["fields_down"][k] += len(getattr(reply, k))
        if self.cut == "paper":
            a["loss"] += reply.loss / req.micro_count
            a["n_label_tokens"] += reply.n_label_tokens

    def _log_event(self, row: dict) -> None:
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    # --- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, req: pb.GenerateRequest, peer: str = "") -> pb.GenerateReply:
        """One round of batched greedy generation. Served only by a server started for generation (no stage): a
        training server's weights move under its clients. Each identity may keep `max_generations_per_client`
        generations open; one idle for `generation_idle_seconds` is dropped with its cache."""
        if self.stage is not None:
            raise SplitError(f"this server trains {self.stage}; generation is served by a server started for it "
                             "(qtllava serve --stage none --init FOLDER)", "FAILED_PRECONDITION")
        with self.lock:
            sess = self._session(req.session_id, peer)
            key = (req.session_id, req.generation_id)
            self._drop_idle_generations()
            if req.close:
                self.generations.pop(key, None)
                return pb.GenerateReply(generation_id=req.generation_id, round=req.round)
            if req.round == 0 and key not in self.generations and sum(
                    1 for sid, _ in self.generations if self.sessions[sid].identity == sess.identity
            ) >= self.max_generations_per_client:
                raise self._refuse("open_generations", SplitError(
                    f"client {bounded(sess.identity)} has {self.max_generations_per_client} generations open; close one "
                    "(GenerateRequest.close) first", "RESOURCE_EXHAUSTED"))
            try:
                with identity_head(self.part.llm) if self.cut == "u" else nullcontext():
                    if req.round == 0:  # rows are checked against the layout before anything is decoded
                        self._check_size(req.batch, req.seq_len)
                        layout = Layout.from_bytes(req.layout, (req.batch, req.seq_len))
                        text = self._values(req.text, self.part.text_codec, "text", layout.n_text)
                        image = self._values(req.image, self.part.image_codec, "image", layout.n_image)
                        logits, cache = self.part.prefill(image, text, layout)
                    else:
                        if key not in self.generations:
                            raise SplitError(f"generation {req.generation_id} has no prompt (round 0) on this "
                                             "server", "FAILED_PRECONDITION")
                        cache, layout, _ = self.generations[key]
                        # one new text row per sequence
                        text = self._values(req.text, self.part.text_codec, "text", layout.shape[0])
                        logits, cache = self.part.extend(text, cache, layout)
                        layout = layout.append_text()  # the next round's positions follow the new column
            except (ValueError, RuntimeError) as e:
                if isinstance(e, SplitError):
                    raise
                raise SplitError(f"generation {req.generation_id}: {e}", "INVALID_ARGUMENT") from e
            self.generations[key] = (cache, layout, time.monotonic())
            if self.cut == "u":  # "logits" are the last hidden states; the client applies its head
                return pb.GenerateReply(generation_id=req.generation_id, round=req.round,
                                        hidden=encode_grad(logits, self._downlink()).to_bytes())
            next_ids = logits.argmax(dim=-1)
            return pb.GenerateReply(generation_id=req.generation_id, round=req.round, next_ids=ids_to_bytes(next_ids))

    def _drop_idle_generations(self) -> None:
        now = time.monotonic()
        for key in [k for k, v in self.generations.items() if now - v[2] > self.generation_idle_seconds]:
            del self.generations[key]
            log.info("generation %s of session %s idle for %.0f s: dropped", key[1], key[0],
                     self.generation_idle_seconds)

    # --- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint(self, req: pb.CheckpointRequest, peer: str = "") -> pb.CheckpointReply:
        """Save at the session's step boundary: `<checkpoint_dir>/<session>/step-NNNNNN`, or `final_dir` for
        tag "final". Refused (FAILED_PRECONDITION) when the client's step differs from the session's.

        Server-side policy: one checkpoint per session and step (asking again returns the one written); the final
        folder only once a session has applied the stage's steps, and once per session."""
        if req.tag not in ("", "final"):
            raise SplitError(f"checkpoint tag must be empty or 'final', got {req.tag!r}", "INVALID_ARGUMENT")
        with self.lock:
            sess = self._session(req.session_id, peer)
            if self.checkpoint_dir is None:
                raise SplitError("this server has no checkpoint directory", "FAILED_PRECONDITION")
            if req.step_id != sess.next_step or sess.micro_done or sess.pending is not None:
                raise SplitError(f"checkpoint at step {req.step_id}, but session is at step {sess.next_step} "
                                 f"micro {sess.micro_done}", "FAILED_PRECONDITION")
            if req.tag == "final":
                if self.total_steps and sess.next_step < self.total_steps:
                    raise SplitError(f"the final folder is written after the stage's {self.total_steps} steps; "
                                     f"session {sess.session_id} is at step {sess.next_step}", "FAILED_PRECONDITION")
                target = self.final_dir
                if not sess.final_written:
                    self._save_atomic(target)
                    sess.final_written = True
            else:
                target = self.checkpoint_dir / sess.session_id / f"step-{sess.next_step:06d}"
                if sess.checkpointed_step != sess.next_step or not (target / "DONE").exists():
                    self._save_atomic(target)
                    sess.checkpointed_step = sess.next_step
            # the reply names the checkpoint, not where the server keeps its files
            return pb.CheckpointReply(path=target.name if req.tag else f"{sess.session_id}/{target.name}",
                                      step_id=sess.next_step)

    def close(self, req: pb.Goodbye, peer: str = "") -> pb.GoodbyeReply:
        """End a session: it refuses steps from now on (its checkpoints stay for a later `--resume` of the server)."""
        with self.lock:
            sess = self.sessions.get(req.session_id)
            if sess is not None:
                self._check_owner(sess, peer)
                self._release(sess.session_id)
                sess.reset_step()
                sess.closed = True
                for key in [k for k in self.generations if k[0] == sess.session_id]:
                    del self.generations[key]
            return pb.GoodbyeReply(steps_applied=sess.next_step if sess else 0)

    def state(self) -> dict:
        return {
            "stage": self.stage,
            "cut": self.cut,
            "applied_steps": self.applied_steps,
            "saved_ns": time.time_ns(),
            "refused": dict(self.refused),
            "sessions": {s.session_id: {"name": s.name, "next_step": s.next_step, "steps_applied": s.steps_applied,
                                        "mean_loss": s.loss_sum / max(1, s.steps_applied), "owner": s.owner,
                                        "closed": s.closed}
                         for s in self.sessions.values()},
        }

    def save(self, path: str | Path) -> Path:
        """Weights (safetensors), optimizer and session state; `load` continues exactly from here."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.part.save_pretrained(path / "server")
        torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                    "generator": self.generator.get_state(), "rng": self.rng_state}, path / "server_optim.pt")
        (path / "server_state.json").write_text(json.dumps(self.state(), indent=2))
        return path

    def _save_atomic(self, final: Path) -> Path:
        """Write to a temporary folder with a manifest and rename (`checkpoints.write_atomic`)."""
        return write_atomic(final, self.save)

    def load(self, path: str | Path, session: str | None = None) -> None:
        """Restore weights, optimizer and RNG from `path`; all sessions (session=None) or only the named one."""
        path = Path(path)
        loaded = ServerPart.from_pretrained(path / "server")
        self.part.load_state_dict(loaded.state_dict())
        blob = torch.load(path / "server_optim.pt", weights_only=True)
        if self.optimizer is not None and blob["optimizer"] is not None:
            self.optimizer.load_state_dict(blob["optimizer"])
        self.generator.set_state(blob["generator"])
        if "rng" in blob:  # checkpoints written before the server had its own stream lack it
            self.rng_state = blob["rng"]
        state = json.loads((path / "server_state.json").read_text())
        saved = {sid: Session(session_id=sid, name=s["name"], next_step=s["next_step"],
                              steps_applied=s.get("steps_applied", 0), owner=s.get("owner", ""),
                              closed=s.get("closed", False),
                              loss_sum=s.get("mean_loss", 0.0) * s.get("steps_applied", 0))
                 for sid, s in state["sessions"].items()}
        if session is None:
            self.applied_steps = state["applied_steps"]
            self.sessions = saved
            self._owner = None
        elif session in saved:
            self.sessions[session] = saved[session]

    # --- checkpoint files -------------------------------------------------------------------------------------

    def _session_checkpoints(self, sid: str) -> list[Path]:
        if self.checkpoint_dir is None:
            return []
        folder = self.checkpoint_dir / sid
        found = [d for d in folder.glob("step-*") if _STEP_DIR.match(d.name) and (d / "DONE").exists()]
        return sorted(found, key=_step_of)

    def _session_checkpoint(self, sid: str, step: int) -> Path | None:
        """This session's newest intact checkpoint at or below `step`."""
        return newest_intact([d for d in self._session_checkpoints(sid) if _step_of(d) <= step], key=_step_of)

    def latest_checkpoint(self) -> Path | None:
        """The most recently written session checkpoint (what `--resume` of a restarted server loads)."""
        if self.checkpoint_dir is None:
            return None
        found = [d for d in self.checkpoint_dir.glob("*/step-*") if _STEP_DIR.match(d.name)
                 and (d / "DONE").exists()]

        def saved_at(d: Path) -> int:
            try:
                return int(json.loads((d / "server_state.json").read_text()).get("saved_ns", 0))
            except (OSError, ValueError):
                return -1  # unreadable: the manifest check names the file

        return newest_intact(found, key=saved_at)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))
