"""The black-box attacker's stand-in for the client: same architecture, trained by the server on its own data.

The attacker starts from the public base (the stage-0 checkpoint stands in for the pretrained SigLIP + LLM, whose
tower the client never trains afterwards), builds fresh codecs of the announced configuration, and trains the
connector, the codecs and the token embeddings through its *own* server part (frozen) on its *own* captioned
scenes with the LM loss plus the codecs' auxiliary loss. The server part was trained together with the real client,
so a surrogate that the server understands emits features close to the real client's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from qtllava.config import Config
from qtllava.data import LlavaDataset, collate
from qtllava.model.parts import ClientPart, ServerPart, build_parts
from qtllava.train.loop import load_part_weights

__all__ = ["build_surrogate", "train_surrogate"]

log = logging.getLogger(__name__)

_TRAINED = ("connector", "image_codec", "text_codec", "embed_tokens")


def build_surrogate(cfg: Config, vocab_size: int, image_token_id: int, base: Path | None) -> ClientPart:
    """A client part of `cfg`'s architecture: the base checkpoint's client weights where given, fresh codecs."""
    client, _ = build_parts(cfg, vocab_size=vocab_size, image_token_id=image_token_id)
    if base is not None:
        load_part_weights(client, Path(base) / "client", ClientPart, fresh=("image_codec", "text_codec"))
    else:
        log.warning("black-box surrogate without a base checkpoint: the vision tower starts random")
    return client


def train_surrogate(client: ClientPart, server: ServerPart, data: LlavaDataset, pad_id: int, steps: int,
                    batch_size: int = 8, lr: float = 1e-3, seed: int = 0, train_tower: bool = False) -> list[float]:
    """Train connector, codecs and embeddings of `client` through the frozen `server`; -> loss every 25 steps.

    `train_tower`: train the vision tower too (for a surrogate without a base, whose tower would stay random)."""
    gen = torch.Generator().manual_seed(seed)
    server.requires_grad_(False)
    server.eval()
    client.requires_grad_(False)
    names = _TRAINED + (("vision_tower",) if train_tower else ())
    params = []
    for name in names:
        module = getattr(client, name)
        module.requires_grad_(True)
        params += list(module.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    client.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        idx = torch.randint(0, len(data), (batch_size,), generator=gen).tolist()
        batch = collate([data[i] for i in idx], pad_id=pad_id, padding_side="right")
        out = client(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        res = server(out.image.values, out.text.values, out.layout, labels=batch["labels"])
        loss = res.loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            history.append(float(res.loss.detach()))
    client.eval()
    client.requires_grad_(False)
    return history
