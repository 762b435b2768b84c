"""Can a checkpoint learn one kind of question quickly? Fine-tune a copy on the matching turns, score held-out ones.

The instruction corpus's turns whose question matches `--pattern` (a regular expression) become single-turn
records; the last `--held-out` of them are kept aside. The checkpoint's client and server parts (nothing frozen;
their own codecs, e.g. fp16 passthrough after stage 2; `scratch`: fresh parts as stage 0 builds them, fp32
passthrough) are trained on the rest for `--steps` steps of `--batch` records with AdamW at `--lr`, per-turn loss;
every `--every` steps the first-answer-token accuracy on the training and held-out records is printed (`--stop-at`
ends the run at a probe that reaches it). With `--save DIR` the trained parts are written to DIR/client and
DIR/server (a stage-0 warm start for `benchmarks/baseline.py --warm-start DIR`). Used in docs/baseline.md to tell
"the image lacks the information" from "the model cannot route the question to the image":

    python benchmarks/answer_probe.py ... # then
    python benchmarks/lookup_probe.py runs/exp/sincos/final --pattern 'Is the red object on the left\\?'
    python benchmarks/lookup_probe.py runs/exp/sincos/final --pattern 'Is the \\w+ object on the left\\?'
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
from pathlib import Path

import torch

from qtllava.data.templates import template_name
from qtllava.config import load_config
from qtllava.data import IGNORE_INDEX, LlavaDataset, collate, image_token_id
from qtllava.data.questions import LETTERS, MC_INSTRUCTION, lettered_prompt
from qtllava.model.parts import ClientPart, ServerPart, build_parts
from qtllava.train.loop import load_tokenizer_for, stage_config


def matching_turns(path: Path, pattern: str, choices: bool = False,
                   rewrite: tuple[str, str] | None = None) -> list[dict]:
    """Matching turns as one-turn records; multiple-choice turns only with `choices`; `rewrite` = (regular
    expression, replacement) applied to each matching question (e.g. another option format)."""
    pat = re.compile(pattern)
    out = []
    for rec in json.loads(path.read_text(encoding="utf-8")):
        if "image" not in rec:  # text-only records (data.lookup_records) have no image for the probe's records
            continue
        conv = rec["conversations"]
        for q, a in zip(conv[0::2], conv[1::2]):
            question = q["value"].replace("<image>", "").strip()
            if pat.search(question) and (choices or MC_INSTRUCTION not in question):
                if rewrite is not None:
                    question = re.sub(rewrite[0], rewrite[1], question)
                out.append({"id": f"{rec['id']}-{len(out)}", "image": rec["image"],
                            "conversations": [{"from": "human", "value": "<image>\n" + question}, a]})
    return out


_OPTION_LINE = re.compile(r"^[A-E]\. (.+)$", re.M)  # one "A. word" line of questions.lettered_prompt


def in_fixed_order(rec: dict) -> dict:
    """The one-turn lettered record `rec` with its options sorted (the same words in one fixed order for every
    question that offers them) and its answer's letter moved with them; other records unchanged."""
    q, a = rec["conversations"]
    m = re.match(r"(?s)(.*?)\n((?:[A-E]\. [^\n]+\n)+)" + re.escape(MC_INSTRUCTION) + r"$", q["value"])
    if m is None or a["value"] not in LETTERS:
        return rec
    opts = _OPTION_LINE.findall(m.group(2))
    answer = opts[LETTERS.index(a["value"])]
    ordered = sorted(opts)
    return {**rec, "conversations": [{**q, "value": lettered_prompt(m.group(1), ordered)},
                                     {**a, "value": LETTERS[ordered.index(answer)]}]}


def recall_records(turns: list[dict], n: int, n_turns: int, seed: int, max_options: int = 5) -> list[dict]:
    """`n` synthetic option look-ups ("Which option is red?", lettered options, the letter), `n_turns` per record,
    over the option words of the lettered turns in `turns` (each record borrows one of their images, which does
    not hold the answer): the letter's look-up with the answer stated in the question."""
    words = sorted({m for t in turns for m in _OPTION_LINE.findall(t["conversations"][0]["value"])})
    if len(words) < 2:
        raise SystemExit("--recall needs lettered turns (--choices) among the matching turns")
    g = random.Random(seed)
    out = []
    for i in range(n):
        conv = []
        for t in range(n_turns):
            opts = g.sample(words, g.randint(2, min(max_options, len(words))))
            answer = g.randrange(len(opts))
            conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "")
                      + lettered_prompt(f"Which option is {opts[answer]}?", opts)},
                     {"from": "gpt", "value": LETTERS[answer]}]
        out.append({"id": f"recall-{i}", "image": turns[g.randrange(len(turns))]["image"], "conversations": conv})
    return out


def first_answer_accuracy(client, server, batch) -> float:
    with torch.no_grad():
        sent = client(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        logits = server(sent.image.values, sent.text.values, sent.layout).logits
    labels = batch["labels"][:, 1:]
    pos = (labels != IGNORE_INDEX).float().argmax(1)
    rows = torch.arange(len(pos))
    return 100 * float((logits[:, :-1].argmax(-1)[rows, pos] == labels[rows, pos]).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help='a stage folder with client/ and server/, or "scratch" for '
                                                   "fresh weights of the config's sizes")
    ap.add_argument("--pattern", required=True, help="regular expression on the question text")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--choices", action="store_true", help="keep multiple-choice turns too")
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recall", type=int, default=0, metavar="N",
                    help="also train on N synthetic option look-ups (the answer stated in the question); their "
                         "held-out accuracy is printed too")
    ap.add_argument("--recall-turns", type=int, default=2, help="look-up turns per synthetic record")
    ap.add_argument("--recall-max-options", type=int, default=5, help="2-N options per synthetic look-up")
    ap.add_argument("--recall-only", action="store_true",
                    help="train on the synthetic look-ups alone (the matching turns still give words, images and "
                         "the held-out column)")
    ap.add_argument("--rewrite", nargs=2, metavar=("PATTERN", "REPL"),
                    help="rewrite each question with re.sub(PATTERN, REPL, question), e.g. the option format")
    ap.add_argument("--ordered-until", type=int, default=0, metavar="STEP",
                    help="a curriculum for the letter: each training turn's options come in one fixed (sorted) order "
                         "with probability 1 - step / STEP, so that early on the letter follows from the answer "
                         "alone; held-out turns keep the data's shuffled order")
    ap.add_argument("--stop-at", type=float, metavar="PCT",
                    help="stop at the first probe whose held-out accuracy (the look-ups' with --recall) is >= PCT")
    ap.add_argument("--save", type=Path, help="write the trained parts to SAVE/client and SAVE/server")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    root = Path(cfg.data.root)
    torch.manual_seed(args.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    turns = matching_turns(root / "instruct_train.json", args.pattern, args.choices,
                           tuple(args.rewrite) if args.rewrite else None)
    if len(turns) <= args.held_out:
        raise SystemExit(f"only {len(turns)} turns match {args.pattern!r}; need more than --held-out {args.held_out}")
    tok = load_tokenizer_for(cfg, root)
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        recall = recall_records(turns, args.recall + args.held_out, args.recall_turns, args.seed,
                                args.recall_max_options) if args.recall else []
        own = [] if args.recall_only else turns[:-args.held_out]
        parts = [("train", own + recall[:args.recall]), ("held_out", turns[-args.held_out:])]
        parts += [("recall_held_out", recall[args.recall:])] if args.recall else []
        # the same training records, row for row, with the options in their fixed order (--ordered-until)
        parts += [("train_ordered", [in_fixed_order(r) for r in own] + recall[:args.recall])] \
            if args.ordered_until else []
        for name, recs in parts:
            f = Path(tmp) / f"{name}.json"
            f.write_text(json.dumps(recs), encoding="utf-8")
            ds = LlavaDataset.for_config(cfg, f, root / "images", tok, template_name(cfg))
            sets.append(collate([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id))
    train, held = sets[:2]
    recall_held = sets[2] if args.recall else None
    ordered = sets[-1] if args.ordered_until else None
    if ordered is not None and any(ordered[k].shape != train[k].shape for k in train if k != "ids"):
        raise SystemExit("the fixed-order records do not line up with the training records")
    if str(args.checkpoint) == "scratch":
        client, server = build_parts(stage_config(cfg, "stage0"), vocab_size=len(tok),
                                     image_token_id=image_token_id(tok))
    else:
        client = ClientPart.from_pretrained(args.checkpoint / "client")
        server = ServerPart.from_pretrained(args.checkpoint / "server")
    params = list(client.parameters()) + list(server.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    n = train["input_ids"].shape[0]
    assert train["pixel_values"].shape[0] == n  # one image per record, so rows index images too
    sys.stdout.write(f"{n} training and {args.held_out} held-out turns match {args.pattern!r}\n"
                     f"{'step':>5} {'loss':>7} {'train %':>8} {'held-out %':>10}"
                     + (f" {'recall held-out %':>17}" if args.recall else "") + "\n")
    for step in range(1, args.steps + 1):
        idx = torch.randperm(n)[:args.batch]
        b = {k: v[idx] for k, v in train.items() if k != "ids"}
        if ordered is not None and step < args.ordered_until:
            fixed = torch.rand(len(idx)) < 1.0 - step / args.ordered_until
            b = {k: torch.where(fixed.view(-1, *[1] * (v.dim() - 1)), ordered[k][idx], v) for k, v in b.items()}
        sent = client(b["input_ids"], b["attention_mask"], b["pixel_values"])
        loss = server(sent.image.values, sent.text.values, sent.layout, labels=b["labels"],
                      loss_average="turn").loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0:
            sub = {k: v[:200] for k, v in train.items() if k != "ids"}
            scores = [first_answer_accuracy(client, server, b) for b in (sub, held, recall_held) if b is not None]
            sys.stdout.write(f"{step:>5} {loss.item():>7.4f}"
                             + "".join(f" {x:>{w}.1f}" for x, w in zip(scores, (8, 10, 17))) + "\n")
            sys.stdout.flush()
            if args.stop_at is not None and scores[-1] >= args.stop_at:
                sys.stdout.write(f"stopped: held-out {scores[-1]:.1f} % >= --stop-at {args.stop_at}\n")
                break
    if args.save is not None:
        client.save_pretrained(args.save / "client")
        server.save_pretrained(args.save / "server")
        sys.stdout.write(f"saved the trained parts to {args.save}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
