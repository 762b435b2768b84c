"""The two halves of the split model and the factory that builds them.

Client: vision tower -> connector -> splice into token embeddings -> take image rows and non-pad text rows ->
one codec per modality -> packets. Server: packets -> dequantize -> codec decoders -> rows put back by the layout ->
decoder stack -> LM head -> loss. The server's LLM has no token-embedding table: the client owns it.

Each part saves to its own folder (`config.json` + `model.safetensors`) and can be rebuilt from that folder and the
pretrained folders it names: weights that a part holds unchanged from `llm.pretrained` (the client's token
embeddings, the server's LLM while it is frozen or tuned through LoRA) are kept by reference (the folder and its
fingerprint), not copied into every checkpoint; LoRA adapters are saved with peft's `save_pretrained` in `adapter/`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from qtllava.compress import ClientCodec, Encoded, Packet, ServerCodec, build_codec
from qtllava.config import Config, LLMConfig, LoraConfig, from_dict, to_dict
from qtllava.model.connector import build_connector
from qtllava.model.layout import Layout
from qtllava.model.loss import IGNORE_INDEX, label_weights, lm_loss
from qtllava.model.llm import LLM_KINDS, build_llm, folder_fingerprint, llm_from_hf_config
from qtllava.model.vision import VisionTower, build_vision_tower, sincos_2d

__all__ = ["ClientOutput", "ServerOutput", "ClientPart", "ServerPart", "NoTokenEmbedding", "build_parts", "Layout",
           "saved_weights", "CONFIG_NAME", "WEIGHTS_NAME", "ADAPTER_DIR", "IGNORE_INDEX"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"
_FORMAT = "qtllava-part"
_FORMAT_VERSION = 1


class ClientOutput(NamedTuple):
    """What the client sends for one batch: the layout and one encoded packet per modality."""

    layout: Layout
    image: Encoded  # image rows, (n_images * num_image_tokens, D) before the codec, row-major over the batch
    text: Encoded  # non-pad text rows, (n_text, D) before the codec, row-major over the batch

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of both codecs' auxiliary losses (distortion, rate), scalar."""
        return self.image.aux_loss + self.text.aux_loss


class ServerOutput(NamedTuple):
    loss: torch.Tensor | None  # mean cross-entropy over label tokens (nats); None without labels
    logits: torch.Tensor | None  # (B, T, V), or None when only the loss was asked for
    n_tokens: int  # label tokens that entered the loss


# --- client ---------------------------------------------------------------------------------------------------


class ClientPart(nn.Module):
    """Vision tower + connector + the LLM's token-embedding table + the client halves of both codecs."""

    PART = "client"

    def __init__(self, cfg: Config, vision_tower: VisionTower, embed_tokens: nn.Embedding, image_token_id: int,
                 image_codec: ClientCodec | None = None, text_codec: ClientCodec | None = None):
        super().__init__()
        if not 0 <= image_token_id < embed_tokens.num_embeddings:
            raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary "
                             f"({embed_tokens.num_embeddings} rows)")
        self.cfg = cfg
        self.image_token_id = int(image_token_id)
        dim = embed_tokens.embedding_dim
        self.vision_tower = vision_tower
        pos = cfg.connector.position_dims
        grid = math.isqrt(vision_tower.num_tokens)
        if pos and (pos % 4 or grid * grid != vision_tower.num_tokens):
            raise ValueError(f"connector.position_dims={pos} needs a multiple of 4 and a square patch grid "
                             f"({vision_tower.num_tokens} image tokens)")
        self.connector = build_connector(cfg.connector, vision_tower.hidden_size + pos, dim)
        # fixed, so not saved: (num_image_tokens, position_dims), or an empty table when off
        self.register_buffer("image_position", sincos_2d(grid, pos) if pos else torch.zeros(0), persistent=False)
        self.embed_tokens = embed_tokens
        self.image_codec = image_codec if image_codec is not None else build_codec(cfg.compress.image, dim)[0]
        self.text_codec = text_codec if text_codec is not None else build_codec(cfg.compress.text, dim)[0]
        # submodule -> pretrained folder whose weights it holds unchanged (saved by reference; see module doc)
        self.base_weights: dict[str, str] = {}

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (n, 3, H, W) -> connector output (n, num_image_tokens, D)."""
        feats = self.vision_tower(pixel_values)
        if self.image_position.numel():
            # scaled to the features' per-channel size (not differentiated), so the code keeps its share of the
            # connector's input however large the tower's rows grow (unscaled, a unit code was ~7 % of the first
            # layer's output after 6400 tiny stage-0 steps and the decoder still could not say left or right)
            code = self.image_position.to(feats.dtype)
            scale = feats.detach().pow(2).mean(-1, keepdim=True).sqrt() / code.pow(2).mean().sqrt()
            feats = torch.cat([feats, code * scale], dim=-1)
        return self.connector(feats)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """input_ids (B, T) with one `image_token_id` per image token -> inputs_embeds (B, T, D).

        The HF-LLaVA splice: token embeddings, then the images' features scattered in row-major order into the
        image-token positions. Raises ValueError when positions and features differ in number.
        """
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        n_pos = int(is_image.sum())
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        n_feat = n_images * self.vision_tower.num_tokens
        if n_pos != n_feat:
            raise ValueError(f"image tokens and image features do not match: {n_pos} image-token positions, "
                             f"{n_images} images x {self.vision_tower.num_tokens} tokens = {n_feat} features")
        if n_images == 0:
            return embeds
        feats = self.image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> ClientOutput:
        """input_ids, attention_mask (B, T); pixel_values (n, 3, H, W) -> layout + one Encoded per modality.

        Padding rows are never encoded or sent.
        """
        layout = Layout.from_batch(input_ids, attention_mask, self.image_token_id)
        n_img_pos = int((input_ids == self.image_token_id).sum())
        if layout.n_image != n_img_pos:
            raise ValueError(f"{n_img_pos - layout.n_image} image-token positions lie under attention_mask 0")
        embeds = self.embed(input_ids, pixel_values)
        image = self.image_codec(embeds[layout.image_mask])
        text = self.text_codec(embeds[layout.text_mask])
        return ClientOutput(layout, image, text)

    def embed_text_rows(self, token_ids: torch.Tensor) -> Encoded:
        """token_ids (B,) or (B, k) -> the text codec's encoding of their embeddings, rows (B*k, D) row-major."""
        return self.text_codec(self.embed_tokens(token_ids.reshape(-1).to(self.embed_tokens.weight.device)))

    # --- save / load --------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (tower, connector, embeddings, client codecs) to `path`."""
        meta = _meta("client", self.cfg, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                     image_token_id=self.image_token_id, vision_config=self.vision_tower.model.config.to_dict(),
                     base_weights=_base_meta(self.base_weights))
        _save(self, Path(path), meta, self.base_weights)

    @staticmethod
    def config_of(path: str | Path) -> Config:
        """The configuration a saved client part was trained with (read from its config.json alone)."""
        return from_dict(_load_meta(Path(path), "client")["config"], base=Config())

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ClientPart":
        """Rebuild a client part from a folder written by `save_pretrained` (and the pretrained folder it names, if
        any)."""
        path = Path(path)
        meta = _load_meta(path, "client")
        cfg = from_dict(meta["config"], base=Config())
        base = _check_base(path, meta.get("base_weights", {}), ("embed_tokens",))
        tower = VisionTower.from_hf_config(cfg.vision, meta["vision_config"])
        if "embed_tokens" in base:
            embed = build_llm(_llm_at(cfg.llm, base["embed_tokens"]), meta["vocab_size"]).get_input_embeddings()
        else:
            embed = nn.Embedding(meta["vocab_size"], meta["hidden_size"])
        part = cls(cfg, tower, embed, meta["image_token_id"])
        part.base_weights = base
        _load_weights(part, path)
        return part


# --- server ---------------------------------------------------------------------------------------------------


class NoTokenEmbedding(nn.Module):
    """Stands in for the LLM's input-embedding table on the server, which only ever receives `inputs_embeds`.

    It holds no parameters (so the server neither stores nor saves the vocabulary's embeddings) and raises if
    anything tries to embed token ids.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the server part has no token-embedding table (the client owns it); pass inputs_embeds")


class ServerPart(nn.Module):
    """Server halves of both codecs + the LLM's decoder stack and LM head (its embedding table is removed)."""

    PART = "server"

    def __init__(self, cfg: Config, llm: PreTrainedModel, image_codec: ServerCodec | None = None,
                 text_codec: ServerCodec | None = None):
        super().__init__()
        self.cfg = cfg
        dim = int(llm.config.hidden_size)
        embed = llm.get_input_embeddings()
        head = llm.get_output_embeddings()
        if isinstance(embed, nn.Embedding):
            if head.weight is embed.weight:  # tied head: give the server its own copy, the client keeps the table
                head.weight = nn.Parameter(head.weight.detach().clone())
            llm.set_input_embeddings(NoTokenEmbedding(embed.num_embeddings, embed.embedding_dim))
        llm.config.tie_word_embeddings = False
        self.llm = llm
        self.image_codec = image_codec if image_codec is not None else build_codec(cfg.compress.image, dim)[1]
        self.text_codec = text_codec if text_codec is not None else build_codec(cfg.compress.text, dim)[1]
        self.base_weights: dict[str, str] = {}  # as ClientPart.base_weights ("llm": its pretrained folder)

    @property
    def hidden_size(self) -> int:
        return int(self.llm.config.hidden_size)

    # --- LoRA -----------------------------------------------------------------------------------------------

    @property
    def peft_model(self):
        """The peft model wrapping `llm` once LoRA adapters are on (None before). Not a submodule: its adapters
        live inside `llm` itself, where peft injects them."""
        return self.__dict__.get("_peft")

    def enable_lora(self, lora: LoraConfig, adapter: str | Path | None = None) -> None:
        """Put LoRA adapters on the LLM's `lora.targets` (fresh, or loaded from a folder written by peft's
        `save_pretrained`). The LLM's own weights stay as they are; only the adapters train."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model

        if self.peft_model is not None:
            raise ValueError("this server part already has LoRA adapters")
        if adapter is not None:
            peft = PeftModel.from_pretrained(self.llm, str(adapter), is_trainable=True)
        else:
            targets = [t.strip() for t in lora.targets.split(",") if t.strip()]
            if not targets or lora.rank <= 0:
                raise ValueError(f"llm.lora: needs a positive rank and target modules, got rank {lora.rank}, "
                                 f"targets {lora.targets!r}")
            peft = get_peft_model(self.llm, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                           lora_dropout=lora.dropout, target_modules=targets,
                                                           bias="none"))
        self.__dict__["_peft"] = peft

    def lora_parameters(self) -> list[nn.Parameter]:
        """The LoRA adapters' parameters (empty without adapters)."""
        return [p for n, p in self.llm.named_parameters() if "lora_" in n]

    @property
    def vocab_size(self) -> int:
        return int(self.llm.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.llm.get_output_embeddings().weight.device

    def dequantize(self, image: Packet, text: Packet) -> tuple[torch.Tensor, torch.Tensor]:
        """Both packets -> their values (rows, d_code) on this part's device, as the client's `Encoded.values`."""
        return self.image_codec.dequantize(image).to(self.device), self.text_codec.dequantize(text).to(self.device)

    def assemble(self, image_values: torch.Tensor, text_values: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Decode both modalities and put the rows back where `layout` says; zeros at pads. -> (B, T, D)."""
        if image_values.shape[0] != layout.n_image or text_values.shape[0] != layout.n_text:
            raise ValueError(f"rows do not match the layout: {image_values.shape[0]} image rows for "
                             f"{layout.n_image} image positions, {text_values.shape[0]} text rows for "
                             f"{layout.n_text} text positions")
        dtype = self.llm.get_output_embeddings().weight.dtype
        image = self.image_codec(image_values).to(dtype)
        text = self.text_codec(text_values).to(dtype)
        layout = layout.to(text.device)
        b, t = layout.shape
        out = text.new_zeros(b, t, self.hidden_size)
        out = out.masked_scatter(layout.image_mask.unsqueeze(-1), image)
        return out.masked_scatter(layout.text_mask.unsqueeze(-1), text)

    def forward(self, image_values: torch.Tensor, text_values: torch.Tensor, layout: Layout,
                labels: torch.Tensor | None = None, return_logits: bool | None = None,
                loss_average: str = "token") -> ServerOutput:
        """Causal-LM loss over `labels` (B, T) (shifted as in HF; IGNORE_INDEX positions are skipped), averaged
        per token or per assistant turn (`loss_average`, see `qtllava.model.loss`).

        Logits are returned without labels, or with `return_logits=True`; with labels only, the LM head runs on
        the label positions alone.
        """
        embeds = self.assemble(image_values, text_values, layout)
        layout = layout.to(embeds.device)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=layout.attention_mask,
                                position_ids=layout.position_ids).last_hidden_state
        head = self.llm.get_output_embeddings()
        want_logits = labels is None if return_logits is None else return_logits
        logits = head(hidden) if want_logits else None
        if labels is None:
            return ServerOutput(None, logits, 0)
        if labels.shape != layout.kinds.shape:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the layout {layout.shape}")
        target = labels[:, 1:].to(embeds.device)
        keep = target != IGNORE_INDEX
        n_tokens = int(keep.sum())
        pred = logits[:, :-1][keep] if logits is not None else head(hidden[:, :-1][keep])
        weights = None if loss_average == "token" else label_weights(target, loss_average)[keep]
        loss = lm_loss(pred, target[keep], weights)
        return ServerOutput(loss, logits, n_tokens)

    # --- generation ---------------------------------------------------------------------------------------

    def prefill(self, image_values: torch.Tensor, text_values: torch.Tensor,
                layout: Layout) -> tuple[torch.Tensor, DynamicCache]:
        """Run the (left-padded) prompt; -> (logits of the next token (B, V), KV cache)."""
        if not layout.left_padded:
            raise ValueError("generation needs left padding: some row ends with a pad position")
        embeds = self.assemble(image_values, text_values, layout)
        layout = layout.to(embeds.device)
        cache = DynamicCache(config=self.llm.config)
        out = self.llm.model(inputs_embeds=embeds, attention_mask=layout.attention_mask,
                             position_ids=layout.position_ids, cache=cache, use_cache=True)
        return self.llm.get_output_embeddings()(out.last_hidden_state[:, -1]), out.cache

    def extend(self, text_values: torch.Tensor, cache: DynamicCache,
               layout: Layout) -> tuple[torch.Tensor, DynamicCache]:
        """Feed k new text rows per sequence; -> (logits of the next token (B, V), cache).

        text_values: (B*k, d_code) row-major. layout: the sequence so far, either with the k new text columns
        already appended (`layout.append_text(k)`) or without them (they are then appended here); the cache
        length tells the two apart.
        """
        b, t = layout.shape
        if text_values.shape[0] % b:
            raise ValueError(f"{text_values.shape[0]} new text rows do not split over {b} sequences")
        k = text_values.shape[0] // b
        past = cache.get_seq_length()
        if t == past:
            layout = layout.append_text(k)
            t += k
        if past + k != t:
            raise ValueError(f"layout has {t} positions, cache holds {past} and {k} new rows were sent")
        if not bool(layout.text_mask[:, t - k:].all()):
            raise ValueError(f"the last {k} layout columns must be text")
        dtype = self.llm.get_output_embeddings().weight.dtype
        embeds = self.text_codec(text_values).to(dtype).reshape(b, k, self.hidden_size)
        layout = layout.to(embeds.device)
        out = self.llm.model(inputs_embeds=embeds, attention_mask=layout.attention_mask,
                             position_ids=layout.position_ids[:, t - k:], cache=cache, use_cache=True)
        return self.llm.get_output_embeddings()(out.last_hidden_state[:, -1]), out.cache

    # --- save / load --------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (decoder, LM head, server codecs) to `path`."""
        path = Path(path)
        meta = _meta("server", self.cfg, llm_config=self.llm.config.to_dict(),
                     base_weights=_base_meta(self.base_weights),
                     adapter=ADAPTER_DIR if self.peft_model is not None else "")
        _save(self, path, meta, self.base_weights)
        if self.peft_model is not None:
            self.peft_model.save_pretrained(str(path / ADAPTER_DIR), save_embedding_layers=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ServerPart":
        """Rebuild a server part from a folder written by `save_pretrained` (and the pretrained folder it names, if
        any, with its LoRA adapters from `adapter/`)."""
        path = Path(path)
        meta = _load_meta(path, "server")
        cfg = from_dict(meta["config"], base=Config())
        llm_cfg = meta["llm_config"]
        model_type = llm_cfg.get("model_type", "")
        if model_type not in LLM_KINDS:
            raise ValueError(f"{path / CONFIG_NAME}: unknown LLM model_type {model_type!r}")
        base = _check_base(path, meta.get("base_weights", {}), ("llm",))
        if "llm" in base:
            llm = build_llm(_llm_at(cfg.llm, base["llm"]), int(llm_cfg["vocab_size"]))
        else:
            # The random table built here is dropped by the constructor at once; only the head and decoder load.
            llm = llm_from_hf_config(LLM_KINDS[model_type].config_class.from_dict(llm_cfg))
        part = cls(cfg, llm)
        part.base_weights = base
        if meta.get("adapter"):
            adapter = path / meta["adapter"]
            if not (adapter / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{adapter}: the LoRA adapter this part names is missing")
            part.enable_lora(cfg.llm.lora, adapter=adapter)
        _load_weights(part, path)
        return part


# --- factory --------------------------------------------------------------------------------------------------


def build_parts(cfg: Config, vocab_size: int, image_token_id: int,
                dtype: torch.dtype | None = None) -> tuple[ClientPart, ServerPart]:
    """Build both parts: random from the config sizes, or from the local folders in `vision.pretrained` and
    `llm.pretrained` (loaded in `dtype`, default torch's default dtype).

    The LLM's input-embedding table moves to the client; a tied LM head is untied (the server keeps a copy).
    """
    tower = build_vision_tower(cfg.vision, dtype)
    llm = build_llm(cfg.llm, vocab_size, dtype)
    embed = llm.get_input_embeddings()
    dim = int(llm.config.hidden_size)
    image_client, image_server = build_codec(cfg.compress.image, dim)
    text_client, text_server = build_codec(cfg.compress.text, dim)
    server = ServerPart(cfg, llm, image_server, text_server)
    client = ClientPart(cfg, tower, embed, image_token_id, image_client, text_client)
    if cfg.llm.pretrained:
        server.base_weights = {"llm": cfg.llm.pretrained}
        client.base_weights = {"embed_tokens": cfg.llm.pretrained}
    return client, server


# --- files ----------------------------------------------------------------------------------------------------


def _meta(part: str, cfg: Config, **extra: Any) -> dict[str, Any]:
    return {"format": _FORMAT, "version": _FORMAT_VERSION, "part": part, "config": to_dict(cfg), **extra}


def _llm_at(cfg: LLMConfig, folder: str) -> LLMConfig:
    return LLMConfig(kind=cfg.kind, pretrained=folder, package=cfg.package)


def _base_meta(base: dict[str, str]) -> dict[str, dict[str, str]]:
    return {name: {"folder": str(folder), "fingerprint": folder_fingerprint(folder)} for name, folder in base.items()}


def _check_base(path: Path, meta: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, str]:
    """The pretrained folders a saved part names, each checked to exist and to be the folder it was saved with."""
    out = {}
    for name, entry in meta.items():
        if name not in allowed:
            raise ValueError(f"{path / CONFIG_NAME}: unknown base_weights entry {name!r}")
        folder = Path(entry["folder"])
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path}: keeps its {name} weights by reference to the pretrained folder "
                                    f"{str(folder)!r}, which does not exist here (convert or copy it there first)")
        if folder_fingerprint(folder) != entry["fingerprint"]:
            raise ValueError(f"{path}: its {name} weights come from {str(folder)!r}, but that folder now holds "
                             "different weights than when the part was saved")
        out[name] = str(folder)
    return out


def saved_weights(path: str | Path, part: str) -> tuple[dict[str, str], dict[str, torch.Tensor] | None]:
    """What a part folder holds itself: (submodule -> pretrained folder it keeps by reference, its own tensors by
    parameter name), or None for the tensors when it also has LoRA adapters (load those with `from_pretrained`)."""
    path = Path(path)
    meta = _load_meta(path, part)
    base = _check_base(path, meta.get("base_weights", {}), ("embed_tokens",) if part == "client" else ("llm",))
    return base, None if meta.get("adapter") else load_file(str(path / WEIGHTS_NAME))


def _plain(key: str) -> str:
    """A parameter's name without the `base_layer` level that LoRA injection adds."""
    return key.replace(".base_layer.", ".")


def _by_reference(key: str, base: dict[str, str]) -> bool:
    return "lora_" in key or key.split(".")[0] in base


def _save(module: nn.Module, path: Path, meta: dict[str, Any], base: dict[str, str]) -> None:
    """config.json + model.safetensors: every weight but those kept by reference (`base`) and LoRA adapters."""
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    own = {_plain(k): v.detach().contiguous() for k, v in module.state_dict().items() if not _by_reference(k, base)}
    save_file(own, str(path / WEIGHTS_NAME), metadata={"format": "pt", "qtllava_part": meta["part"]})


def _load_weights(part: nn.Module, path: Path) -> None:
    """Load `model.safetensors` into `part`; every weight not kept by reference must be there, except the fsq
    decoders' `out_scale` buffers, which checkpoints written before they existed lack (they keep 1)."""
    saved = load_file(str(path / WEIGHTS_NAME))
    names = {_plain(k): k for k in part.state_dict() if not _by_reference(k, part.base_weights)}
    missing = [k for k in names if k not in saved and not k.endswith("codec.out_scale")]
    unexpected = [k for k in saved if k not in names]
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_NAME}: weights do not match the configuration: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    part.load_state_dict({names[k]: v for k, v in saved.items()}, strict=False)


def _load_meta(path: Path, part: str) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} not found: not a saved qtllava {part} part")
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{str(path / WEIGHTS_NAME)!r} not found")
    meta = json.loads(file.read_text())
    if meta.get("format") != _FORMAT or meta.get("part") != part:
        raise ValueError(f"{str(file)!r} is not a qtllava {part} part (format {meta.get('format')!r}, "
                         f"part {meta.get('part')!r})")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{str(file)!r}: part format version {meta.get('version')} not supported "
                         f"(expected {_FORMAT_VERSION})")
    return meta
