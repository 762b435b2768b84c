"""The small networks of the privacy suite and one regression/classification training loop for them.

- `InversionNet`: image-token rows as they arrive on the server (N tokens x d_code, dequantized) -> RGB image. The
  N rows are the ViT's patches in raster order, so each row is decoded to its own patch after one transformer layer
  mixes them, then a small convolution smooths the patch seams.
- `Probe`: a small CNN from an RGB image in [0, 1] to logits (the semantic probe, trained on clean images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InversionConfig", "InversionNet", "Probe", "fit", "predict", "blur_noise"]


@dataclass
class InversionConfig:
    width: int = 128  # token width inside the decoder
    depth: int = 1  # transformer layers mixing the tokens
    heads: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3


class InversionNet(nn.Module):
    """(B, N, d_in) rows of a g x g patch grid (N = g^2) -> (B, 3, S, S) in [0, 1], S = g * patch."""

    def __init__(self, d_in: int, num_tokens: int, image_size: int, cfg: InversionConfig | None = None):
        super().__init__()
        cfg = cfg or InversionConfig()
        g = int(round(math.sqrt(num_tokens)))
        if g * g != num_tokens or image_size % g:
            raise ValueError(f"{num_tokens} tokens do not tile a {image_size}-px square image")
        self.grid, self.patch, self.image_size = g, image_size // g, image_size
        self.inp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, cfg.width))
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.mix = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, 2 * cfg.width), nn.GELU(),
                                 nn.Linear(2 * cfg.width, 3 * self.patch * self.patch))
        self.smooth = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        b = rows.shape[0]
        h = self.mix(self.inp(rows.float()) + self.pos)
        p, g = self.patch, self.grid
        patches = self.out(h).reshape(b, g, g, 3, p, p)
        logits = patches.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)
        return torch.sigmoid(logits + self.smooth(logits))


class Probe(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, n_out) logits: strided convolutions down to <= 8 px, then an MLP."""

    def __init__(self, image_size: int, n_out: int, channels: int = 16):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.GELU()]
        s, c = image_size, channels
        while s > 8:
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU()]
            s, c = (s + 1) // 2, 2 * c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, 256), nn.GELU(), nn.Linear(256, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def blur_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augmentation for the probe: a random Gaussian blur (sigma up to 1.2 px) and noise (std up to 0.05)."""
    b = x.shape[0]
    sigma = float(torch.rand((), generator=generator)) * 1.2
    if sigma > 0.2:
        r = torch.arange(-2, 3, dtype=x.dtype)
        k = torch.exp(-r ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
    noise = torch.randn(x.shape, generator=generator) * float(torch.rand((), generator=generator)) * 0.05
    return (x + noise).clamp(0, 1) if b else x


def fit(model: nn.Module, inputs: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        targets: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int = 0,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> list[float]:
    """Adam with a cosine schedule over random mini-batches of (inputs, targets); -> loss every 50 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = inputs.shape[0]
    model.train()
    history = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x = inputs[idx].float()
        if augment is not None:
            x = augment(x, gen)
        loss = loss_fn(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            history.append(float(loss.detach()))
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size].float()) for i in range(0, inputs.shape[0], batch_size)]) \
        if inputs.shape[0] else torch.empty(0)
