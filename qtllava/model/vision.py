"""Vision tower: a transformers SigLIP or CLIP vision model, read out at `select_layer` (penultimate by default).

Kinds are registered by exact name. Random weights come from the `VisionConfig` sizes; real weights only from a
local folder (`VisionConfig.pretrained`), never downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, PreTrainedModel, SiglipVisionConfig,
                          SiglipVisionModel)

from qtllava.config import VisionConfig

__all__ = ["VisionKind", "VISION_KINDS", "VisionTower", "build_vision_tower", "vision_hf_config", "ATTN_IMPLEMENTATION"]


@dataclass(frozen=True)
class VisionKind:
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    has_cls: bool  # CLIP prepends a CLS token that LLaVA drops; SigLIP has none
    pre_norm: str = ""  # attribute name of a LayerNorm applied before the encoder layers (CLIP's pre_layrnorm)


VISION_KINDS: dict[str, VisionKind] = {
    "siglip": VisionKind(SiglipVisionConfig, SiglipVisionModel, has_cls=False),
    "clip": VisionKind(CLIPVisionConfig, CLIPVisionModel, has_cls=True, pre_norm="pre_layrnorm"),
}


def _kind(name: str) -> VisionKind:
    if name not in VISION_KINDS:
        raise KeyError(f"unknown vision tower kind {name!r}; known: {', '.join(VISION_KINDS)}")
    return VISION_KINDS[name]


ATTN_IMPLEMENTATION = "sdpa"


def vision_hf_config(cfg: VisionConfig, attn_implementation: str = ATTN_IMPLEMENTATION) -> PretrainedConfig:
    """The transformers config of a randomly initialised tower with the sizes in `cfg`."""
    kind = _kind(cfg.kind)
    extra: dict[str, Any] = {"vision_use_head": False} if cfg.kind == "siglip" else {}  # the pooling head is unused
    return kind.config_class(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                             image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                             attn_implementation=attn_implementation, **extra)


class VisionTower(nn.Module):
    """pixel_values (n, 3, H, W) -> features (n, N, Dv) from hidden_states[cfg.select_layer].

    `model` is the wrapped transformers vision model; without one, a random one is built from `cfg`. Only the
    encoder layers up to the selected one are run (the rest cannot change the output and get no gradient).
    """

    def __init__(self, cfg: VisionConfig, model: PreTrainedModel | None = None):
        super().__init__()
        self.kind = _kind(cfg.kind)
        self.cfg = cfg
        if model is None:
            model = self.kind.model_class(vision_hf_config(cfg))
        if not isinstance(model, self.kind.model_class):
            raise TypeError(f"vision kind {cfg.kind!r} needs a {self.kind.model_class.__name__}, "
                            f"got {type(model).__name__}")
        self.model = model
        n_layers = model.config.num_hidden_layers
        sel = cfg.select_layer
        if not -(n_layers + 1) <= sel <= n_layers:
            raise ValueError(f"vision select_layer {sel} is out of range for {n_layers} layers "
                             f"(hidden_states has {n_layers + 1} entries)")
        self.n_run = sel % (n_layers + 1)  # hidden_states[i] is the output of the first i encoder layers
        grid = model.config.image_size // model.config.patch_size
        self.num_tokens = grid * grid
        if self.num_tokens != cfg.num_image_tokens:
            raise ValueError(f"vision tower makes {self.num_tokens} tokens per image (image_size "
                             f"{model.config.image_size}, patch_size {model.config.patch_size}) but the config says "
                             f"{cfg.num_image_tokens} (image_size {cfg.image_size}, patch_size {cfg.patch_size})")

    @classmethod
    def from_hf_config(cls, cfg: VisionConfig, hf_config: dict[str, Any]) -> "VisionTower":
        """A randomly initialised tower with the architecture in `hf_config` (a transformers config as a dict)."""
        kind = _kind(cfg.kind)
        config = kind.config_class.from_dict(hf_config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        return cls(cfg, kind.model_class(config))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, cfg: VisionConfig, dtype: torch.dtype | None = None) -> "VisionTower":
        """Load the weights in the local folder `cfg.pretrained` (never downloads)."""
        path = Path(cfg.pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"vision tower folder {str(path)!r} (vision.pretrained) does not exist")
        model = _kind(cfg.kind).model_class.from_pretrained(
            str(path), local_files_only=True, dtype=dtype or torch.get_default_dtype(),
            attn_implementation=ATTN_IMPLEMENTATION)
        return cls(cfg, model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.embeddings(pixel_values.to(m.embeddings.patch_embedding.weight.dtype))
        if self.kind.pre_norm:
            h = getattr(m, self.kind.pre_norm)(h)
        for layer in m.encoder.layers[: self.n_run]:
            h = layer(h, None)
        if self.kind.has_cls:
            h = h[:, 1:]
        if h.shape[1] != self.cfg.num_image_tokens:
            raise ValueError(f"vision tower produced {h.shape[1]} tokens per image, expected "
                             f"{self.cfg.num_image_tokens} (check image size {tuple(pixel_values.shape[-2:])})")
        return h


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine position table, row-major over the patch grid (MAE's recipe): half of
    the channels encode the row, half the column, each as sines and cosines of geometric frequencies."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {dim}")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * freq[None, :]  # (grid, dim/4)
    one = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, dim/2)
    rows = one[:, None, :].expand(grid, grid, dim // 2)
    cols = one[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


def build_vision_tower(cfg: VisionConfig, dtype: torch.dtype | None = None) -> VisionTower:
    """Random tower from the sizes in `cfg`, or the weights in the local folder `cfg.pretrained`."""
    if cfg.pretrained:
        return VisionTower.from_pretrained(cfg, dtype)
    tower = VisionTower(cfg)
    if cfg.pos_init == "sincos":
        table = tower.model.embeddings.position_embedding.weight
        grid = cfg.image_size // cfg.patch_size
        if table.shape[1] % 4:
            raise ValueError(f"vision.pos_init='sincos' needs vision.hidden_size divisible by 4, got "
                             f"{table.shape[1]}; set vision.pos_init='default'")
        with torch.no_grad():  # CLIP's first row belongs to the CLS token: it starts at zero
            table[-grid * grid:] = sincos_2d(grid, table.shape[1]).to(table.dtype)
            table[:-grid * grid] = 0
    return tower
