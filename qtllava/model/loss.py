"""The causal-LM loss both cuts use, with a choice of how label tokens are averaged.

``"token"`` (the default, as Hugging Face and the paper do): every label token of the batch weighs the same, so long
answers (captions) outweigh one-word answers. ``"turn"``: every assistant turn weighs the same and its tokens share
that weight; a one-word answer then counts as much as a caption. A turn is a maximal run of label positions in a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtllava.constants import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "LOSS_AVERAGES", "check_loss_average", "label_weights", "lm_loss"]

LOSS_AVERAGES = ("token", "turn")


def check_loss_average(average: str) -> str:
    if average not in LOSS_AVERAGES:
        raise ValueError(f"unknown loss average {average!r}; known: {', '.join(LOSS_AVERAGES)}")
    return average


def label_weights(target: torch.Tensor, average: str) -> torch.Tensor:
    """target (B, T) labels already shifted -> (B, T) float weights: 0 at IGNORE_INDEX, summing to 1 (or all 0)."""
    check_loss_average(average)
    keep = target != IGNORE_INDEX
    if average == "token":
        return keep.float() / max(int(keep.sum()), 1)
    prev = torch.cat([torch.zeros_like(keep[:, :1]), keep[:, :-1]], dim=1)
    start = (keep & ~prev).flatten()
    turn = torch.cumsum(start.long(), 0) - 1  # turn index of every position (meaningful where kept)
    flat_keep = keep.flatten()
    n_turns = int(start.sum())
    if n_turns == 0:
        return torch.zeros_like(target, dtype=torch.float)
    lengths = torch.bincount(turn[flat_keep], minlength=n_turns).float()
    w = torch.zeros(flat_keep.shape, dtype=torch.float, device=target.device)
    w[flat_keep] = 1.0 / (lengths[turn[flat_keep]] * n_turns)
    return w.view_as(target)


def lm_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (nats) of logits (N, V) against target (N,), all kept; weighted sum when `weights` (N,) is
    given (weights from `label_weights`), else the mean."""
    if weights is None:
        return F.cross_entropy(logits.float(), target, reduction="sum") / max(target.numel(), 1)
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weights.to(ce.dtype)).sum()
