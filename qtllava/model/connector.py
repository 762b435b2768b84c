"""Connector from vision features to LLM input embeddings; variants registered by exact name."""

from __future__ import annotations

from typing import Callable

from torch import nn

from qtllava.config import ConnectorConfig

__all__ = ["register_connector", "connector_names", "build_connector"]

_CONNECTORS: dict[str, Callable[[int, int], nn.Module]] = {}


def register_connector(name: str) -> Callable:
    """Decorator: register `build(vision_dim, llm_dim) -> nn.Module` (maps (..., Dv) to (..., D))."""

    def deco(build: Callable[[int, int], nn.Module]) -> Callable[[int, int], nn.Module]:
        if name in _CONNECTORS:
            raise ValueError(f"connector {name!r} is already registered")
        _CONNECTORS[name] = build
        return build

    return deco


def connector_names() -> list[str]:
    return sorted(_CONNECTORS)


def build_connector(cfg: ConnectorConfig, vision_dim: int, llm_dim: int) -> nn.Module:
    """The connector named `cfg.kind`; raises KeyError on an unknown name."""
    if cfg.kind not in _CONNECTORS:
        raise KeyError(f"unknown connector {cfg.kind!r}; known: {', '.join(connector_names())}")
    return _CONNECTORS[cfg.kind](vision_dim, llm_dim)


@register_connector("mlp2x_gelu")
def mlp2x_gelu(vision_dim: int, llm_dim: int) -> nn.Module:
    """Linear(Dv, D), GELU (exact erf form, as LLaVA's "gelu"), Linear(D, D)."""
    return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
