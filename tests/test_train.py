"""Micro-preset training: every stage steps, resume is exact, checkpoints load, the pipeline evaluates."""

import json

import pytest
import torch

from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.train.batches import sample_indices
from qtllava.train.loop import run_stage
from qtllava.train.recipes import lr_at, recipe


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    cfg = load_config("micro")
    return make_data(cfg.data, cfg.vision.image_size, root=tmp_path_factory.mktemp("data"))


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_every_stage_trains_and_chains(data_root, tmp_path):
    cfg = load_config("micro", ["train.stage0.steps=6", "train.stage0.lr=3e-3"])
    r0 = run_stage(cfg, "stage0", data_root, tmp_path / "s0", progress=False)
    losses = _losses(tmp_path / "s0" / "metrics.jsonl")
    assert len(losses) == 6 and all(l == l for l in losses)  # no NaN
    r1 = run_stage(cfg, "stage1", data_root, tmp_path / "s1", init=r0.final, progress=False)
    r2 = run_stage(cfg, "stage2", data_root, tmp_path / "s2", init=r1.final, progress=False)
    assert (r2.final / "client" / "model.safetensors").exists() and (r2.final / "server" / "model.safetensors").exists()
    # Stage 1 trains only connector + codecs: the vision tower and the LLM must be bit-identical to stage 0's.
    from safetensors.torch import load_file

    c0, c1 = (load_file(r / "client" / "model.safetensors") for r in (r0.final, r1.final))
    s0, s1 = (load_file(r / "server" / "model.safetensors") for r in (r0.final, r1.final))
    assert all(torch.equal(c0[k], c1[k]) for k in c0 if k.startswith(("vision_tower", "embed_tokens")))
    assert any(not torch.equal(c0[k], c1[k]) for k in c0 if k.startswith("connector"))
    assert all(torch.equal(s0[k], s1[k]) for k in s0 if k.startswith("llm"))
    # Stage 2 trains the LLM, not the tower.
    c2, s2 = load_file(r2.final / "client" / "model.safetensors"), load_file(r2.final / "server" / "model.safetensors")
    assert all(torch.equal(c1[k], c2[k]) for k in c1 if k.startswith("vision_tower"))
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("llm"))
    rows = [json.loads(l) for l in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["samples_per_s"] > 0 for r in rows)


def test_fresh_fsq_text_decoder_is_fitted_to_the_embedding_scale(data_root, tmp_path):
    """Stage 1 starts its fsq text codec from a least-squares fit on the base's embedding table: the decoded rows
    come back at the table's own scale (a fresh decoder would hand the LLM standardised rows), and a server-only
    process fits the same decoder as a process holding both halves."""
    from qtllava.train.loop import stage_parts

    cfg = load_config("micro", ["train.stage0.steps=2"])
    r0 = run_stage(cfg, "stage0", data_root, tmp_path / "s0", progress=False)
    fsq = [f"compress.{m}.{k}={v}" for m in ("image", "text") for k, v in (("name", '"fsq"'), ("levels", 2))]
    cfg1 = load_config("micro", fsq + [f"compress.{m}.send_stats=false" for m in ("image", "text")])  # the paper's
    _, _, client, server = stage_parts(cfg1, "stage1", data_root, r0.final)
    table = client.embed_tokens.weight.detach()
    with torch.no_grad():
        rows = server.text_codec(client.text_codec(table).values)
    err = float(((rows - table) ** 2).sum() / (table ** 2).sum())
    assert err < 0.5, err
    assert rows.std() == pytest.approx(table.std(), rel=0.5)
    # the fit is stored as out_scale x proj, proj as large as a fresh decoder's, so Adam's steps stay relative
    dec = server.text_codec
    fresh = dec.init_gain * dec.d_code ** 0.5
    assert float(torch.linalg.matrix_norm(dec.proj.weight.detach())) == pytest.approx(fresh, rel=1e-4)
    assert float(dec.out_scale) < 0.2
    _, _, _, server_only = stage_parts(cfg1, "stage1", data_root, r0.final, sides=("server",))
    assert torch.equal(server_only.text_codec.proj.weight, server.text_codec.proj.weight)
    # without the fit (what a fresh decoder does) the rows come back tens of times too large
    _, _, c_raw, s_raw = stage_parts(cfg1, "stage1", data_root, None)
    with torch.no_grad():
        raw = s_raw.text_codec(c_raw.text_codec(table).values)
    assert raw.std() > 5 * table.std()
    # our default sends each row's mean and std: a fresh codec pair already returns the table at its own scale
    _, _, c_st, s_st = stage_parts(load_config("micro", fsq), "stage1", data_root, None)
    with torch.no_grad():
        kept = s_st.text_codec(c_st.text_codec(table).values)
    assert float(kept.std()) == pytest.approx(float(table.std()), rel=0.2)


def test_codec_lr_scale_scales_only_the_codecs(data_root, tmp_path):
    """codec_lr_scale = 0 freezes the fsq maps (both halves) while the connector trains; the groups carry the scale."""
    from safetensors.torch import load_file

    from qtllava.train.loop import stage_parts
    from qtllava.train.recipes import codec_parameters, make_optimizer, set_lr

    cfg0 = load_config("micro", ["train.stage0.steps=2"])
    r0 = run_stage(cfg0, "stage0", data_root, tmp_path / "s0", progress=False)
    fsq = [f"compress.{m}.{k}={v}" for m in ("image", "text") for k, v in (("name", '"fsq"'), ("levels", 4))]
    cfg = load_config("micro", fsq + ["train.stage1.steps=3", "train.stage1.codec_lr_scale=0"])
    _, _, client, server = stage_parts(cfg, "stage1", data_root, r0.final)
    start = {**{f"c.{k}": v.clone() for k, v in client.state_dict().items()},
             **{f"s.{k}": v.clone() for k, v in server.state_dict().items()}}
    r1 = run_stage(cfg, "stage1", data_root, tmp_path / "s1", init=r0.final, progress=False)
    c1 = load_file(r1.final / "client" / "model.safetensors")
    s1 = load_file(r1.final / "server" / "model.safetensors")
    for prefix, got in (("c.", c1), ("s.", s1)):
        codec = [k for k in got if k.startswith(("image_codec", "text_codec"))]
        assert codec and all(torch.equal(got[k], start[prefix + k]) for k in codec), prefix
    assert any(not torch.equal(c1[k], start["c." + k]) for k in c1 if k.startswith("connector"))
    # the groups: scheduled rate x lr_scale; a negative scale is refused
    st = cfg.train.stage1
    st.codec_lr_scale = 0.25
    opt = make_optimizer(list(client.parameters()), st, codec_parameters(client))
    set_lr(opt, 2.0)
    codec_ids = {id(p) for p in codec_parameters(client)}
    for g in opt.param_groups:
        assert g["lr"] == (0.5 if id(g["params"][0]) in codec_ids else 2.0)
        assert len({id(p) in codec_ids for p in g["params"]}) == 1
    st.codec_lr_scale = -1.0
    with pytest.raises(ValueError, match="codec_lr_scale"):
        make_optimizer(list(client.parameters()), st, codec_parameters(client))


def test_loss_decreases_on_a_fixed_batch_budget(data_root, tmp_path):
    cfg = load_config("micro", ["train.stage0.steps=30", "train.stage0.lr=3e-3", "train.checkpoint_every=0"])
    run_stage(cfg, "stage0", data_root, tmp_path / "s0", progress=False)
    losses = _losses(tmp_path / "s0" / "metrics.jsonl")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_resume_continues_exactly(data_root, tmp_path):
    over = ["train.stage0.steps=6", "train.checkpoint_every=3", "train.stage0.grad_accum=2"]
    cfg = load_config("micro", over)
    run_stage(cfg, "stage0", data_root, tmp_path / "full", progress=False)
    run_stage(cfg, "stage0", data_root, tmp_path / "cut", max_steps=4, progress=False)  # "crash" after step 4
    assert not (tmp_path / "cut" / "final").exists()
    run_stage(cfg, "stage0", data_root, tmp_path / "cut", resume=True, progress=False)
    full, cut = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "cut" / "metrics.jsonl")
    assert len(cut) == 6
    assert full == pytest.approx(cut, abs=1e-6)
    from safetensors.torch import load_file

    for side in ("client", "server"):
        a = load_file(tmp_path / "full" / "final" / side / "model.safetensors")
        b = load_file(tmp_path / "cut" / "final" / side / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), side


def test_lora_resume_is_exact_and_saves_the_adapter_with_peft(data_root, tmp_path):
    cfg = load_config("micro", ["train.stage2.steps=4", "train.checkpoint_every=3", 'train.stage2.llm="lora"',
                                "llm.lora.rank=4", "llm.lora.dropout=0.2", 'llm.lora.targets="q_proj,v_proj"'])
    base = run_stage(cfg, "stage0", data_root, tmp_path / "base", progress=False).final
    full = run_stage(cfg, "stage2", data_root, tmp_path / "full", init=base, progress=False)
    run_stage(cfg, "stage2", data_root, tmp_path / "cut", init=base, max_steps=3, progress=False)
    cut = run_stage(cfg, "stage2", data_root, tmp_path / "cut", init=base, resume=True, progress=False)
    losses = [_losses(r.out_dir / "metrics.jsonl") for r in (full, cut)]
    assert len(losses[1]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    from safetensors.torch import load_file

    a, b = (load_file(r.final / "server" / "adapter" / "adapter_model.safetensors") for r in (full, cut))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in a.items())  # the adapters trained
    assert all("q_proj" in k or "v_proj" in k for k in a)
    # the LLM itself did not move: a LoRA stage trains only the adapters (and the codecs)
    before = load_file(base / "server" / "model.safetensors")
    after = load_file(full.final / "server" / "model.safetensors")
    llm = [k for k in before if k.startswith("llm.")]
    assert llm and all(torch.equal(before[k], after[k]) for k in llm)
    from qtllava.model.parts import ServerPart

    part = ServerPart.from_pretrained(full.final / "server")
    assert part.peft_model is not None and part.lora_parameters()


def test_resume_skips_a_damaged_checkpoint_naming_the_file(data_root, tmp_path, caplog):
    over = ["train.stage0.steps=6", "train.checkpoint_every=2"]
    cfg = load_config("micro", over)
    run_stage(cfg, "stage0", data_root, tmp_path / "full", progress=False)
    run_stage(cfg, "stage0", data_root, tmp_path / "cut", max_steps=5, progress=False)
    broken = tmp_path / "cut" / "checkpoints" / "step-000004" / "server" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated, as by a full disk
    with caplog.at_level("WARNING"):
        run_stage(cfg, "stage0", data_root, tmp_path / "cut", resume=True, progress=False)
    assert any(str(broken) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    full, cut = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "cut" / "metrics.jsonl")
    assert len(cut) == 6 and full == pytest.approx(cut, abs=1e-6)  # resumed from step 2, exactly


def test_sampler_is_a_deterministic_stream_of_epochs():
    a = sample_indices(10, 4, 8, seed=1)
    assert a == sample_indices(10, 4, 8, seed=1)
    first_epoch = sample_indices(10, 10, 0, seed=1)
    assert sorted(first_epoch) == list(range(10))
    assert sample_indices(10, 4, 8, seed=1)[:2] == first_epoch[8:10]


def test_schedule_warms_up_then_decays():
    st = load_config("micro").train.stage0
    st.warmup_ratio, st.lr = 0.2, 1.0
    lrs = [lr_at(st, s, 10) for s in range(10)]
    assert lrs[0] < lrs[1] == pytest.approx(1.0) and lrs[-1] < 0.1
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_recipes_freeze_what_the_paper_freezes():
    cfg = load_config("micro")
    assert "vision_tower" not in recipe(cfg, "stage1").client_trainable + recipe(cfg, "stage2").client_trainable
    assert "llm" not in recipe(cfg, "stage1").server_trainable and "llm" in recipe(cfg, "stage2").server_trainable
    assert "connector" in recipe(cfg, "stage1").fresh
    with pytest.raises(KeyError, match="unknown stage"):
        recipe(cfg, "stage9")


def test_pretrained_recipe_freezes_the_llm_until_stage_2_and_the_tuning_is_a_setting():
    cfg = load_config("micro", ['llm.pretrained="some/folder"'])
    s0, s1, s2 = (recipe(cfg, s) for s in ("stage0", "stage1", "stage2"))
    assert {"vision_tower", "connector"} <= set(s0.client_trainable) and s0.llm == "frozen"
    assert "llm" not in s0.server_trainable + s1.server_trainable and "embed_tokens" not in s2.client_trainable
    assert "connector" in s1.fresh and s2.llm == "full" and "llm" in s2.server_trainable
    cfg.train.stage2.llm = "lora"
    assert recipe(cfg, "stage2").llm == "lora" and "llm" not in recipe(cfg, "stage2").server_trainable
    cfg.train.stage2.llm = "half"
    with pytest.raises(ValueError, match="train.stage2.llm"):
        recipe(cfg, "stage2")
    cfg.train.recipe = "scratch"
    cfg.train.stage2.llm = ""
    assert "embed_tokens" in recipe(cfg, "stage2").client_trainable
    # the tower's tuning is a setting too (TinyLLaVA Factory's tune_type_vision_tower)
    assert "vision_tower" not in recipe(cfg, "stage2").client_trainable
    cfg.train.stage2.tower = "full"
    assert recipe(cfg, "stage2").client_trainable[0] == "vision_tower"
    cfg.train.stage0.tower = "frozen"
    assert "vision_tower" not in recipe(cfg, "stage0").client_trainable
    cfg.train.stage2.tower = "half"
    with pytest.raises(ValueError, match="train.stage2.tower"):
        recipe(cfg, "stage2")


def test_pipeline_evaluates_with_baselines(data_root, tmp_path):
    from qtllava.pipeline import run_pipeline

    cfg = load_config("micro")
    result = run_pipeline(cfg, tmp_path / "run", data_root=data_root, progress=False)
    assert set(result["eval"]) == {"soc-vqa", "soc-mc", "glyph-vqa", "shape-pope", "shape-mme"}
    for r in result["eval"].values():
        assert {"ours", "chance", "majority"} <= set(r)
    assert "chance" in result["eval_table"] and (tmp_path / "run" / "eval.json").exists()


def test_pipeline_warm_start_is_stage_zeros_init(data_root, tmp_path):
    """`warm_start` (a curriculum's first model) replaces stage 0's fresh weights; with `base` it is refused."""
    from safetensors.torch import load_file

    from qtllava.pipeline import run_pipeline

    cfg = load_config("micro", ["train.stage0.steps=2", "train.stage0.lr=3e-3"])
    warm = run_stage(cfg, "stage0", data_root, tmp_path / "warm", progress=False).final
    frozen = load_config("micro", ["train.stage0.steps=1", "train.stage0.lr=0", "train.stage0.weight_decay=0",
                                   "train.stage1.steps=1", "train.stage2.steps=1"])
    run_pipeline(frozen, tmp_path / "run", data_root=data_root, evaluate=False, progress=False, warm_start=warm)
    w, s = (load_file(d / "server" / "model.safetensors") for d in (warm, tmp_path / "run" / "stage0" / "final"))
    assert w.keys() == s.keys() and all(torch.equal(w[k], s[k]) for k in w)  # lr 0: stage 0 kept the warm start
    fresh = load_file(run_stage(frozen, "stage0", data_root, tmp_path / "fresh", progress=False).final
                      / "server" / "model.safetensors")
    assert not all(torch.equal(w[k], fresh[k]) for k in w)
    with pytest.raises(ValueError, match="warm_start"):
        run_pipeline(frozen, tmp_path / "both", data_root=data_root, evaluate=False, progress=False,
                     base=warm, warm_start=warm)


def test_resume_drops_a_half_written_metrics_row_and_names_a_bad_one(tmp_path):
    """A process killed inside a metrics write leaves a torn last row; resuming drops it (and the rows at or after
    the checkpoint). A bad complete row is an error naming the file and line."""
    from qtllava.train.accounting import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics row"):
        truncate_metrics(path, 2)


def test_codecs_from_stage_2_send_fp16_in_stage_1_and_fit_the_image_decoder(data_root, tmp_path):
    """compress.first_stage = 2: stage 1 sends fp16 identity rows both ways; stage 2 starts fresh fsq codecs and fits
    the image decoder on the trained connector's rows, so a one-bit round trip returns them far better than the
    identity decoder does; a process with one half refuses the stage; other values are refused."""
    from qtllava.compress.identity import IdentityEncoder
    from qtllava.train.batches import stage_batches
    from qtllava.train.loop import stage_parts

    cfg0 = load_config("micro", ["train.stage0.steps=2", "train.stage1.steps=2"])
    r0 = run_stage(cfg0, "stage0", data_root, tmp_path / "s0", progress=False)
    fsq = [f"compress.{m}.{k}={v}" for m in ("image", "text") for k, v in (("name", '"fsq"'), ("levels", 2),
                                                                         ("coder", '"ans"'))]
    cfg = load_config("micro", fsq + ["train.stage1.steps=2", "train.stage2.steps=2", "compress.first_stage=2"])
    _, _, c1, _ = stage_parts(cfg, "stage1", data_root, r0.final)
    assert isinstance(c1.image_codec, IdentityEncoder) and isinstance(c1.text_codec, IdentityEncoder)
    r1 = run_stage(cfg, "stage1", data_root, tmp_path / "s1", init=r0.final, progress=False)
    row = json.loads((tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()[0])
    _, tok, client, server = stage_parts(cfg, "stage2", data_root, r1.final)
    assert float(server.image_codec.out_scale) != 1.0  # fitted, not the fresh identity
    pixels = stage_batches(cfg, "stage2", data_root, tok)(100)[0]["pixel_values"]
    with torch.no_grad():
        x = client.image_features(pixels).reshape(-1, client.hidden_size)
        fitted = server.image_codec(client.image_codec(x).values)
        _, _, c_id, s_id = stage_parts(load_config("micro", fsq + ["train.stage2.steps=2"]), "stage2", data_root,
                                       r1.final)
        plain = s_id.image_codec(c_id.image_codec(x).values)
    err = lambda y: float(((y - x) ** 2).sum() / (x ** 2).sum())  # noqa: E731
    assert err(fitted) < 0.8 * err(plain), (err(fitted), err(plain))
    r2 = run_stage(cfg, "stage2", data_root, tmp_path / "s2", init=r1.final, progress=False)
    up2 = json.loads((tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()[0])["bytes_up"]
    assert up2 < row["bytes_up"] / 4 and r2.final.exists()  # stage 1 sent fp16, stage 2 one-bit codes
    with pytest.raises(ValueError, match="one process"):
        stage_parts(cfg, "stage2", data_root, r1.final, sides=("server",))
    with pytest.raises(ValueError, match="first_stage"):
        stage_parts(load_config("micro", ["compress.first_stage=0"]), "stage1", data_root, r0.final)


def test_eval_answers_a_question_file_from_its_own_image_folder_and_a_two_process_folder(data_root, tmp_path):
    """`qtllava eval --questions Q --image-folder DIR --answers A` needs neither the data root nor a tokenizer
    beside it (the final folder carries its tokenizer and configuration), and takes a two-process run's stage
    folder (client/final/client + server/final/server) as it takes an in-process final folder."""
    import shutil

    from qtllava.cli import main

    cfg = load_config("micro", ["train.stage0.steps=2"])
    final = run_stage(cfg, "stage0", data_root, tmp_path / "s0", progress=False).final
    assert (final / "tokenizer" / "tokenizer.json").is_file()
    lines = [json.loads(x) for x in (data_root / "suites" / "soc-vqa" / "questions.jsonl").read_text().splitlines()]
    pics = tmp_path / "my pictures"
    pics.mkdir()
    with (tmp_path / "q.jsonl").open("w") as f:
        for i, q in enumerate(lines[:3]):
            shutil.copy(data_root / "images" / q["image"], pics / f"photo{i}.png")
            f.write(json.dumps({"question_id": f"q{i}", "image": f"photo{i}.png", "text": q["text"]}) + "\n")
    split = tmp_path / "two-process"
    shutil.copytree(final / "client", split / "client" / "final" / "client")
    shutil.copytree(final / "tokenizer", split / "client" / "final" / "tokenizer")
    shutil.copytree(final / "server", split / "server" / "final" / "server")
    answers = []
    for checkpoint in (final, split):
        out = tmp_path / f"{checkpoint.name}.jsonl"
        assert main(["eval", "--config", "micro", "--data", str(tmp_path / "no-such-root"), "--checkpoint",
                     str(checkpoint), "--questions", str(tmp_path / "q.jsonl"), "--image-folder", str(pics),
                     "--answers", str(out)]) == 0
        answers.append([json.loads(x) for x in out.read_text().splitlines()])
    texts = [[(a["question_id"], a["text"]) for a in run] for run in answers]
    assert [q for q, _ in texts[0]] == ["q0", "q1", "q2"] and texts[0] == texts[1]
