"""The client side of a split step: data in, packets out, gradients back, optimizer step.

`ClientRuntime.train_step` is the one step function: simulation and deployment differ only in the `link` (an
in-process `LoopbackLink` or a gRPC link); the client code, codecs and server code are the same. With the U-shaped
cut (`cut="u"`) the client also holds the LM head and the loss: labels never leave it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from qtllava.compress.base import Packet, PacketError, nbytes
from qtllava.compress.grad import decode_grad, encode_grad, spread_rows
from qtllava.config import HASH_SECTIONS, Config, config_hash, to_dict
from qtllava.model.parts import ClientPart
from qtllava.train.recipes import apply_trainable, codec_parameters, lr_at, make_optimizer, recipe, set_lr
from qtllava.train.server_runtime import NO_GRADIENT
from qtllava.train.ucut import HEAD_FOLDER, ClientHead, check_cut, head_loss
from qtllava.wire.messages import PROTOCOL_VERSION, WireError, ids_from_bytes, labels_to_wire, pb

__all__ = ["ClientRuntime", "StepStats", "make_hello"]

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one optimizer step cost and achieved (bytes are serialized message sizes; payload = packets only)."""

    step: int
    loss: float
    aux_loss: float
    lr: float
    samples: int
    seconds: float
    bytes_up: int
    bytes_down: int
    payload_up: dict[str, int]  # bytes of each request field, summed over the step's messages
    payload_down: dict[str, int]  # bytes of each reply field
    elements_up: dict[str, int]
    messages_up: list[int]  # serialized size of every request of the step, in order
    messages_down: list[int]  # serialized size of every reply

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bits_per_element_up"] = {k: 8 * self.payload_up[k] / max(1, n) for k, n in self.elements_up.items()}
        d["bits_per_element_down"] = {k: 8 * self.payload_down[k] / max(1, n) for k, n in self.elements_up.items()}
        d["samples_per_s"] = self.samples / max(self.seconds, 1e-9)
        return d


def _byte_size(msg) -> int:
    return msg.ByteSize()


def make_hello(cfg: Config, name: str = "client", session_id: str = "", cut: str = "paper",
               resume_step: int | None = None) -> pb.Hello:
    """The handshake a client with configuration `cfg` sends (hash and JSON of the sections both sides share)."""
    cfg_dict = {k: v for k, v in to_dict(cfg).items() if k in HASH_SECTIONS}
    return pb.Hello(protocol_version=PROTOCOL_VERSION, config_hash=config_hash(cfg, HASH_SECTIONS),
                    config_json=json.dumps(cfg_dict, sort_keys=True), session_id=session_id, client_name=name,
                    cut=cut, resume=resume_step is not None, resume_step=resume_step or 0)


def _reply_tensor(data: bytes, numel: int | None, what: str, at_most: int | None = None) -> torch.Tensor:
    """A tensor from the server's reply, refused (WireError) when malformed, of another size than `numel` or more
    elements than `at_most` (both checked before decoding), or not finite: a hostile or broken server must not
    reach the client's weights."""
    try:
        packet = Packet.from_bytes(data)
        if numel is not None and packet.numel != numel:
            raise WireError(f"{packet.numel} elements for {numel}")
        if at_most is not None and packet.numel > at_most:
            raise WireError(f"{packet.numel} elements, at most {at_most} expected")
        t = decode_grad(packet)
    except (PacketError, ValueError) as e:
        raise WireError(f"the server's {what} is malformed: {e}") from e
    if not bool(torch.isfinite(t).all()):
        raise WireError(f"the server's {what} holds non-finite values; refused")
    return t


class ClientRuntime:
    """Holds a `ClientPart` and its optimizer; talks to a server through `link`."""

    def __init__(self, part: ClientPart, cfg: Config, link, stage: str | None = None, total_steps: int = 0,
                 name: str = "client", vocab_size: int = 0, cut: str = "paper", head: ClientHead | None = None):
        self.part = part
        self.cut = check_cut(cut)
        if cut == "u" and head is None:
            raise ValueError("the U-shaped cut needs the LM head on the client (head=ClientHead)")
        self.head = head if cut == "u" else None
        self.cfg = cfg
        self.link = link
        self.stage = stage
        self.total_steps = total_steps
        self.name = name
        self.vocab_size = vocab_size or part.embed_tokens.num_embeddings
        self.session_id = ""
        self.step_id = 0
        self.optimizer = None
        self.trainable: list[torch.nn.Parameter] = []
        if stage is not None:
            rec = recipe(cfg, stage)
            self.stage_cfg = getattr(cfg.train, stage)
            self.trainable = [p for p in apply_trainable(part, rec.client_trainable) if p.requires_grad]
            if self.head is not None:  # the head trains where the server's LLM would
                self.head.requires_grad_("llm" in rec.server_trainable)
                self.trainable += [p for p in self.head.parameters() if p.requires_grad]
            self.optimizer = make_optimizer(self.trainable, self.stage_cfg, codec_parameters(part))
        else:
            part.requires_grad_(False)
            if self.head is not None:
                self.head.requires_grad_(False)
        self.rolled_back = False
        self._generation = 0

    # --- session ----------------------------------------------------------------------------------------------

    def connect(self, session_id: str = "", resume_step: int | None = None) -> int:
        """Handshake; returns the server's next step for this session (resume point).

        resume_step: this client restarts from its checkpoint of that step; a server that is ahead rolls back to
        its own checkpoint at or below it (the reply's next step says where it landed).
        """
        reply = self.link.handshake(make_hello(self.cfg, self.name, session_id or self.session_id, self.cut,
                                               resume_step))
        self.session_id = reply.session_id
        self.rolled_back = reply.rolled_back
        return reply.next_step

    def zero_grad(self) -> None:
        """Drop partial gradients (e.g. of a step the server refused before a rollback)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.trainable:
            p.grad = None

    # --- training ---------------------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict]) -> StepStats:
        """One optimizer step over `micro_batches` (gradient accumulation); returns what it cost."""
        if self.optimizer is None and self.stage is None:
            raise RuntimeError("this client was built for evaluation only")
        t0 = time.perf_counter()
        count = len(micro_batches)
        losses, aux_total, samples = [], 0.0, 0
        payload_up = {"image": 0, "text": 0, "labels": 0, "layout": 0, "hidden_grad": 0}
        payload_down = {"image": 0, "text": 0, "hidden": 0}
        elements = {"image": 0, "text": 0}
        sizes_up: list[int] = []
        sizes_down: list[int] = []

        def send(req):
            sizes_up.append(_byte_size(req))
            reply = self.link.step(req)
            sizes_down.append(_byte_size(reply))
            return reply

        for k, batch in enumerate(micro_batches):
            out = self.part(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
            layout_bytes = out.layout.to_bytes()
            req = pb.StepRequest(
                session_id=self.session_id, step_id=self.step_id, micro_index=k, micro_count=count,
                stage=self.stage, batch=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1],
                layout=layout_bytes, image=out.image.packet.to_bytes(), text=out.text.packet.to_bytes(),
                total_steps=self.total_steps)
            if self.cut == "paper":
                mask, ids, width = labels_to_wire(batch["labels"], self.vocab_size)
                req.label_mask, req.label_ids, req.label_width = mask, ids, width
                reply = send(req)
                losses.append(reply.loss)
                payload_up["labels"] += len(mask) + len(ids)
            else:
                reply = send(req)  # -> the server's final hidden states at the predicting positions
                bsz, seq = batch["input_ids"].shape
                hidden = _reply_tensor(reply.hidden, None, "hidden states",
                                       at_most=bsz * seq * self.part.hidden_size).requires_grad_(True)
                payload_down["hidden"] += len(reply.hidden)
                loss, _ = head_loss(self.head, hidden, batch["labels"], out.layout, self.cfg.train.loss_average)
                (loss / count).backward()
                g = encode_grad(hidden.grad, self._downlink()).to_bytes()
                reply = send(pb.StepRequest(session_id=self.session_id, step_id=self.step_id, micro_index=k,
                                            micro_count=count, stage=self.stage, total_steps=self.total_steps,
                                            hidden_grad=g))
                losses.append(float(loss.detach()))
                payload_up["hidden_grad"] += len(g)
            if not math.isfinite(reply.loss):
                self.zero_grad()
                raise WireError(f"the server replied to step {self.step_id} with a non-finite loss; refused")
            try:
                g_img = _reply_tensor(reply.image_grad, out.image.values.numel(), "image-row gradient")
                g_txt = self._text_grad(reply.text_grad, out.text.values)
            except ValueError as e:  # WireError included
                self.zero_grad()  # nothing of this step reaches the weights
                raise e if isinstance(e, WireError) else WireError(f"the server's gradient reply: {e}") from e
            aux = out.image.aux_loss + out.text.aux_loss
            tensors, grads = [], []
            for v, g in ((out.image.values, g_img), (out.text.values, g_txt)):
                if v.requires_grad and g is not None:
                    tensors.append(v)
                    grads.append(g.to(v.dtype).reshape(v.shape))
            if aux.requires_grad:
                tensors.append(aux / count)
                grads.append(None)
            if tensors:
                torch.autograd.backward(tensors, grads)
            aux_total += float(aux.detach())
            samples += batch["input_ids"].shape[0]
            payload_up["image"] += nbytes(out.image.packet)
            payload_up["text"] += nbytes(out.text.packet)
            payload_up["layout"] += len(layout_bytes)
            payload_down["image"] += len(reply.image_grad)
            payload_down["text"] += len(reply.text_grad)
            elements["image"] += out.image.packet.numel
            elements["text"] += out.text.packet.numel
        up, down = sum(sizes_up), sum(sizes_down)
        lr = lr_at(self.stage_cfg, self.step_id, self.total_steps)
        if self.optimizer is not None:
            if self.stage_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.stage_cfg.max_grad_norm)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        stats = StepStats(step=self.step_id, loss=sum(losses) / count, aux_loss=aux_total / count, lr=lr,
                          samples=samples, seconds=time.perf_counter() - t0, bytes_up=up, bytes_down=down,
                          payload_up=payload_up, payload_down=payload_down, elements_up=elements,
                          messages_up=sizes_up, messages_down=sizes_down)
        self.step_id += 1
        return stats

    def _text_grad(self, data: bytes, values: torch.Tensor) -> torch.Tensor | None:
        """The gradient of the text rows `values` from a reply; None where `compress.downlink_text` is "none"
        (nothing is sent, so the token embeddings get no gradient and AdamW leaves them as they are). With
        `compress.merge_text_rows` the reply holds one summed row per distinct value, spread back here."""
        if self.cfg.compress.downlink_text == NO_GRADIENT:
            if data:
                raise WireError(f"{len(data)} bytes of text-row gradient, but compress.downlink_text is "
                                f"{NO_GRADIENT!r}")
            return None
        merged = self.cfg.compress.merge_text_rows
        g = _reply_tensor(data, None if merged else values.numel(), "text-row gradient", at_most=values.numel())
        return spread_rows(g, values) if merged else g

    def _downlink(self) -> str:
        """Tensor codec of hidden states and their gradients in the U cut (the stage's downlink codec)."""
        return self.cfg.compress.downlink

    # --- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, eos_token_id: int | Iterable[int]) -> list[list[int]]:
        """Batched greedy generation across the split; `batch` is left-padded. Returns new token ids per row.

        Generation of a row stops at any of the stop ids (`eos_token_id`: one id or several, e.g. the chat
        template's end-of-turn token and the tokenizer's eos); the stop id is not returned."""
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self._generation += 1
        gid = self._generation
        out = self.part(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
        bsz, seq = batch["input_ids"].shape
        reply = self.link.generate(pb.GenerateRequest(
            session_id=self.session_id, generation_id=gid, round=0, batch=bsz, seq_len=seq,
            layout=out.layout.to_bytes(), image=out.image.packet.to_bytes(), text=out.text.packet.to_bytes()))
        results: list[list[int]] = [[] for _ in range(bsz)]
        done = torch.zeros(bsz, dtype=torch.bool)
        try:
            for r in range(1, max_new_tokens + 1):
                next_ids = self._next_ids(reply, bsz)
                for i in range(bsz):
                    if not done[i]:
                        if int(next_ids[i]) in stops:
                            done[i] = True
                        else:
                            results[i].append(int(next_ids[i]))
                if bool(done.all()) or r == max_new_tokens:
                    break
                enc = self.part.embed_text_rows(next_ids)
                reply = self.link.generate(pb.GenerateRequest(
                    session_id=self.session_id, generation_id=gid, round=r, batch=bsz,
                    text=enc.packet.to_bytes()))
        finally:
            self.link.generate(pb.GenerateRequest(session_id=self.session_id, generation_id=gid, close=True))
        return results

    def _next_ids(self, reply: pb.GenerateReply, bsz: int) -> torch.Tensor:
        if self.cut == "paper":
            ids = ids_from_bytes(reply.next_ids, bsz)
            if bool(((ids < 0) | (ids >= self.vocab_size)).any()):
                raise WireError(f"the server's next token ids lie outside the vocabulary ({self.vocab_size})")
            return ids
        hidden = _reply_tensor(reply.hidden, bsz * self.part.hidden_size, "hidden states").reshape(bsz, -1)
        return self.head(hidden.to(self.head.lm_head.weight.dtype)).argmax(dim=-1)

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.part.save_pretrained(path / "client")
        if self.head is not None:
            self.head.save_pretrained(path / HEAD_FOLDER)
        torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                    "rng": torch.get_rng_state()}, path / "client_optim.pt")
        state = {"step_id": self.step_id, "session_id": self.session_id, "stage": self.stage, "cut": self.cut}
        state.update(extra or {})
        (path / "client_state.json").write_text(json.dumps(state, indent=2))
        return path

    def load(self, path: str | Path) -> dict:
        path = Path(path)
        loaded = ClientPart.from_pretrained(path / "client")
        self.part.load_state_dict(loaded.state_dict())
        if self.head is not None:
            self.head.load(path / HEAD_FOLDER)
        blob = torch.load(path / "client_optim.pt", weights_only=True)
        if self.optimizer is not None and blob["optimizer"] is not None:
            self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"])
        state = json.loads((path / "client_state.json").read_text())
        self.step_id = state["step_id"]
        self.session_id = state["session_id"]
        return state
