"""qtllava.data: generator, suites, tokenizer, templates, LLaVA-JSON dataset and collate (micro sizes)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qtllava.config import DataConfig, preset
from qtllava.data import (IGNORE_INDEX, SUITES, DataError, EvalQuestions, LlavaDataset, Template, collate,
                          get_template, image_token_id, load_answers, load_meta, load_questions, load_tokenizer,
                          make_data, read_manifest, register_template, resolve_tokenizer, suite_size,
                          train_tokenizer)
from qtllava.data.questions import LETTERS, MC_INSTRUCTION, MME_SUBTASKS, POPE_SPLITS
from qtllava.data.world import SHAPE_COLORS, SHAPES, SOC_COLORS

S = 16  # micro image size
N_IMG = 16  # micro image tokens (16 px / 4 px patches)


def micro_cfg(**kw) -> DataConfig:
    cfg = preset("micro").data
    return dataclasses.replace(cfg, n_caption=24, n_instruct=32, n_val=8, n_per_suite=12, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_data(micro_cfg(), S, root=tmp_path_factory.mktemp("data") / "micro")


@pytest.fixture(scope="module")
def tok(root):
    return load_tokenizer(root / "tokenizer")


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


# --- generator ---------------------------------------------------------------------------------------------


def test_layout(root):
    for name in ("captions.json", "instruct_train.json", "instruct_val.json", "manifest.json", "scenes.jsonl",
                 "tokenizer/tokenizer.json"):
        assert (root / name).is_file(), name
    for s in SUITES:
        for name in ("questions.jsonl", "answers.jsonl", "meta.json"):
            assert (root / "suites" / s / name).is_file()
    caps = json.loads((root / "captions.json").read_text())
    train = json.loads((root / "instruct_train.json").read_text())
    val = json.loads((root / "instruct_val.json").read_text())
    assert (len(caps), len(train), len(val)) == (24, 32, 8)
    for rec in caps + train + val:
        im = Image.open(root / "images" / rec["image"])
        assert im.size == (S, S) and im.mode == "RGB"
        assert rec["conversations"][0]["value"].startswith("<image>\n")
    # the instruction corpus is multi-turn and uses every prompt format
    assert sum(len(r["conversations"]) >= 4 for r in train) >= len(train) // 2
    text = "\n".join(t["value"] for r in train for t in r["conversations"])
    for marker in ("Answer with one word.", "Please answer yes or no.", MC_INSTRUCTION, "What word is written in",
                   "closest to", "How many objects"):
        assert marker in text, marker


def test_determinism(root, tmp_path):
    again = make_data(micro_cfg(), S, root=tmp_path / "again")
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    assert a == b  # identical JSON, PNG bytes and tokenizer
    assert read_manifest(root)["images"]["sha256"] == read_manifest(again)["images"]["sha256"]
    other = make_data(micro_cfg(seed=1), S, root=tmp_path / "other")
    c = _files(other)
    assert c["captions.json"] != a["captions.json"]
    assert c["suites/soc-vqa/questions.jsonl"] != a["suites/soc-vqa/questions.jsonl"]
    assert read_manifest(other)["images"]["sha256"] != read_manifest(root)["images"]["sha256"]


def test_cache(tmp_path):
    cfg = micro_cfg()
    r = make_data(cfg, S, root=tmp_path / "d")
    stamp = (r / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert make_data(cfg, S, root=r) == r
    assert time.perf_counter() - t0 < 1.0
    assert (r / "manifest.json").stat().st_mtime_ns == stamp  # not regenerated
    make_data(dataclasses.replace(cfg, n_val=4), S, root=r)  # other settings: regenerated
    assert len(json.loads((r / "instruct_val.json").read_text())) == 4
    assert len(list((r / "images" / "instruct_val").glob("*.png"))) == 4  # stale images removed
    (r / "captions.json").write_text("[]")  # a hand edit: refused, never overwritten silently
    with pytest.raises(DataError, match="captions.json: edited_data: changed since the data was generated") as e:
        make_data(dataclasses.replace(cfg, n_val=4), S, root=r)
    assert "--force" in str(e.value) and (r / "captions.json").read_text() == "[]"
    make_data(dataclasses.replace(cfg, n_val=4), S, root=r, force=True)
    assert len(json.loads((r / "captions.json").read_text())) == 24


def test_mc_fraction_asks_every_kind_as_multiple_choice(root, tmp_path):
    """data.mc_fraction = 1: every question turn, of every scene kind, comes with lettered options and one of their
    letters for answer; the manifest records the setting, and the default data's manifest carries none (so data made
    before the knob stays valid)."""
    from qtllava.data.questions import CAPTION_PROMPTS, LETTERS, MC_INSTRUCTION

    r = make_data(micro_cfg(mc_fraction=1.0), S, root=tmp_path / "mc")
    assert json.loads((r / "manifest.json").read_text())["settings"]["mc_fraction"] == 1.0
    assert "mc_fraction" not in json.loads((root / "manifest.json").read_text())["settings"]
    kinds = set()
    for rec in json.loads((r / "instruct_train.json").read_text()):
        conv = rec["conversations"]
        humans = [q["value"].replace("<image>\n", "") for q in conv[0::2]]
        for i, (text, a) in enumerate(zip(humans, conv[1::2])):
            if text in CAPTION_PROMPTS:
                continue
            if i + 1 < len(humans) and humans[i + 1].startswith(text.split("\n")[0] + "\n"):
                continue  # the free-form half of a paired Sort-of-CLEVR lead: its multiple-choice form follows
            assert text.endswith(MC_INSTRUCTION), text
            options = [line[3:] for line in text.split("\n") if line[:1] in LETTERS and line[1:3] == ". "]
            assert len(options) >= 2 and a["value"] in LETTERS[:len(options)], text
            if text.startswith("What word is written in"):
                kinds.add("glyph word")
            if text.startswith("Is there"):
                kinds.add("existence yes/no")
    assert kinds == {"glyph word", "existence yes/no"}  # not only Sort-of-CLEVR questions
    with pytest.raises(ValueError, match="mc_fraction"):
        make_data(micro_cfg(mc_fraction=1.5), S, root=tmp_path / "bad")


def test_mc_max_options_caps_the_training_options_only(root, tmp_path):
    """data.mc_max_options = 2: every lettered turn of the instruction corpus has two options, the right one among
    them, while the soc-mc suite keeps its 2-5 options; the manifest records the setting."""
    from qtllava.data.questions import LETTERS, MC_INSTRUCTION

    r = make_data(micro_cfg(mc_fraction=0.5, mc_max_options=2), S, root=tmp_path / "mc2")
    assert json.loads((r / "manifest.json").read_text())["settings"]["mc_max_options"] == 2
    assert "mc_max_options" not in json.loads((root / "manifest.json").read_text())["settings"]
    counts = []
    for rec in json.loads((r / "instruct_train.json").read_text()):
        conv = rec["conversations"]
        for q, a in zip(conv[0::2], conv[1::2]):
            if q["value"].endswith(MC_INSTRUCTION):
                options = [line for line in q["value"].split("\n") if line[:1] in LETTERS and line[1:3] == ". "]
                counts.append(len(options))
                assert a["value"] in LETTERS[:len(options)]
    assert len(counts) > 10 and set(counts) == {2}
    suite = [json.loads(line) for line in (r / "suites" / "soc-mc" / "answers.jsonl").read_text().splitlines()]
    assert max(len(a["choices"]) for a in suite) > 2
    with pytest.raises(ValueError, match="mc_max_options"):
        make_data(micro_cfg(mc_max_options=6), S, root=tmp_path / "bad")


def test_lookup_records_are_text_only_option_lookups_after_the_tokenizer(root, tmp_path):
    """data.lookup_records = N appends N text-only records of "Which option is w?" turns whose answer is the letter
    of w among the options; the tokenizer, the other records and the suites stay those of the same data without
    them, so a base trained without them can go on with them."""
    r = make_data(micro_cfg(lookup_records=30), S, root=tmp_path / "lkp")
    assert json.loads((r / "manifest.json").read_text())["settings"]["lookup_records"] == 30
    assert "lookup_records" not in json.loads((root / "manifest.json").read_text())["settings"]
    assert (r / "tokenizer" / "tokenizer.json").read_bytes() == (root / "tokenizer" / "tokenizer.json").read_bytes()
    base = json.loads((root / "instruct_train.json").read_text())
    train = json.loads((r / "instruct_train.json").read_text())
    assert train[:len(base)] == base
    lookups = train[len(base):]
    val_base = json.loads((root / "instruct_val.json").read_text())
    val = json.loads((r / "instruct_val.json").read_text())
    assert val[:len(val_base)] == val_base and len(val) > len(val_base)  # in proportion, for the answer probe
    assert len(lookups) == 30 and all("image" not in rec for rec in lookups + val[len(val_base):])
    turns = 0
    for rec in lookups:
        conv = rec["conversations"]
        for q, a in zip(conv[0::2], conv[1::2]):
            lines = q["value"].split("\n")
            assert lines[0].startswith("Which option is ") and lines[-1] == MC_INSTRUCTION
            options = {line[0]: line[3:] for line in lines[1:-1]}
            assert 2 <= len(options) <= 5 and set(options) == set(LETTERS[:len(options)])
            assert options[a["value"]] == lines[0][len("Which option is "):-1]
            turns += 1
    assert turns > 30  # several look-ups per record
    for name in ("captions.json", "suites/soc-mc/questions.jsonl"):
        assert (r / name).read_bytes() == (root / name).read_bytes()
    ds = LlavaDataset.load(r / "instruct_train.json", r / "images", load_tokenizer(r / "tokenizer"), "qwen2", S,
                           4, 160)
    assert len(ds) == len(train) and ds[len(base)]["pixel_values"].shape[0] == 0
    with pytest.raises(ValueError, match="lookup_records"):
        make_data(micro_cfg(lookup_records=-1), S, root=tmp_path / "bad")


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="refusing"):
        make_data(micro_cfg(), S, root=tmp_path)
    assert (tmp_path / "images" / "mine.png").exists()


def test_disjoint_splits(root):
    groups: dict[str, set[str]] = defaultdict(set)
    pixels: dict[str, set[str]] = defaultdict(set)
    for line in (root / "scenes.jsonl").read_text().splitlines():
        s = json.loads(line)
        groups[s["group"]].add(s["signature"])
        pixels[s["group"]].add(hashlib.sha256((root / "images" / s["image"]).read_bytes()).hexdigest())
    assert set(groups) == {"train", "val", *SUITES}
    names = sorted(groups)
    for i, g in enumerate(names):
        for h in names[i + 1:]:
            assert not groups[g] & groups[h], (g, h)
            assert not pixels[g] & pixels[h], (g, h)


def _suite(root, s):
    d = root / "suites" / s
    qs = load_questions(d)
    ans = load_answers(d)
    meta = load_meta(d)
    return qs, ans, meta


@pytest.mark.parametrize("suite", SUITES)
def test_suite_schema(root, suite):
    qs, ans, meta = _suite(root, suite)
    n_img, n_q = suite_size(suite, 12)
    assert meta["suite"] == suite and meta["n"] == len(qs) == len(ans) == n_q
    assert [q["question_id"] for q in qs] == sorted(ans)
    assert len({q["image"] for q in qs}) == n_img
    for q in qs:
        assert set(q) >= {"question_id", "image", "text"}
        assert (root / "images" / q["image"]).is_file()
        a = ans[q["question_id"]]
        assert a["image_id"] == Path(q["image"]).stem
        assert a["type"] in meta["answer_space"]
        assert a["answer"] in meta["answer_space"][a["type"]]
        assert len(a["answers"]) == 10 and all(isinstance(x, str) for x in a["answers"])
        assert a["answers"].count(a["answer"]) >= 8


def test_soc_suites(root):
    qs, ans, _ = _suite(root, "soc-vqa")
    cats = Counter(ans[q["question_id"]]["category"] for q in qs)
    assert cats == {"relational": 6, "non-relational": 6}
    qs, ans, _ = _suite(root, "soc-mc")
    for q in qs:
        a = ans[q["question_id"]]
        k = len(a["choices"])
        assert 2 <= k <= 5 and len(set(a["choices"])) == k
        assert a["answer"] in LETTERS[:k]
        lines = q["text"].split("\n")
        assert lines[-1] == MC_INSTRUCTION
        assert lines[1:1 + k] == [f"{LETTERS[i]}. {c}" for i, c in enumerate(a["choices"])]


def test_captions_list_objects_by_colour(root):
    """Captions are keyed by colour (palette order, then shape), and describe exactly the scene's objects."""
    scenes = {}
    for line in (root / "scenes.jsonl").read_text().splitlines():
        rec = json.loads(line)
        scenes[rec["image"]] = rec
    palettes = {"soc": list(SOC_COLORS), "shape": list(SHAPE_COLORS)}
    checked = 0
    for rec in json.loads((root / "captions.json").read_text()):
        scene = scenes[rec["image"]]
        if scene["kind"] not in palettes:
            continue
        body = rec["conversations"][1]["value"].split(": ", 1)[1].rstrip(".")
        listed = [part.split(" ") for part in body.split(", ")]  # colour, shape, top|bottom, left|right
        order = [(palettes[scene["kind"]].index(c), SHAPES.index(sh)) for c, sh, *_ in listed]
        assert order == sorted(order), rec["conversations"][1]["value"]
        assert sorted((c, sh) for c, sh, *_ in listed) == sorted((c, sh) for c, sh, *_ in scene["content"])
        checked += 1
    assert checked >= 10


def test_pope_suite(root):
    qs, ans, _ = _suite(root, "shape-pope")
    by_img = defaultdict(list)
    for q in qs:
        by_img[q["image"]].append(ans[q["question_id"]])
    splits = Counter()
    for img, rows in by_img.items():
        assert Counter(r["label"] for r in rows) == {"yes": 3, "no": 3}
        assert len({r["split"] for r in rows}) == 1
        splits[rows[0]["split"]] += 1
        assert all(r["answer"] == r["label"] for r in rows)
    assert set(splits) == set(POPE_SPLITS) and len(set(splits.values())) == 1


def test_mme_suite(root):
    qs, ans, _ = _suite(root, "shape-mme")
    cells = defaultdict(list)
    for q in qs:
        a = ans[q["question_id"]]
        cells[(q["image"], a["subtask"])].append(a["label"])
    imgs = {i for i, _ in cells}
    assert len(cells) == len(imgs) * len(MME_SUBTASKS)
    assert all(sorted(v) == ["no", "yes"] for v in cells.values())


def test_glyph_scale(tmp_path):
    """Objects and words stay visible at 16 px: every image has non-white pixels in several colours."""
    cfg = dataclasses.replace(micro_cfg(), n_caption=12, n_instruct=0, n_val=0, n_per_suite=2)
    r = make_data(cfg, 16, root=tmp_path / "d")
    for p in (r / "images" / "captions").glob("*.png"):
        a = np.asarray(Image.open(p)).reshape(-1, 3)
        assert (a.min(axis=1) < 200).sum() >= 6, p


# --- tokenizer and templates -------------------------------------------------------------------------------


def test_tokenizer_roundtrip(tmp_path):
    texts = ["What is the shape of the red object?\nAnswer with one word.", "circle", "user\nassistant"] * 5
    t = train_tokenizer(texts, 160, tmp_path / "tok")
    t2 = load_tokenizer(tmp_path / "tok")
    assert len(t2) == len(t) <= 160
    for s in texts[:3] + ["<|im_start|>user\n<image>\nan unseen word<|im_end|>"]:
        ids = t2(s, add_special_tokens=False)["input_ids"]
        assert ids == t(s, add_special_tokens=False)["input_ids"]
        assert t2.decode(ids) == s  # byte-level: exact round trip, newlines included
    assert (t2.pad_token_id, t2.unk_token_id, t2.eos_token_id) == (0, 1, 2)
    assert image_token_id(t2) == 5 == t2.convert_tokens_to_ids("<image>")
    assert t2.convert_tokens_to_ids("<|im_end|>") == 4
    assert len(t2("red", add_special_tokens=False)["input_ids"]) == 1


def test_generated_tokenizer(root, tok):
    assert len(tok) <= micro_cfg().vocab_size
    assert resolve_tokenizer(micro_cfg(), root=root).get_vocab() == tok.get_vocab()
    from qtllava.data.questions import WORLD_WORDS

    for w in WORLD_WORDS:  # every answer word is one token, alone or after a space
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    for w in ("user", "assistant"):  # ChatML role names
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w


def test_foreign_tokenizer_gets_image_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["a b c"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path / "t")
    tok = load_tokenizer(tmp_path / "t")
    iid = image_token_id(tok)
    assert tok("<image> a", add_special_tokens=False)["input_ids"][0] == iid
    assert tok.pad_token is not None
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_template_registry():
    with pytest.raises(KeyError, match="unknown chat template"):
        get_template("qwen")
    with pytest.raises(ValueError, match="already registered"):
        register_template(Template(name="qwen2"))
    assert get_template("qwen2").system_prompt == ""  # system prompt off by default
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("qwen2").name = "x"  # type: ignore[misc]


CONV = [{"from": "human", "value": "<image>\nWhat is the shape of the red object?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "Is the red object on the left?"}, {"from": "gpt", "value": "yes"}]


def test_qwen2_template_masks(tok):
    t = get_template("qwen2")
    ids, labels = t.encode(CONV, tok, num_image_tokens=N_IMG)
    assert ids.count(image_token_id(tok)) == N_IMG
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "circle<|im_end|>yes<|im_end|>"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    text = tok.decode(ids).replace("<image>" * N_IMG, "<image>")
    assert text == ("<|im_start|>user\n<image>\nWhat is the shape of the red object?<|im_end|>\n"
                    "<|im_start|>assistant\ncircle<|im_end|>\n<|im_start|>user\nIs the red object on the left?"
                    "<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n")
    prompt = t.encode_prompt(CONV[:1], tok, num_image_tokens=1)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    with_sys = t.with_system("Be brief.").encode(CONV, tok)[0]
    assert tok.decode(with_sys).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert t.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]


def test_pretrain_and_llama_templates(tok):
    cap = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "red circle"}]
    ids, labels = get_template("pretrain").encode(cap, tok, num_image_tokens=3)
    assert ids[:3] == [image_token_id(tok)] * 3
    assert tok.decode(ids[3:]) == "red circle<|endoftext|>"
    assert labels[:3] == [IGNORE_INDEX] * 3 and labels[3:] == ids[3:]
    ids, labels = get_template("llama").encode(cap, tok)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == " red circle<|endoftext|>"


def test_qwen2_base_template_answers_with_the_options_tokens(root, tok, tmp_path):
    """TinyLLaVA's "qwen2_base" puts a space before the answer, so its first word is the token that word has inside
    a sentence and in the options of a multiple-choice question ("Ġcircle"); ChatML's "qwen2" answers right after
    a newline, with another token ("circle"). Data made for it trains the role words into the tokenizer and records
    the template in the manifest (data made for "qwen2" does not, so it stays valid)."""
    mc = [{"from": "human", "value": "<image>\nWhat is the shape of the red object?\nA. square\nB. circle\n"
           "Answer with one word."}, {"from": "gpt", "value": "circle"}]

    def answer_is_option_token(t, template):
        ids, labels = get_template(template).encode(mc, t)
        first = next(i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX)
        return first in ids[:labels.index(first)]

    assert not answer_is_option_token(tok, "qwen2")
    r = make_data(micro_cfg(template="qwen2_base"), S, root=tmp_path / "tb")
    assert json.loads((r / "manifest.json").read_text())["settings"]["template"] == "qwen2_base"
    assert "template" not in json.loads((root / "manifest.json").read_text())["settings"]
    tb = load_tokenizer(r / "tokenizer")
    assert answer_is_option_token(tb, "qwen2_base")
    for w in ("USER", "ASSISTANT"):
        assert len(tb(w, add_special_tokens=False)["input_ids"]) == 1, w
    ids, labels = get_template("qwen2_base").encode(CONV, tb, num_image_tokens=1)
    assert tb.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == \
        " circle<|endoftext|> yes<|endoftext|>"
    assert tb.decode(get_template("qwen2_base").encode_prompt(CONV[:1], tb)).endswith("ASSISTANT:")


# --- datasets and collate ----------------------------------------------------------------------------------


def _ds(root, tok, name="instruct_train.json", template="qwen2", **kw):
    args = dict(image_size=S, num_image_tokens=N_IMG, max_length=96)
    args.update(kw)
    return LlavaDataset.load(root / name, root / "images", tok, template, **args)


def test_dataset_collate(root, tok):
    ds = _ds(root, tok)
    assert len(ds) == 32 and not ds.skipped
    samples = [ds[i] for i in range(5)]
    b = collate(samples, tok.pad_token_id)
    B, T = b["input_ids"].shape
    assert B == 5 and T == max(len(s["input_ids"]) for s in samples) <= 96
    assert b["attention_mask"].shape == b["labels"].shape == (B, T)
    assert b["input_ids"].dtype == b["attention_mask"].dtype == b["labels"].dtype == torch.long
    assert b["pixel_values"].shape == (5, 3, S, S) and b["pixel_values"].dtype == torch.float32
    assert -1.0 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1.0
    assert b["ids"] == [f"ins-{i:06d}" for i in range(5)]
    iid = image_token_id(tok)
    records = json.loads((root / "instruct_train.json").read_text())
    for row in range(B):
        n = len(samples[row]["input_ids"])
        assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
        assert (b["input_ids"][row, n:] == tok.pad_token_id).all() and (b["labels"][row, n:] == -100).all()
        assert int((b["input_ids"][row] == iid).sum()) == N_IMG
        keep = b["labels"][row] != -100
        answers = [t["value"] for t in records[row]["conversations"][1::2]]
        assert tok.decode(b["labels"][row][keep]) == "".join(a + "<|im_end|>" for a in answers)
    # image order follows sample order
    assert torch.equal(b["pixel_values"][2], samples[2]["pixel_values"][0])


def test_left_padding_and_eval_questions(root, tok):
    eq = EvalQuestions.load(root / "suites" / "soc-mc", root / "images", tok, "qwen2", S, N_IMG)
    qs = load_questions(root / "suites" / "soc-mc")
    assert len(eq) == len(qs)
    samples = [eq[i] for i in range(4)]
    b = collate(samples, tok.pad_token_id, padding_side="left")
    assert "labels" not in b and b["pixel_values"].shape == (4, 3, S, S)
    assert b["ids"] == [q["question_id"] for q in qs[:4]]
    T = b["input_ids"].shape[1]
    tail = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert not b["attention_mask"][row, : T - n].any() and b["attention_mask"][row, T - n:].all()
        assert (b["input_ids"][row, : T - n] == tok.pad_token_id).all()
        assert b["input_ids"][row, -len(tail):].tolist() == tail  # open assistant turn at the end
        assert int((b["input_ids"][row] == image_token_id(tok)).sum()) == N_IMG
        assert s["text"] == qs[row]["text"]


def test_pretrain_dataset_and_text_only(root, tok, tmp_path):
    ds = _ds(root, tok, "captions.json", "pretrain")
    s = ds[0]
    rec = json.loads((root / "captions.json").read_text())[0]
    assert tok.decode(s["labels"][s["labels"] != -100]) == rec["conversations"][1]["value"] + "<|endoftext|>"
    # text-only records contribute no images
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "Hi"},
                                                           {"from": "gpt", "value": "yes"}]}, rec]))
    d2 = LlavaDataset.load(p, root / "images", tok, "qwen2", S, N_IMG, 96)
    b = collate([d2[0], d2[1], d2[0]], tok.pad_token_id)
    assert b["pixel_values"].shape == (1, 3, S, S)
    assert collate([d2[0]], tok.pad_token_id)["pixel_values"].shape == (0, 3, S, S)


def test_truncation(root, tok):
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "yes"}] * 1 + \
           [{"from": "human", "value": "Is the red object on the left?"}, {"from": "gpt", "value": "no"}] * 5
    rec = {"id": "long", "image": json.loads((root / "captions.json").read_text())[0]["image"], "conversations": conv}
    p = root.parent / "long.json"
    p.write_text(json.dumps([rec]))
    ds = LlavaDataset.load(p, root / "images", tok, "qwen2", S, N_IMG, 40)
    assert len(ds[0]["input_ids"]) == 40 and (ds[0]["labels"] != -100).any()
    with pytest.raises(DataError, match=r"record 0 \(id='long'\): too_long"):
        LlavaDataset.load(p, root / "images", tok, "qwen2", S, N_IMG, 10)


def test_unvalidated_dataset_does_no_io(root, tok, tmp_path):
    ds = LlavaDataset(tmp_path / "does-not-exist.json", root / "images", tok, "qwen2", S, N_IMG, 96)
    with pytest.raises(RuntimeError, match="validate"):
        len(ds)


def _bad_records(root) -> list[tuple[str, dict]]:
    img = json.loads((root / "captions.json").read_text())[0]["image"]
    ok = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "circle"}]
    return [
        ("missing_image", {"id": "m", "image": "nope/none.png", "conversations": ok}),
        ("corrupt_image", {"id": "c", "image": "corrupt.png", "conversations": ok}),
        ("schema", {"id": "s1", "image": img}),
        ("schema", {"id": "s2", "image": img, "conversations": [ok[1], ok[0]]}),
        ("schema", {"id": "s3", "image": img, "conversations": [ok[0], {"from": "gpt", "value": 3}]}),
        ("placeholder_mismatch", {"id": "p1", "image": img, "conversations": [
            {"from": "human", "value": "What?"}, ok[1]]}),
        ("placeholder_mismatch", {"id": "p2", "conversations": ok}),
        ("empty_answer", {"id": "e", "image": img, "conversations": [ok[0], {"from": "gpt", "value": "  "}]}),
    ]


def test_image_paths_stay_in_the_image_folder_and_bombs_are_data_errors(root, tok, tmp_path, monkeypatch):
    from PIL import Image

    import qtllava.data.llava_json as lj

    images = tmp_path / "images"
    images.mkdir()
    good = json.loads((root / "captions.json").read_text())[0]
    (images / "ok.png").write_bytes((root / "images" / good["image"]).read_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes((images / "ok.png").read_bytes())
    for rel in (str(outside), "../secret.png", "sub/../../secret.png"):
        path = tmp_path / "recs.json"
        path.write_text(json.dumps([dict(good, image=rel)]))
        with pytest.raises(DataError) as ei:
            LlavaDataset.load(path, images, tok, "qwen2", S, N_IMG, 96)
        assert ei.value.reason == "outside_image_folder" and "record 0" in str(ei.value), rel
        if not rel.startswith("sub"):  # (images/sub does not exist, so the OS cannot walk through it)
            assert len(LlavaDataset.load(path, images, tok, "qwen2", S, N_IMG, 96, allow_outside_images=True)) == 1
    # an image whose header announces too many pixels is refused before it is decoded, naming file and record
    Image.new("RGB", (400, 300)).save(images / "big.png")
    path.write_text(json.dumps([dict(good, image="big.png")]))
    monkeypatch.setattr(lj, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(DataError) as ei:
        LlavaDataset.load(path, images, tok, "qwen2", S, N_IMG, 96)
    assert ei.value.reason == "image_too_large" and "big.png" in str(ei.value)
    ds = LlavaDataset.load(path, images, tok, "qwen2", S, N_IMG, 96, check_images=False)
    with pytest.raises(DataError, match=r"record 0 .*image_too_large: .*400 x 300 pixels"):
        ds[0]


def test_bad_records_raise_and_skip(root, tok, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for p in (root / "images").iterdir():
        (images / p.name).symlink_to(p)
    png = (root / "images" / json.loads((root / "captions.json").read_text())[0]["image"]).read_bytes()
    (images / "corrupt.png").write_bytes(png[: len(png) // 2])
    good = json.loads((root / "captions.json").read_text())[:2]
    bad = _bad_records(root)
    for reason, rec in bad:
        path = tmp_path / f"{rec['id']}.json"
        path.write_text(json.dumps(good + [rec]))
        with pytest.raises(DataError) as ei:
            LlavaDataset.load(path, images, tok, "qwen2", S, N_IMG, 96)
        e = ei.value
        assert (e.reason, e.index, e.record_id) == (reason, 2, rec["id"])
        assert str(path) in str(e) and f"record 2 (id={rec['id']!r})" in str(e)
    path = tmp_path / "all.json"
    path.write_text(json.dumps(good + [r for _, r in bad] + good))
    ds = LlavaDataset.load(path, images, tok, "qwen2", S, N_IMG, 96, skip_bad=True)
    assert len(ds) == 4
    assert ds.skipped == Counter(reason for reason, _ in bad)
    # the skipped records are gone, the good ones load
    assert collate([ds[i] for i in range(4)], tok.pad_token_id)["pixel_values"].shape == (4, 3, S, S)


def test_invalid_json_file(root, tok, tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"id": "a", ')
    for skip in (False, True):
        with pytest.raises(DataError, match="broken.json: invalid_json"):
            LlavaDataset.load(p, root / "images", tok, "qwen2", S, N_IMG, 96, skip_bad=skip)
    p.write_text('{"id": "a"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        LlavaDataset.load(p, root / "images", tok, "qwen2", S, N_IMG, 96)
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "text": "hi"}\n{oops\n')
    with pytest.raises(DataError, match="q.jsonl: invalid_json: line 2"):
        load_questions(q)
    with pytest.raises(DataError, match="missing_file"):
        LlavaDataset.load(tmp_path / "none.json", root / "images", tok, "qwen2", S, N_IMG, 96)


def test_eval_questions_bad_lines(root, tok, tmp_path):
    q = tmp_path / "q.jsonl"
    img = load_questions(root / "suites" / "soc-vqa")[0]["image"]
    rows = [{"question_id": 0, "image": img, "text": "What?"},
            {"question_id": 1, "image": "missing.png", "text": "What?"},
            {"question_id": 2, "text": "<image>\nno image given"},
            {"question_id": 3, "text": "text only"}]
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"record 1 \(id=1\): missing_image"):
        EvalQuestions.load(q, root / "images", tok, "qwen2", S, N_IMG)
    eq = EvalQuestions.load(q, root / "images", tok, "qwen2", S, N_IMG, skip_bad=True)
    assert eq.skipped == {"missing_image": 1, "placeholder_mismatch": 1}
    assert [eq[i]["id"] for i in range(len(eq))] == [0, 3]
    assert eq[1]["pixel_values"].shape == (0, 3, S, S)


def test_resolve_tokenizer_prefers_configured_folder(root, tok, tmp_path):
    tok.save_pretrained(tmp_path / "llm")
    cfg = micro_cfg(tokenizer=str(tmp_path / "llm"))
    assert resolve_tokenizer(cfg, root=tmp_path / "nowhere").get_vocab() == tok.get_vocab()


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), images=st.lists(st.integers(0, 2), min_size=5,
                                                                                     max_size=5),
       side=st.sampled_from(["right", "left"]))
def test_collate_properties(lengths, images, side):
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.arange(1, n + 1)
        samples.append({"id": str(i), "input_ids": ids, "labels": torch.where(ids % 2 == 0, ids, -100),
                        "pixel_values": torch.full((images[i], 3, 2, 2), float(i))})
    b = collate(samples, pad_id=0, padding_side=side)
    T = max(lengths)
    assert b["input_ids"].shape == (len(lengths), T)
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert ((b["input_ids"] == 0) == (b["attention_mask"] == 0)).all()
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    for r, s in enumerate(samples):
        assert b["input_ids"][r][b["attention_mask"][r] == 1].tolist() == s["input_ids"].tolist()
    assert b["pixel_values"].shape[0] == sum(images[: len(lengths)])
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [float(i) for i in range(len(lengths)) for _ in range(images[i])]
