"""The victim's side: a client replays held-out samples through the real runtimes while the link records the wire.

The client sends its samples as training micro-batches (`ClientRuntime.train_step`, the one step function) to a
`ServerRuntime` over a `LoopbackLink` wrapped in a `RecordingLink`. The learning rate is 0, so the weights that
produced every message are exactly the checkpoint's (what a white-box attacker with a leaked checkpoint holds).
Besides the capture, the evaluator keeps the `Truth` (images, token ids, labels) to score the attacks with; the
attacks themselves never see it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtllava.config import Config, load_config
from qtllava.data import LlavaDataset, collate
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.privacy.images import VictimSet, to_unit
from qtllava.privacy.wire import Capture, RecordingLink
from qtllava.train.client_runtime import ClientRuntime
from qtllava.train.loop import load_tokenizer_for
from qtllava.train.server_runtime import ServerRuntime
from qtllava.train.ucut import ClientHead, check_cut, load_head_weight
from qtllava.wire.loopback import LoopbackLink

__all__ = ["Truth", "checkpoint_config", "load_victim_dataset", "record_session"]

_STAGE = "stage2"  # the recipe whose messages carry image rows, text rows and labels


@dataclass
class Truth:
    """What the client really sent, in wire order, for scoring (never given to an attack)."""

    ids: list[str] = field(default_factory=list)  # record id per image row block
    images: list[torch.Tensor] = field(default_factory=list)  # (3, H, W) in [0, 1] per image
    text_tokens: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: ids of the text rows sent
    labels: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: (B, T) labels, -100 elsewhere

    def image_tensor(self) -> torch.Tensor:
        return torch.stack(self.images) if self.images else torch.empty(0)


def checkpoint_config(checkpoint: str | Path) -> Config:
    """The configuration a stage's final folder was trained with (its `config.toml`)."""
    return load_config(Path(checkpoint) / "config.toml")


def load_victim_dataset(cfg: Config, vs: VictimSet, data_root: Path, tok=None) -> LlavaDataset:
    tok = tok if tok is not None else load_tokenizer_for(cfg, data_root)
    return LlavaDataset.for_config(cfg, vs.json_path, vs.image_folder, tok, vs.template)


def _frozen(cfg: Config) -> Config:
    """The checkpoint's configuration with a learning rate of 0 in the replayed stage."""
    stage = dataclasses.replace(getattr(cfg.train, _STAGE), lr=0.0, warmup_ratio=0.0)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{_STAGE: stage}))


def record_session(checkpoint: str | Path, vs: VictimSet, data_root: str | Path, cut: str = "paper",
                   batch_size: int = 8, limit: int | None = None) -> tuple[Capture, Truth]:
    """Replay `vs` (at most `limit` samples) as micro-batches of `batch_size` from the checkpoint's client to its
    server in the given cut; -> (the recorded messages, the truth)."""
    checkpoint, data_root = Path(checkpoint), Path(data_root)
    check_cut(cut)
    cfg = _frozen(checkpoint_config(checkpoint))
    tok = load_tokenizer_for(cfg, data_root)
    ds = load_victim_dataset(cfg, vs, data_root, tok)
    n = len(ds) if limit is None else min(limit, len(ds))
    client = ClientPart.from_pretrained(checkpoint / "client")
    server = ServerPart.from_pretrained(checkpoint / "server")
    steps = (n + batch_size - 1) // batch_size
    server_rt = ServerRuntime(server, cfg, _STAGE, total_steps=steps, cut=cut)
    link = RecordingLink(LoopbackLink(server_rt))
    head = ClientHead.from_weight(load_head_weight(checkpoint)) if cut == "u" else None
    client_rt = ClientRuntime(client, cfg, link, _STAGE, total_steps=steps, vocab_size=len(tok), cut=cut, head=head)
    client_rt.connect()
    truth = Truth()
    for start in range(0, n, batch_size):
        samples = [ds[i] for i in range(start, min(n, start + batch_size))]
        batch = collate(samples, pad_id=tok.pad_token_id, padding_side="right")
        client_rt.train_step([batch])
        truth.ids += [s["id"] for s in samples for _ in range(s["pixel_values"].shape[0])]
        truth.images += list(to_unit(batch["pixel_values"], cfg.vision.image_mean, cfg.vision.image_std))
        text_mask = batch["attention_mask"].bool() & (batch["input_ids"] != client.image_token_id)
        truth.text_tokens.append(batch["input_ids"][text_mask])
        truth.labels.append(batch["labels"])
    return link.capture, truth
