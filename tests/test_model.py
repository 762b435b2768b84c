"""Model parts: split == unsplit (transformers LLaVA), save/load, splice, layout wire form, greedy generation."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import (CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration, Qwen2ForCausalLM,
                          SiglipVisionModel)

from qtllava.config import preset
from qtllava.model import (IGNORE_INDEX, ClientPart, Layout, ServerPart, VisionTower, build_parts, greedy_generate)
from qtllava.model.llm import llm_hf_config
from qtllava.model.vision import vision_hf_config

VOCAB = 97
IMG = 3  # image token id
PAD_ID = 0


def micro_cfg(dtype: str = "fp32"):
    cfg = preset("micro")
    cfg.compress.image.dtype = dtype
    cfg.compress.text.dtype = dtype
    return cfg


def make_parts(cfg=None, seed: int = 0):
    torch.manual_seed(seed)
    return build_parts(cfg or micro_cfg(), VOCAB, IMG)


def make_batch(lengths: list[tuple[int, bool, int]], n_img_tokens: int, image_size: int, left: bool, seed: int = 1):
    """lengths: per row (text tokens before the image, has image, text tokens after). Pads on the left or right."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for before, has_img, after in lengths:
        ids = torch.randint(4, VOCAB, (before,), generator=g).tolist()
        if has_img:
            ids += [IMG] * n_img_tokens
        ids += torch.randint(4, VOCAB, (after,), generator=g).tolist()
        rows.append(ids)
    t = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), t), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    n_img = sum(1 for _, h, _ in lengths if h)
    pixels = torch.randn(n_img, 3, image_size, image_size, generator=g) if n_img else None
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def split_step(client: ClientPart, server: ServerPart, batch, labels):
    """Forward + backward as over a network: the server differentiates w.r.t. leaves it rebuilt from packets."""
    sent = client(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    img, txt = server.dequantize(sent.image.packet, sent.text.packet)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    out = server(img, txt, sent.layout, labels)
    out.loss.backward()
    torch.autograd.backward([sent.image.values, sent.text.values], [img.grad, txt.grad])
    return out


# --- split == unsplit ---------------------------------------------------------------------------------------


def llava_from_parts(client: ClientPart, server: ServerPart) -> LlavaForConditionalGeneration:
    cfg = LlavaConfig(vision_config=client.vision_tower.model.config.to_dict(),
                      text_config=server.llm.config.to_dict(), image_token_id=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy="full", projector_hidden_act="gelu")
    cfg.vision_config._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    llava = LlavaForConditionalGeneration(cfg)
    m = llava.model
    m.vision_tower.load_state_dict(client.vision_tower.model.state_dict())
    m.multi_modal_projector.linear_1.load_state_dict(client.connector[0].state_dict())
    m.multi_modal_projector.linear_2.load_state_dict(client.connector[2].state_dict())
    lm_state = {k: v for k, v in server.llm.model.state_dict().items()}
    lm_state["embed_tokens.weight"] = client.embed_tokens.weight.detach().clone()
    m.language_model.load_state_dict(lm_state)
    llava.lm_head.load_state_dict(server.llm.lm_head.state_dict())
    return llava


def test_split_equals_llava():
    cfg = micro_cfg("fp32")
    client, server = make_parts(cfg)
    n_tok = cfg.vision.num_image_tokens
    # row 0: image; row 1: text only; row 2: image, shorter (right-padded)
    batch = make_batch([(2, True, 6), (5, False, 9), (1, True, 3)], n_tok, cfg.vision.image_size, left=False)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    labels[labels == IMG] = IGNORE_INDEX
    labels[:, :2] = IGNORE_INDEX

    llava = llava_from_parts(client, server)
    ref = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], labels=labels)
    ref.loss.backward()

    out = split_step(client, server, batch, labels)
    assert out.n_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)

    pairs = []
    ref_vt = dict(llava.model.vision_tower.named_parameters())
    pairs += [(p, ref_vt[n], "vision." + n) for n, p in client.vision_tower.model.named_parameters()]
    proj = llava.model.multi_modal_projector
    pairs += [(client.connector[0].weight, proj.linear_1.weight, "connector.0"),
              (client.connector[2].weight, proj.linear_2.weight, "connector.2"),
              (client.connector[0].bias, proj.linear_1.bias, "connector.0.bias")]
    pairs.append((client.embed_tokens.weight, llava.model.language_model.embed_tokens.weight, "embed_tokens"))
    ref_lm = dict(llava.model.language_model.named_parameters())
    pairs += [(p, ref_lm[n], "llm." + n) for n, p in server.llm.model.named_parameters()]
    pairs.append((server.llm.lm_head.weight, llava.lm_head.weight, "lm_head"))
    n_checked = 0
    for ours, theirs, name in pairs:
        a = torch.zeros_like(ours) if ours.grad is None else ours.grad
        b = torch.zeros_like(theirs) if theirs.grad is None else theirs.grad
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        n_checked += ours.grad is not None
    assert n_checked > 20
    assert client.embed_tokens.weight.grad.abs().sum() > 0


def test_loss_only_path_equals_full_logits():
    client, server = make_parts()
    cfg = client.cfg
    batch = make_batch([(2, True, 4), (3, True, 1)], cfg.vision.num_image_tokens, cfg.vision.image_size, left=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    with torch.no_grad():
        sent = client(**batch)
        n_text = int(((batch["input_ids"] != IMG) & (batch["attention_mask"] == 1)).sum())
        assert sent.text.packet.shape == (n_text, cfg.llm.hidden_size)  # pad rows are never sent
        assert sent.image.packet.shape == (2 * cfg.vision.num_image_tokens, cfg.llm.hidden_size)
        a = server(sent.image.values, sent.text.values, sent.layout, labels)
        b = server(sent.image.values, sent.text.values, sent.layout, labels, return_logits=True)
    assert a.logits is None and b.logits.shape == (2, labels.shape[1], VOCAB)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)


# --- parts, save / load -------------------------------------------------------------------------------------


def test_server_owns_no_embedding_table_and_tied_head_is_untied():
    cfg = micro_cfg()
    cfg.llm.tie_word_embeddings = True
    client, server = make_parts(cfg)
    assert not any("embed_tokens" in k for k in server.state_dict())
    assert not any("lm_head" in k for k in client.state_dict())
    assert server.llm.lm_head.weight is not client.embed_tokens.weight
    torch.testing.assert_close(server.llm.lm_head.weight, client.embed_tokens.weight)
    with pytest.raises(RuntimeError, match="no token-embedding table"):
        server.llm.get_input_embeddings()(torch.tensor([1]))


def test_save_load_round_trip(tmp_path):
    cfg = micro_cfg("fp16")
    client, server = make_parts(cfg)
    batch = make_batch([(2, True, 4), (3, False, 2)], cfg.vision.num_image_tokens, cfg.vision.image_size,
                       left=True)
    client.save_pretrained(tmp_path / "client")
    server.save_pretrained(tmp_path / "server")
    for part in ("client", "server"):
        assert sorted(p.name for p in (tmp_path / part).iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "client" / "model.safetensors"), "pt") as f:
        ckeys = list(f.keys())
    with safe_open(str(tmp_path / "server" / "model.safetensors"), "pt") as f:
        skeys = list(f.keys())
    assert any("embed_tokens" in k for k in ckeys) and not any("lm_head" in k for k in ckeys)
    assert any("lm_head" in k for k in skeys) and not any("embed_tokens" in k for k in skeys)

    client2 = ClientPart.from_pretrained(tmp_path / "client")
    server2 = ServerPart.from_pretrained(tmp_path / "server")
    assert client2.image_token_id == IMG and client2.cfg == client.cfg
    with torch.no_grad():
        s1, s2 = client(**batch), client2(**batch)
        assert s1.image.packet == s2.image.packet and s1.text.packet == s2.text.packet
        v = server.dequantize(s1.image.packet, s1.text.packet)
        torch.testing.assert_close(server(*v, s1.layout).logits, server2(*v, s1.layout).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a qtllava server part"):
        ServerPart.from_pretrained(tmp_path / "client")


def test_towers_match_hf_hidden_states_and_clip_drops_cls():
    for kind in ("siglip", "clip"):
        cfg = micro_cfg().vision
        cfg.kind = kind
        torch.manual_seed(0)
        tower = VisionTower(cfg)
        x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
        feats = tower(x)
        assert feats.shape == (2, cfg.num_image_tokens, cfg.hidden_size)
        hs = tower.model(x, output_hidden_states=True).hidden_states[cfg.select_layer]
        expected = hs[:, 1:] if kind == "clip" else hs
        assert hs.shape[1] == cfg.num_image_tokens + (kind == "clip")
        torch.testing.assert_close(feats, expected, atol=0, rtol=0)


def test_token_count_mismatch_raises():
    cfg = micro_cfg().vision
    with pytest.raises(ValueError, match="tokens per image"):
        VisionTower(cfg, SiglipVisionModel(vision_hf_config(
            type(cfg)(image_size=cfg.image_size * 2, patch_size=cfg.patch_size, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=2))))


def test_splice_count_mismatch_raises():
    client, _ = make_parts()
    n = client.cfg.vision.num_image_tokens
    batch = make_batch([(2, True, 3)], n, client.cfg.vision.image_size, left=True)
    ids = batch["input_ids"].clone()
    ids[0, ids[0] == IMG] = 5
    ids[0, 2:2 + n - 1] = IMG  # one image-token position short
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        client.embed(ids, batch["pixel_values"])
    with pytest.raises(ValueError, match="do not match"):
        client(batch["input_ids"], batch["attention_mask"], None)


def test_missing_pretrained_folder_is_named(tmp_path):
    cfg = micro_cfg()
    cfg.vision.pretrained = str(tmp_path / "no-such-tower")
    with pytest.raises(FileNotFoundError, match="no-such-tower"):
        build_parts(cfg, VOCAB, IMG)
    cfg = micro_cfg()
    cfg.llm.pretrained = str(tmp_path / "no-such-llm")
    with pytest.raises(FileNotFoundError, match="no-such-llm"):
        build_parts(cfg, VOCAB, IMG)


def test_build_from_local_pretrained_folders(tmp_path):
    cfg = micro_cfg()
    cfg.llm.tie_word_embeddings = True
    torch.manual_seed(3)
    SiglipVisionModel(vision_hf_config(cfg.vision)).save_pretrained(tmp_path / "tower")
    llm = Qwen2ForCausalLM(llm_hf_config(cfg.llm, VOCAB))
    llm.save_pretrained(tmp_path / "llm")
    cfg.vision.pretrained = str(tmp_path / "tower")
    cfg.llm.pretrained = str(tmp_path / "llm")
    client, server = build_parts(cfg, VOCAB + 2, IMG)  # the tokenizer grew by two tokens: table is resized
    assert client.vocab_size == VOCAB + 2 and server.vocab_size == VOCAB + 2
    torch.testing.assert_close(client.embed_tokens.weight[:VOCAB], llm.model.embed_tokens.weight)
    torch.testing.assert_close(server.llm.lm_head.weight, client.embed_tokens.weight)
    assert server.llm.lm_head.weight is not client.embed_tokens.weight
    torch.testing.assert_close(server.llm.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)


def test_llama_and_clip_parts_run():
    cfg = micro_cfg()
    cfg.llm.kind = "llama"
    cfg.vision.kind = "clip"
    client, server = make_parts(cfg)
    assert type(server.llm).__name__ == "LlamaForCausalLM"
    assert isinstance(client.vision_tower.model, CLIPVisionModel)
    batch = make_batch([(2, True, 4)], cfg.vision.num_image_tokens, cfg.vision.image_size, left=True)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMG, IGNORE_INDEX)
    out = split_step(client, server, batch, labels)
    assert torch.isfinite(out.loss)


# --- layout -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7), (1, 1), (2, 8), (0, 5), (4, 0), (5, 13)])
def test_layout_bytes_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    lay = Layout(torch.randint(0, 3, shape, generator=g).to(torch.uint8))
    data = lay.to_bytes()
    assert len(data) == (shape[0] * shape[1] + 3) // 4
    assert Layout.from_bytes(data, shape) == lay


def test_layout_bytes_errors_and_positions():
    lay = Layout.from_batch(torch.tensor([[0, 0, 5, IMG, 6], [5, 6, 7, IMG, 8]]),
                            torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), IMG)
    assert lay.kinds.tolist() == [[0, 0, 1, 2, 1], [1, 1, 1, 2, 1]]
    assert lay.position_ids.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    data = lay.to_bytes()
    with pytest.raises(ValueError, match="needs 3 bytes"):
        Layout.from_bytes(data[:-1], lay.shape)
    with pytest.raises(ValueError, match="invalid position kind"):
        Layout.from_bytes(b"\xff\x00\x00", lay.shape)
    with pytest.raises(ValueError, match="padding bits"):
        Layout.from_bytes(data[:-1] + b"\xc0", lay.shape)


# --- generation ---------------------------------------------------------------------------------------------

GEN_ROWS = [(2, True, 5), (1, False, 3), (4, True, 1)]


def test_left_padded_generation_equals_unpadded():
    client, server = make_parts(micro_cfg("fp16"))
    cfg = client.cfg
    n, size = cfg.vision.num_image_tokens, cfg.vision.image_size
    batch = make_batch(GEN_ROWS, n, size, left=True)
    together = greedy_generate(client, server, batch, max_new_tokens=6, eos_token_id=None)
    img_idx = 0
    for i, row in enumerate(GEN_ROWS):
        keep = batch["attention_mask"][i] == 1
        pix = None
        if row[1]:
            pix = batch["pixel_values"][img_idx:img_idx + 1]
            img_idx += 1
        single = {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": None, "pixel_values": pix}
        assert greedy_generate(client, server, single, max_new_tokens=6) == [together[i]]
    assert all(len(r) == 6 for r in together)
    # eos: stop row 0 at its third token (excluded from the output); other rows may stop early too
    eos = together[0][2]
    stopped = greedy_generate(client, server, batch, max_new_tokens=6, eos_token_id=eos)
    assert stopped[0] == together[0][:2]
    for full, cut in zip(together, stopped):
        assert cut == (full[:full.index(eos)] if eos in full else full)


def test_kv_cache_equals_full_recompute():
    client, server = make_parts(micro_cfg("fp32"))
    cfg = client.cfg
    batch = make_batch(GEN_ROWS, cfg.vision.num_image_tokens, cfg.vision.image_size, left=True)
    steps = 4
    with torch.no_grad():
        # cached: prefill + extend
        sent = client(**batch)
        logits, cache = server.prefill(sent.image.values, sent.text.values, sent.layout)
        layout, cached = sent.layout, [logits]
        for step in range(steps - 1):
            new = client.embed_text_rows(cached[-1].argmax(-1))
            if step % 2:  # the server accepts the layout with or without the new column
                logits, cache = server.extend(new.values, cache, layout)
                layout = layout.append_text()
            else:
                layout = layout.append_text()
                logits, cache = server.extend(new.values, cache, layout)
            cached.append(logits)
        assert cache.get_seq_length() == layout.shape[1] == batch["input_ids"].shape[1] + steps - 1
        # reference: the whole sequence again at each step
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for step in range(steps):
            sent = client(ids, mask, batch["pixel_values"])
            full = server(sent.image.values, sent.text.values, sent.layout).logits[:, -1]
            torch.testing.assert_close(cached[step], full, atol=1e-5, rtol=1e-5)
            nxt = full.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    gen = greedy_generate(client, server, batch, max_new_tokens=steps)
    assert gen == ids[:, -steps:].tolist()


def test_prefill_rejects_right_padding():
    client, server = make_parts()
    cfg = client.cfg
    batch = make_batch(GEN_ROWS, cfg.vision.num_image_tokens, cfg.vision.image_size, left=False)
    with pytest.raises(ValueError, match="left padding"):
        greedy_generate(client, server, batch, max_new_tokens=2)


def test_embed_init_std_sets_the_random_table_only():
    cfg = micro_cfg()
    cfg.llm.embed_init_std = 0.0
    client, _ = make_parts(cfg)
    assert client.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.2)  # transformers' default
    cfg.llm.embed_init_std = 0.5
    client, server = make_parts(cfg)
    assert client.embed_tokens.weight.std().item() == pytest.approx(0.5, rel=0.1)
    head = server.llm.get_output_embeddings().weight
    assert head.std().item() < 0.1  # the (untied) LM head keeps its own initialisation


def test_sincos_position_init_is_a_2d_table():
    from qtllava.model.vision import build_vision_tower, sincos_2d

    table = sincos_2d(4, 16)
    assert table.shape == (16, 16)
    # the first half of the channels depends only on the row, the second half only on the column
    torch.testing.assert_close(table[0, :8], table[3, :8])  # row 0, columns 0 and 3
    torch.testing.assert_close(table[0, 8:], table[12, 8:])  # column 0, rows 0 and 3
    assert not torch.equal(table[0], table[5])
    cfg = micro_cfg()
    cfg.vision.pos_init = "sincos"
    tower = build_vision_tower(cfg.vision)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    torch.testing.assert_close(tower.model.embeddings.position_embedding.weight,
                               sincos_2d(grid, cfg.vision.hidden_size))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 10)


def test_sincos_needs_a_width_divisible_by_4():
    from qtllava.model.vision import build_vision_tower

    cfg = micro_cfg()
    cfg.vision.hidden_size, cfg.vision.num_heads = 30, 2
    with pytest.raises(ValueError, match="vision.pos_init='sincos' needs vision.hidden_size divisible by 4"):
        build_vision_tower(cfg.vision)


def test_connector_position_code(tmp_path):
    """connector.position_dims concatenates a fixed 2-D sine-cosine code, scaled to the features' per-channel
    size, to the tower's features: the connector input is wider, equal patches at different places give different
    rows, and the code is not saved (rebuilt)."""
    from qtllava.model.vision import sincos_2d

    cfg = micro_cfg()
    cfg.connector.position_dims = 8
    client, _ = make_parts(cfg)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    assert client.connector[0].in_features == client.vision_tower.hidden_size + 8
    torch.testing.assert_close(client.image_position, sincos_2d(grid, 8))
    with torch.no_grad():
        feats = client.vision_tower(torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size))
        rows = client.image_features(torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size))
        # the same tower rows through the connector with the code of patch 0 everywhere: only patch 0 agrees
        code = client.image_position[:1].expand(1, feats.shape[1], -1)
        scale = feats.pow(2).mean(-1, keepdim=True).sqrt() / client.image_position.pow(2).mean().sqrt()
        same = client.connector(torch.cat([feats, code * scale], -1))
    torch.testing.assert_close(rows[0, 0], same[0, 0])
    assert not torch.allclose(rows[0, 1:], same[0, 1:])
    client.save_pretrained(tmp_path / "client")
    client2 = ClientPart.from_pretrained(tmp_path / "client")
    torch.testing.assert_close(client2.image_position, client.image_position)
    cfg.connector.position_dims = 6
    with pytest.raises(ValueError, match="position_dims=6 needs a multiple of 4"):
        make_parts(cfg)
