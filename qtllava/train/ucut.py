"""The U-shaped cut: the client also holds the LM head and the loss, so labels never leave it.

Forward: client rows -> server decoder stack -> final hidden states of the positions that predict a text token
(known from the layout alone, so they reveal nothing about which positions carry labels) -> compressed -> client
head -> loss. Backward: the gradient w.r.t. those hidden states goes back up, compressed, in a second message.
Hidden states and their gradients use the configured downlink tensor codec (`compress.downlink`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from qtllava.model.layout import PAD, TEXT, Layout
from qtllava.model.loss import IGNORE_INDEX, label_weights, lm_loss
from qtllava.model.parts import ServerPart

__all__ = ["CUTS", "check_cut", "predicting_mask", "ClientHead", "identity_head", "head_loss", "HEAD_FOLDER",
           "load_head_weight"]

CUTS = ("paper", "u")
HEAD_FOLDER = "client_head"
_SERVER_HEAD_KEY = "llm.lm_head.weight"


def check_cut(cut: str) -> str:
    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r}; known: {', '.join(CUTS)}")
    return cut


def predicting_mask(layout: Layout) -> torch.Tensor:
    """(B, T-1) bool: position t is non-pad and position t+1 is text, i.e. its hidden state predicts a text token.

    Every label position is such a position (image and pad positions never carry labels), so the server can send
    exactly these rows without being told where the labels are.
    """
    kinds = layout.kinds
    return (kinds[:, :-1] != PAD) & (kinds[:, 1:] == TEXT)


class ClientHead(nn.Module):
    """The LM head on the client: hidden rows (N, D) -> logits (N, V). Saved as `client_head/model.safetensors`."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "ClientHead":
        """A head holding a copy of `weight` (V, D), e.g. the server part's LM head at the start of a stage."""
        head = cls(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            head.lm_head.weight.copy_(weight)
        return head

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / "model.safetensors"), metadata={"format": "pt", "qtllava_part": "client_head"})

    def load(self, path: str | Path) -> None:
        load_model(self, str(Path(path) / "model.safetensors"), strict=True)


def load_head_weight(init: Path) -> torch.Tensor:
    """The LM head a U-cut client starts from: `init/client_head` if a U-cut stage wrote it, else the head in
    `init/server` (the paper-cut server part; where that part keeps its LLM by reference to a pretrained folder, the
    head comes from building the part). Raises FileNotFoundError naming both places."""
    own = init / HEAD_FOLDER / "model.safetensors"
    server = init / "server" / "model.safetensors"
    for file, key in ((own, "lm_head.weight"), (server, _SERVER_HEAD_KEY)):
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                if key in f.keys():
                    return f.get_tensor(key)
    if (init / "server" / "config.json").is_file():
        return ServerPart.from_pretrained(init / "server").llm.get_output_embeddings().weight.detach().clone()
    raise FileNotFoundError(f"the U cut needs the LM head: neither {own} nor {server} holds it")


class _HiddenOut(nn.Module):
    """Identity in the LM head's place; keeps a (unregistered) reference to the head's weight for its dtype/device."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "weight", weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextmanager
def identity_head(llm):
    """Temporarily replace the LLM's LM head by the identity, so the part's generation code returns hidden states."""
    head = llm.get_output_embeddings()
    llm.set_output_embeddings(_HiddenOut(head.weight))
    try:
        yield
    finally:
        llm.set_output_embeddings(head)


def head_loss(head: ClientHead, hidden_rows: torch.Tensor, labels: torch.Tensor,
              layout: Layout, loss_average: str = "token") -> tuple[torch.Tensor, int]:
    """Mean cross-entropy (nats) over label tokens, as `ServerPart.forward` computes it; -> (loss, n_tokens).

    hidden_rows: (N, D), the final hidden states at `predicting_mask(layout)` in row-major order.
    """
    mask = predicting_mask(layout).to(hidden_rows.device)
    if hidden_rows.shape[0] != int(mask.sum()):
        raise ValueError(f"{hidden_rows.shape[0]} hidden rows for {int(mask.sum())} predicting positions")
    shifted = labels[:, 1:].to(hidden_rows.device)
    if bool((shifted[~mask] != IGNORE_INDEX).any()):
        raise ValueError("a label sits at a position no predicting row covers (after a pad or on an image row)")
    target = shifted[mask]
    keep = target != IGNORE_INDEX
    n_tokens = int(keep.sum())
    logits = head(hidden_rows[keep].to(head.lm_head.weight.dtype))
    weights = None if loss_average == "token" else label_weights(shifted, loss_average)[mask][keep]
    loss = lm_loss(logits, target[keep], weights)
    return loss, n_tokens
