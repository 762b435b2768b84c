"""The client side of a split step: data in, packets out, gradients back, optimizer step.

`ClientRuntime.train_step` is the one step function: simulation and deployment differ only in the `link` (an
in-process `LoopbackLink` or a gRPC link); the client code, codecs and server code are the same.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qtllava.compress.base import Packet, nbytes
from qtllava.compress.grad import decode_grad
from qtllava.config import Config, config_hash, to_dict
from qtllava.model.parts import ClientPart
from qtllava.train.recipes import apply_trainable, lr_at, make_optimizer, recipe
from qtllava.train.server_runtime import HASH_SECTIONS
from qtllava.wire.messages import PROTOCOL_VERSION, ids_from_bytes, labels_to_wire, pb

__all__ = ["ClientRuntime", "StepStats"]

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
    payload_up: dict[str, int]
    payload_down: dict[str, int]
    elements_up: dict[str, int]

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bits_per_element_up"] = {k: 8 * self.payload_up[k] / max(1, n) for k, n in self.elements_up.items()}
        d["bits_per_element_down"] = {k: 8 * self.payload_down[k] / max(1, n) for k, n in self.elements_up.items()}
        d["samples_per_s"] = self.samples / max(self.seconds, 1e-9)
        return d


def _byte_size(msg) -> int:
    return msg.ByteSize()


class ClientRuntime:
    """Holds a `ClientPart` and its optimizer; talks to a server through `link`."""

    def __init__(self, part: ClientPart, cfg: Config, link, stage: str | None = None, total_steps: int = 0,
                 name: str = "client", vocab_size: int = 0):
        self.part = part
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
            rec = recipe(stage)
            self.stage_cfg = getattr(cfg.train, stage)
            self.trainable = [p for p in apply_trainable(part, rec.client_trainable) if p.requires_grad]
            self.optimizer = make_optimizer(self.trainable, self.stage_cfg)
        else:
            part.requires_grad_(False)
        self._generation = 0

    # --- session ----------------------------------------------------------------------------------------------

    def connect(self, session_id: str = "") -> int:
        """Handshake; returns the server's next step for this session (resume point)."""
        cfg_dict = {k: v for k, v in to_dict(self.cfg).items() if k in HASH_SECTIONS}
        reply = self.link.handshake(pb.Hello(
            protocol_version=PROTOCOL_VERSION, config_hash=config_hash(self.cfg, HASH_SECTIONS),
            config_json=json.dumps(cfg_dict, sort_keys=True), session_id=session_id or self.session_id,
            client_name=self.name, cut="paper"))
        self.session_id = reply.session_id
        return reply.next_step

    # --- training ---------------------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict]) -> StepStats:
        """One optimizer step over `micro_batches` (gradient accumulation); returns what it cost."""
        if self.optimizer is None and self.stage is None:
            raise RuntimeError("this client was built for evaluation only")
        t0 = time.perf_counter()
        count = len(micro_batches)
        losses, aux_total, samples = [], 0.0, 0
        up = down = 0
        payload_up = {"image": 0, "text": 0, "labels": 0, "layout": 0}
        payload_down = {"image": 0, "text": 0}
        elements = {"image": 0, "text": 0}
        for k, batch in enumerate(micro_batches):
            out = self.part(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
            mask, ids, width = labels_to_wire(batch["labels"], self.vocab_size)
            layout_bytes = out.layout.to_bytes()
            req = pb.StepRequest(
                session_id=self.session_id, step_id=self.step_id, micro_index=k, micro_count=count,
                stage=self.stage, batch=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1],
                layout=layout_bytes, image=out.image.packet.to_bytes(), text=out.text.packet.to_bytes(),
                label_mask=mask, label_ids=ids, label_width=width, total_steps=self.total_steps)
            up += _byte_size(req)
            reply = self.link.step(req)
            down += _byte_size(reply)
            g_img = decode_grad(Packet.from_bytes(reply.image_grad))
            g_txt = decode_grad(Packet.from_bytes(reply.text_grad))
            aux = out.image.aux_loss + out.text.aux_loss
            tensors, grads = [], []
            for v, g in ((out.image.values, g_img), (out.text.values, g_txt)):
                if v.requires_grad:
                    tensors.append(v)
                    grads.append(g.to(v.dtype).reshape(v.shape))
            if aux.requires_grad:
                tensors.append(aux / count)
                grads.append(None)
            if tensors:
                torch.autograd.backward(tensors, grads)
            losses.append(reply.loss)
            aux_total += float(aux.detach())
            samples += batch["input_ids"].shape[0]
            payload_up["image"] += nbytes(out.image.packet)
            payload_up["text"] += nbytes(out.text.packet)
            payload_up["labels"] += len(mask) + len(ids)
            payload_up["layout"] += len(layout_bytes)
            payload_down["image"] += len(reply.image_grad)
            payload_down["text"] += len(reply.text_grad)
            elements["image"] += out.image.packet.numel
            elements["text"] += out.text.packet.numel
        lr = lr_at(self.stage_cfg, self.step_id, self.total_steps)
        if self.optimizer is not None:
            if self.stage_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.stage_cfg.max_grad_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        stats = StepStats(step=self.step_id, loss=sum(losses) / count, aux_loss=aux_total / count, lr=lr,
                          samples=samples, seconds=time.perf_counter() - t0, bytes_up=up, bytes_down=down,
                          payload_up=payload_up, payload_down=payload_down, elements_up=elements)
        self.step_id += 1
        return stats

    # --- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
        """Batched greedy generation across the split; `batch` is left-padded. Returns new token ids per row."""
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
                next_ids = ids_from_bytes(reply.next_ids, bsz)
                for i in range(bsz):
                    if not done[i]:
                        if int(next_ids[i]) == eos_token_id:
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

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.part.save_pretrained(path / "client")
        torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                    "rng": torch.get_rng_state()}, path / "client_optim.pt")
        state = {"step_id": self.step_id, "session_id": self.session_id, "stage": self.stage}
        state.update(extra or {})
        (path / "client_state.json").write_text(json.dumps(state, indent=2))
        return path

    def load(self, path: str | Path) -> dict:
        path = Path(path)
        loaded = ClientPart.from_pretrained(path / "client")
        self.part.load_state_dict(loaded.state_dict())
        blob = torch.load(path / "client_optim.pt", weights_only=True)
        if self.optimizer is not None and blob["optimizer"] is not None:
            self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"])
        state = json.loads((path / "client_state.json").read_text())
        self.step_id = state["step_id"]
        self.session_id = state["session_id"]
        return state
