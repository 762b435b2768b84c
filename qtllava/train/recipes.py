"""Training recipes: for each stage, what is trained, what starts fresh, which data and which codecs are used.

Two families, as TinyLLaVA Factory's recipes:
- "scratch": stage 0 (base) trains tower + connector + LLM from random weights without compression; it stands in
  for pretrained SigLIP and LLM weights. Stages 1 and 2 follow the paper from that base.
- "pretrained" (a pretrained LLM in `llm.pretrained`): stage 0 pre-trains the tower + connector on captions and
  instruction turns in front of the frozen LLM (standing in for a pretrained SigLIP, which cannot be had offline);
  stage 1 aligns (fresh connector and codecs; tower and LLM frozen); stage 2 instructs (LLM, connector and codecs;
  the tower and the token embeddings frozen).
How the LLM is tuned is a setting per stage (`StageConfig.llm`: "full", "lora" or "frozen"); the recipe gives the
default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from qtllava.config import CodecConfig, CompressConfig, Config, StageConfig

__all__ = ["Recipe", "RECIPES", "LLM_TUNING", "TOWER_TUNING", "recipe", "recipe_family", "stage_compress", "stage_fresh",
           "image_fit_due", "apply_trainable", "lr_at", "set_seed", "make_optimizer", "codec_parameters", "set_lr"]

LLM_TUNING = ("full", "lora", "frozen")
TOWER_TUNING = ("full", "frozen")


@dataclass(frozen=True)
class Recipe:
    name: str
    client_trainable: tuple[str, ...]  # ClientPart submodule names whose parameters train
    server_trainable: tuple[str, ...]  # ServerPart submodule names whose parameters train ("llm" only when full)
    fresh: tuple[str, ...]  # submodules (either part) re-initialised at the start of the stage
    data: tuple[str, ...]  # data files (under the data root) mixed for this stage
    compressed: bool  # False: fp32 passthrough both ways, whatever the configuration says
    template: str  # "pretrain" for captions; "chat" = the configured chat template
    llm: str = "frozen"  # how the server's LLM is tuned: "full", "lora" (peft adapters) or "frozen"


CODECS = ("image_codec", "text_codec")

RECIPES: dict[str, dict[str, Recipe]] = {
    "scratch": {
        "stage0": Recipe("stage0", ("vision_tower", "connector", "embed_tokens") + CODECS, CODECS, (),
                         ("captions.json", "instruct_train.json"), compressed=False, template="chat", llm="full"),
        "stage1": Recipe("stage1", ("connector",) + CODECS, CODECS, ("connector",) + CODECS,
                         ("captions.json",), compressed=True, template="pretrain", llm="frozen"),
        "stage2": Recipe("stage2", ("connector", "embed_tokens") + CODECS, CODECS, (),
                         ("instruct_train.json",), compressed=True, template="chat", llm="full"),
    },
    "pretrained": {
        "stage0": Recipe("stage0", ("vision_tower", "connector") + CODECS, CODECS, (),
                         ("captions.json", "instruct_train.json"), compressed=False, template="chat", llm="frozen"),
        "stage1": Recipe("stage1", ("connector",) + CODECS, CODECS, ("connector",) + CODECS,
                         ("captions.json",), compressed=True, template="pretrain", llm="frozen"),
        "stage2": Recipe("stage2", ("connector",) + CODECS, CODECS, (),
                         ("instruct_train.json",), compressed=True, template="chat", llm="full"),
    },
}
STAGE_NAMES = tuple(RECIPES["scratch"])


def recipe_family(cfg: Config) -> str:
    """"scratch" or "pretrained": `train.recipe`, where "auto" means "pretrained" exactly when llm.pretrained is set."""
    family = cfg.train.recipe
    if family == "auto":
        return "pretrained" if cfg.llm.pretrained else "scratch"
    if family not in RECIPES:
        raise ValueError(f"train.recipe: unknown recipe {family!r}; known: auto, {', '.join(RECIPES)}")
    return family


def recipe(cfg: Config, stage: str) -> Recipe:
    """The recipe of `stage` under `cfg`: its family's, with the stage's `llm` tuning applied (full adds "llm" to
    the server's trainable submodules) and its `tower` tuning ("full" adds the vision tower to the client's,
    "frozen" takes it out)."""
    family = RECIPES[recipe_family(cfg)]
    if stage not in family:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(family)}")
    rec = family[stage]
    tuning = getattr(cfg.train, stage).llm or rec.llm
    if tuning not in LLM_TUNING:
        raise ValueError(f"train.{stage}.llm: unknown LLM tuning {tuning!r}; known: {', '.join(LLM_TUNING)}")
    server = rec.server_trainable + (("llm",) if tuning == "full" else ())
    client = rec.client_trainable
    tower = getattr(cfg.train, stage).tower
    if tower and tower not in TOWER_TUNING:
        raise ValueError(f"train.{stage}.tower: unknown tower tuning {tower!r}; known: {', '.join(TOWER_TUNING)}")
    if tower == "full" and "vision_tower" not in client:
        client = ("vision_tower",) + client
    elif tower == "frozen":
        client = tuple(n for n in client if n != "vision_tower")
    return replace(rec, llm=tuning, server_trainable=server, client_trainable=client)


def _stage_index(stage: str) -> int:
    if stage not in STAGE_NAMES:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_NAMES)}")
    return STAGE_NAMES.index(stage)


def _first_compressed(cfg: Config) -> int:
    first = cfg.compress.first_stage
    if first not in (1, 2):
        raise ValueError(f"compress.first_stage must be 1 or 2 (the first stage that sends the configured codecs), "
                         f"got {first!r}")
    return first


def stage_compress(cfg: Config, stage: str) -> CompressConfig:
    """The codecs used in `stage`: the configured ones; fp32 passthrough for the uncompressed base stage; fp16 both
    ways for a compressed stage before `compress.first_stage`."""
    if not recipe(cfg, stage).compressed:
        return _passthrough("fp32")
    return cfg.compress if _stage_index(stage) >= _first_compressed(cfg) else _passthrough("fp16")


def _passthrough(dtype: str) -> CompressConfig:
    """Identity codecs at `dtype` on both modalities, and the same dtype for the gradients."""
    return CompressConfig(image=CodecConfig(name="identity", dtype=dtype),
                          text=CodecConfig(name="identity", dtype=dtype), downlink=dtype)


def stage_fresh(cfg: Config, stage: str) -> tuple[str, ...]:
    """Submodules re-initialised at the start of `stage`: the recipe's, plus both codecs at `compress.first_stage`
    (they were identity passthrough before it)."""
    rec = recipe(cfg, stage)
    fresh = rec.fresh
    if rec.compressed and _stage_index(stage) == _first_compressed(cfg):
        fresh += tuple(c for c in CODECS if c not in fresh)
    return fresh


def image_fit_due(cfg: Config, stage: str) -> bool:
    """Whether `stage` starts a fresh image codec behind a connector that is already trained (`compress.first_stage`
    = 2): its decoder is then fitted on the connector's rows (`warm_start.fit_image_decoder`). In stage 1 the connector
    itself starts fresh, so there is nothing to fit to."""
    fresh = stage_fresh(cfg, stage)
    return "image_codec" in fresh and "connector" not in fresh


def apply_trainable(part: nn.Module, names: tuple[str, ...], lora: bool = False) -> list[nn.Parameter]:
    """Freeze every parameter of `part`, unfreeze the named submodules (and, with `lora`, the part's LoRA adapters);
    return the trainable parameters. A trained submodule no longer holds its pretrained weights unchanged, so it
    leaves the part's `base_weights` (it is then saved in full)."""
    part.requires_grad_(False)
    params: list[nn.Parameter] = []
    base = getattr(part, "base_weights", {})
    for name in names:
        module = getattr(part, name, None)
        if module is None:
            continue
        module.requires_grad_(True)
        base.pop(name, None)
        params += list(module.parameters())
    if lora:
        adapters = part.lora_parameters()
        if not adapters:
            raise ValueError("the stage tunes the LLM through LoRA, but the server part has no adapters")
        for p in adapters:
            p.requires_grad_(True)
        params += adapters
    return params


def lr_at(stage: StageConfig, step: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to min_lr_ratio x lr; `step` counts optimizer steps from 0."""
    warmup = max(1, math.ceil(stage.warmup_ratio * total_steps)) if stage.warmup_ratio > 0 else 0
    if warmup and step < warmup:
        return stage.lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = stage.min_lr_ratio
    return stage.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def codec_parameters(part: nn.Module) -> list[nn.Parameter]:
    """The parameters of a part's codec halves (those `StageConfig.codec_lr_scale` applies to)."""
    return [p for name in CODECS if getattr(part, name, None) is not None for p in getattr(part, name).parameters()]


def make_optimizer(params: list[nn.Parameter], stage: StageConfig, codec: list[nn.Parameter] = ()
                   ) -> torch.optim.AdamW | None:
    """AdamW over the trainable parameters, or None when there are none (e.g. a server with nothing to learn).

    Groups: weight decay for matrices only; with `stage.codec_lr_scale` != 1, the parameters in `codec` get their
    own groups whose `lr_scale` multiplies the scheduled rate (`set_lr`). At 0 they stay in the optimizer at rate 0,
    their gradients still counted in the clipping norm (as in the study's `-clr0` runs)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    if stage.codec_lr_scale < 0:
        raise ValueError(f"codec_lr_scale must be >= 0, got {stage.codec_lr_scale}")
    scaled = {id(p) for p in codec} if stage.codec_lr_scale != 1.0 else set()
    groups = []
    for scale, members in ((1.0, [p for p in params if id(p) not in scaled]),
                           (stage.codec_lr_scale, [p for p in params if id(p) in scaled])):
        groups += [{"params": [p for p in members if p.ndim >= 2], "weight_decay": stage.weight_decay,
                    "lr_scale": scale},
                   {"params": [p for p in members if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=(0.9, 0.999))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled rate `lr` for every group, times the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
