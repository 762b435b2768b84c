"""Teacher-forced answer accuracy of a checkpoint, per question kind: does the model know the first answer token?

A cheap diagnosis that needs no generation: for every assistant turn of an LLaVA-JSON file (default: the
instruction corpus's validation split), the argmax of the next-token logits at the first answer position is
compared with the reference's first token, and grouped by the kind of question (yes/no, letter, number, colour,
shape, ...). Beside each kind: the majority-answer rate of that kind in the same file (what a model that ignores the
image could reach at most per kind) and the same accuracy with the images shuffled within the batch (does the answer
depend on the image?).

    python benchmarks/answer_probe.py runs/baseline/stage0/final --config tiny [--file instruct_val.json] [--positions]

`--lens` adds the same accuracy read out after every decoder layer (the hidden state at the answer position through
the final norm and the LM head, a "logit lens"): in which layer does the answer appear, and how many layers are left
after it (an option letter needs the answer first, then a look-up of the option that holds it)?
`--positions` adds a linear probe of where objects are (left/top half) in the connector's output rows;
`--captions` the teacher-forced accuracy on the attribute words of captions (colour, shape, top/bottom,
left/right; each shape or position word follows a colour word, so it needs a look-up of that colour in the image).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

from qtllava.data.templates import template_name
from qtllava.config import load_config
from qtllava.data import IGNORE_INDEX, LlavaDataset, collate, load_image
from qtllava.data.world import GLYPH_COLORS, SHAPE_COLORS, SHAPES, SOC_COLORS
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.train.loop import load_tokenizer_for

log = logging.getLogger("answer_probe")

_KINDS = (  # first match wins
    ("lookup", re.compile(r"^Which option is ")),  # data.lookup_records: the option look-up alone
    ("letter", re.compile(r"option's letter")),
    ("caption", re.compile(r"describe|description|summarize|what is in the image", re.I)),
    ("word", re.compile(r"what word", re.I)),
    ("exist", re.compile(r"^is there an? ", re.I)),
    ("count", re.compile(r"^how many|exactly \d", re.I)),
    ("where", re.compile(r"on the (left|top)|above|left of", re.I)),
    ("color", re.compile(r"colou?r", re.I)),
    ("shape", re.compile(r"shape", re.I)),
    ("attr-yn", re.compile(r"^is the ", re.I)),
)


def question_kind(question: str) -> str:
    q = question.replace("<image>", "").strip()
    for name, pat in _KINDS:
        if pat.search(q):
            return name
    return "other"


def _predict(client: ClientPart, server: ServerPart, batch: dict, shuffled: bool) -> torch.Tensor:
    """Teacher-forced argmax predictions; `pred[:, t]` is the guess for token t + 1. `shuffled` rolls the images by
    one inside the batch."""
    pixels = batch["pixel_values"]
    if shuffled:
        pixels = pixels[torch.roll(torch.arange(pixels.shape[0]), 1)]
    sent = client(batch["input_ids"], batch["attention_mask"], pixels)
    return server(sent.image.values, sent.text.values, sent.layout).logits[:, :-1].argmax(-1)


def caption_probe(checkpoint: Path, cfg, data_root: Path, n_records: int = 192, batch_size: int = 32) -> dict:
    """Teacher-forced accuracy on the attribute words of the first `n_records` captions, by kind of word: the colour
    words, and the shape and position words that follow a colour word (each needs a look-up in the image)."""
    tok = load_tokenizer_for(cfg, data_root)
    ds = LlavaDataset.for_config(cfg, data_root / "captions.json", data_root / "images", tok, "pretrain")
    groups = {"colour": set(SOC_COLORS) | set(SHAPE_COLORS) | set(GLYPH_COLORS), "shape": set(SHAPES),
              "top/bottom": {"top", "bottom"}, "left/right": {"left", "right"}}
    kind_of = {}
    for kind, words in groups.items():
        for w in words:
            ids = tok(" " + w, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:  # a word the tokenizer splits is left out
                kind_of[ids[0]] = kind
    client = ClientPart.from_pretrained(checkpoint / "client").eval()
    server = ServerPart.from_pretrained(checkpoint / "server").eval()
    hits: dict[tuple[str, bool], list[int]] = defaultdict(list)
    n = min(n_records, len(ds))
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = collate([ds[i] for i in range(start, min(n, start + batch_size))], pad_id=tok.pad_token_id)
            target = batch["labels"][:, 1:]
            for shuffled in (False, True):
                pred = _predict(client, server, batch, shuffled)
                for b, t in (target != IGNORE_INDEX).nonzero().tolist():
                    kind = kind_of.get(int(target[b, t]))
                    if kind:
                        hits[kind, shuffled].append(int(pred[b, t] == target[b, t]))
    return {kind: {"n": len(hits[kind, False]), "accuracy": 100 * sum(hits[kind, False]) / len(hits[kind, False]),
                   "shuffled_images": 100 * sum(hits[kind, True]) / len(hits[kind, True])}
            for kind in groups if hits[kind, False]}


def _open(checkpoint: Path, cfg, data_root: Path, file: str):
    """The tokenizer, the dataset of `file`, its records by id, and the checkpoint's two parts (eval mode)."""
    tok = load_tokenizer_for(cfg, data_root)
    ds = LlavaDataset.for_config(cfg, data_root / file, data_root / "images", tok, template_name(cfg))
    by_id = {str(r["id"]): r for r in json.loads((data_root / file).read_text(encoding="utf-8"))}
    client = ClientPart.from_pretrained(checkpoint / "client").eval()
    server = ServerPart.from_pretrained(checkpoint / "server").eval()
    return tok, ds, by_id, client, server


def _first_answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the first label position of each assistant turn (a label preceded by an ignored label)."""
    prev = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], dim=1)
    return (labels != IGNORE_INDEX) & (prev == IGNORE_INDEX)


def lens_probe(checkpoint: Path, cfg, data_root: Path, file: str, batch_size: int, limit: int) -> dict:
    """kind -> accuracy (%) of the first answer token read from the residual stream after each decoder layer
    (index 0 = the input embeddings; the last = the model's own prediction), through the final norm and LM head."""
    tok, ds, by_id, client, server = _open(checkpoint, cfg, data_root, file)
    decoder, head = server.llm.model, server.llm.get_output_embeddings()
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    hits: dict[str, list[list[int]]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            samples = [ds[i] for i in range(start, min(n, start + batch_size))]
            batch = collate(samples, pad_id=tok.pad_token_id)
            sent = client(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
            embeds = server.assemble(sent.image.values, sent.text.values, sent.layout)
            out = decoder(inputs_embeds=embeds, attention_mask=sent.layout.attention_mask,
                          position_ids=sent.layout.position_ids, output_hidden_states=True)
            states = out.hidden_states  # embeddings, then each layer (the last one already normed by HF)
            preds = [head(decoder.norm(h) if i < len(states) - 1 else h).argmax(-1) for i, h in enumerate(states)]
            first = _first_answer_positions(batch["labels"])
            for b, s in enumerate(samples):
                questions = [c["value"] for c in by_id[str(s["id"])]["conversations"]][0::2]
                for t, pos in enumerate(first[b].nonzero().flatten().tolist()):
                    kind = question_kind(questions[t]) if t < len(questions) else "other"
                    hits[kind].append([int(p[b, pos - 1] == batch["labels"][b, pos]) for p in preds])
    return {kind: [100 * sum(col) / len(rows) for col in zip(*rows)] for kind, rows in sorted(hits.items())}


def probe(checkpoint: Path, cfg, data_root: Path, file: str, batch_size: int, limit: int) -> dict:
    tok, ds, by_id, client, server = _open(checkpoint, cfg, data_root, file)
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    hits: dict[str, list[int]] = defaultdict(list)
    hits_shuf: dict[str, list[int]] = defaultdict(list)
    answers: dict[str, Counter] = defaultdict(Counter)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            samples = [ds[i] for i in range(start, min(n, start + batch_size))]
            batch = collate(samples, pad_id=tok.pad_token_id)
            labels = batch["labels"]
            first = _first_answer_positions(labels)
            for shuffled, store in ((False, hits), (True, hits_shuf)):
                pred = _predict(client, server, batch, shuffled)
                for b, s in enumerate(samples):
                    turns = [c["value"] for c in by_id[str(s["id"])]["conversations"]]
                    questions = turns[0::2]
                    for t, pos in enumerate(first[b].nonzero().flatten().tolist()):
                        kind = question_kind(questions[t]) if t < len(questions) else "other"
                        store[kind].append(int(pred[b, pos - 1] == labels[b, pos]))
                        if not shuffled:
                            answers[kind][int(labels[b, pos])] += 1
    out = {}
    for kind in sorted(hits):
        total = len(hits[kind])
        out[kind] = {"n": total, "accuracy": 100 * sum(hits[kind]) / total,
                     "shuffled_images": 100 * sum(hits_shuf[kind]) / total,
                     "majority": 100 * answers[kind].most_common(1)[0][1] / total}
    return out


def position_probe(checkpoint: Path, cfg, data_root: Path, n_images: int = 300) -> dict:
    """Is an object's place in the image linearly decodable from what the LLM receives?

    The connector outputs of the patches that hold part of an object (a pixel that is not near-white) in the
    first `n_images` caption images; a least-squares linear read-out of "patch in the left half" and "patch in the
    top half", fitted on 70 % of the patches and scored on the rest. 50 % = no position information."""
    records = json.loads((data_root / "captions.json").read_text(encoding="utf-8"))[:n_images]
    client = ClientPart.from_pretrained(checkpoint / "client").eval()
    v = cfg.vision
    grid, patch = v.image_size // v.patch_size, v.patch_size
    feats, targets, all_rows = [], [], []
    with torch.no_grad():
        for start in range(0, len(records), 50):
            pixels = torch.stack([load_image(data_root / "images" / r["image"], v.image_size, v.image_mean, v.image_std)
                                  for r in records[start:start + 50]])
            rows = client.image_features(pixels)  # (n, grid * grid, D)
            raw = pixels * torch.tensor(v.image_std).view(1, 3, 1, 1) + torch.tensor(v.image_mean).view(1, 3, 1, 1)
            near_white = (raw > 0.95).all(1)  # (n, H, W)
            cells = near_white.view(-1, grid, patch, grid, patch).permute(0, 1, 3, 2, 4).reshape(-1, grid * grid,
                                                                                                patch * patch)
            has_object = ~cells.all(-1)
            idx = torch.arange(grid * grid)
            where = torch.stack([(idx % grid) < grid // 2, (idx // grid) < grid // 2], dim=1).float()
            all_rows.append(rows.reshape(-1, rows.shape[-1]))
            for n in range(rows.shape[0]):
                feats.append(rows[n][has_object[n]])
                targets.append(where[has_object[n]])
    x, y = torch.cat(feats), torch.cat(targets)
    # share of the variance of all connector rows (object or not) that the patch's row / column explains
    every = torch.cat(all_rows)
    every = every - every.mean(0)
    idx = torch.arange(grid * grid).repeat(len(every) // (grid * grid))
    share = {}
    for name, label in (("row", idx // grid), ("column", idx % grid)):
        means = torch.stack([every[label == k].mean(0) for k in range(grid)])
        share[name] = 100 * float(means[label].pow(2).sum() / every.pow(2).sum())
    cut = int(0.7 * len(x))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    design = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], dim=1)
    w = torch.linalg.lstsq(design[:cut], 2 * y[:cut] - 1).solution
    hit = ((design[cut:] @ w) > 0) == y[cut:].bool()
    return {"patches": len(x), "left_accuracy": 100 * float(hit[:, 0].float().mean()),
            "top_accuracy": 100 * float(hit[:, 1].float().mean()),
            "variance_explained_by_row": share["row"], "variance_explained_by_column": share["column"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="a stage's final folder (with client/ and server/)")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--file", default="instruct_val.json", help="LLaVA-JSON file under the data root")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="records to probe; 0 = all")
    ap.add_argument("--positions", action="store_true",
                    help="also: is an object patch's left/top half linearly decodable from the connector output?")
    ap.add_argument("--captions", action="store_true",
                    help="also: teacher-forced accuracy on the colour, shape and position words of captions")
    ap.add_argument("--lens", action="store_true",
                    help="also: the accuracy read out after every decoder layer (logit lens)")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.set)
    table = probe(args.checkpoint, cfg, Path(cfg.data.root), args.file, args.batch_size, args.limit)
    sys.stdout.write(f"{'kind':<8} {'n':>5} {'ours':>6} {'shuffled':>9} {'majority':>9}\n")
    for kind, r in table.items():
        sys.stdout.write(f"{kind:<8} {r['n']:>5} {r['accuracy']:>6.1f} {r['shuffled_images']:>9.1f} "
                         f"{r['majority']:>9.1f}\n")
    out = {"checkpoint": str(args.checkpoint), "file": args.file, "kinds": table}
    if args.positions:
        out["positions"] = pos = position_probe(args.checkpoint, cfg, Path(cfg.data.root))
        sys.stdout.write(f"object position from the connector output ({pos['patches']} object patches, linear "
                         f"read-out, held-out 30 %): left {pos['left_accuracy']:.1f} %, top {pos['top_accuracy']:.1f} %"
                         " (50 = none)\n")
        sys.stdout.write(f"share of the connector output's variance explained by the patch's row "
                         f"{pos['variance_explained_by_row']:.1f} %, column {pos['variance_explained_by_column']:.1f} %\n")
    if args.captions:
        out["captions"] = caps = caption_probe(args.checkpoint, cfg, Path(cfg.data.root))
        sys.stdout.write(f"\n{'caption word':<12} {'n':>5} {'ours':>6} {'shuffled':>9}\n")
        for kind, r in caps.items():
            sys.stdout.write(f"{kind:<12} {r['n']:>5} {r['accuracy']:>6.1f} {r['shuffled_images']:>9.1f}\n")
    if args.lens:
        out["lens"] = lens = lens_probe(args.checkpoint, cfg, Path(cfg.data.root), args.file, args.batch_size,
                                        args.limit)
        layers = len(next(iter(lens.values())))
        sys.stdout.write(f"\n{'kind':<8} " + " ".join(f"{'emb' if i == 0 else f'L{i}':>6}" for i in range(layers))
                         + "\n")
        for kind, accs in lens.items():
            sys.stdout.write(f"{kind:<8} " + " ".join(f"{a:>6.1f}" for a in accs) + "\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
