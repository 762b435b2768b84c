"""Teacher-forced loss of the right answer on the benchmark suites: a low-noise companion to their accuracy.

A suite's accuracy counts 200 right-or-wrong answers, so one run's score moves by several points between seeds and
two configurations need many seeds to be told apart. The loss of the reference answer given the image and question
is continuous: for every question of a suite the checkpoint reads the chat prompt that generation reads (the
question with its image) followed by the suite's canonical answer, and the summed cross-entropy of the answer's
tokens (with the end of turn) is taken, as in training. Reported per suite: the mean answer loss in nats per question,
and the share of questions whose every answer token is the argmax (teacher-forced exact match, close to what greedy
generation scores on one-word answers). Measuring on the suites is not tuning on them: nothing is chosen by it.

`--suites ... instruct-val` adds the instruction corpus's validation split (every assistant turn of
instruct_val.json; loss per record): the split that settings are tuned on (issue 6), never the suites. Its answer
turns are also grouped by question kind (`instruct-val/word`: "What word is written in red?", the glyph-reading kind;
`--val-kinds`), since the loss per record is decided by the other kinds.

    python benchmarks/answer_nll.py runs/study/fp16/seed5/stage2/final runs/study/fsq-L4-ans-clr0/seed5/stage2/final
    python benchmarks/answer_nll.py --study runs/study --configs fp16 fsq-L4-ans-clr0 --json results/answer_nll.json

`--study DIR [DIR ...]` takes every `DIR/<config>/seed<k>/stage2/final` that is finished (of `--configs`, default
all) and adds a table of differences to fp16 paired by seed (the same batches in the same order).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from qtllava.data.templates import template_name
from qtllava.config import load_config
from qtllava.data import IGNORE_INDEX, LlavaDataset, collate
from qtllava.eval.jsonl import read_jsonl
from qtllava.eval.suites import load_suite
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.train.loop import load_tokenizer_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answer_probe import question_kind  # noqa: E402
from study import REFERENCES, mean_and_se  # noqa: E402  (REFERENCES: rows compared with fp16 given the same steps)

log = logging.getLogger("answer_nll")
SUITES = ("soc-vqa", "soc-mc", "glyph-vqa", "shape-pope", "shape-mme")
VAL = "instruct-val"  # not a suite: the instruction corpus's validation split, read as it is
VAL_FILE = "instruct_val.json"
IMAGE = "<image>"


def suite_conversations(suite_dir: Path) -> list[dict]:
    """The suite's questions as LLaVA conversations: the question (with its image) and the canonical answer."""
    answers = load_suite(suite_dir).by_id
    out = []
    for q in read_jsonl(suite_dir / "questions.jsonl", required=("question_id", "text")):
        qid = str(q["question_id"])
        if qid not in answers:
            raise ValueError(f"{suite_dir / 'answers.jsonl'}: no answer for question {qid!r}")
        text = q["text"] if not q.get("image") or IMAGE in q["text"] else f"{IMAGE}\n{q['text']}"
        rec = {"id": qid, "conversations": [{"from": "human", "value": text},
                                            {"from": "gpt", "value": str(answers[qid]["answer"])}]}
        if q.get("image"):
            rec["image"] = q["image"]
        out.append(rec)
    return out


def _spans(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True: the answer turns of one sequence's labels."""
    out, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@torch.no_grad()
def answer_losses(client: ClientPart, server: ServerPart, ds: LlavaDataset, pad_id: int,
                  batch_size: int = 32) -> tuple[list[float], list[bool], list[list[tuple[float, bool]]]]:
    """Per question (record): the summed cross-entropy (nats) of its answer tokens, whether each is the argmax, and
    per answer turn of the record (a run of answer tokens) its own summed loss and exact match."""
    losses, exact, turns = [], [], []
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(len(ds), start + batch_size))], pad_id=pad_id)
        sent = client(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        logits = server(sent.image.values, sent.text.values, sent.layout).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        mask = target != IGNORE_INDEX
        ce = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none") * mask
        right = (logits.argmax(-1) == target) | ~mask
        losses += ce.sum(1).tolist()
        exact += right.all(1).tolist()
        for row_ce, row_right, row_mask in zip(ce.tolist(), right.tolist(), mask.tolist()):
            turns.append([(sum(row_ce[a:b]), all(row_right[a:b])) for a, b in _spans(row_mask)])
    return losses, exact, turns


def by_kind(records: list[dict], turns: list[list[tuple[float, bool]]]) -> dict[str, dict]:
    """The validation split's answer turns grouped by question kind (`answer_probe.question_kind`: word, exist,
    color, ...): per kind the number of turns, their mean loss and exact-match share. A record whose answer turns do
    not match its questions one to one (cut by the length limit) is left out."""
    acc: dict[str, list[tuple[float, bool]]] = {}
    for rec, rec_turns in zip(records, turns):
        questions = [c["value"] for c in rec["conversations"] if c["from"] == "human"]
        if len(questions) != len(rec_turns):
            continue
        for q, t in zip(questions, rec_turns):
            acc.setdefault(question_kind(q), []).append(t)
    return {k: {"n": len(v), "nll": sum(x for x, _ in v) / len(v), "exact_pct": 100.0 * sum(e for _, e in v) / len(v),
                "per_question": [round(x, 5) for x, _ in v]} for k, v in sorted(acc.items())}


def checkpoint_losses(checkpoint: Path, cfg, data_root: Path, suites: list[str], batch_size: int) -> dict:
    tok = load_tokenizer_for(cfg, data_root)
    client = ClientPart.from_pretrained(checkpoint / "client").eval()
    server = ServerPart.from_pretrained(checkpoint / "server").eval()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for suite in suites:
            if suite == VAL:
                path = data_root / VAL_FILE
            else:
                path = Path(tmp) / f"{suite}.json"
                path.write_text(json.dumps(suite_conversations(data_root / "suites" / suite)), encoding="utf-8")
            ds = LlavaDataset.for_config(cfg, path, data_root / "images", tok, template_name(cfg))
            losses, exact, turns = answer_losses(client, server, ds, tok.pad_token_id, batch_size)
            out[suite] = {"n": len(losses), "nll": sum(losses) / len(losses),
                          "exact_pct": 100.0 * sum(exact) / len(exact), "per_question": [round(x, 5) for x in losses]}
            if suite == VAL:
                by_id = {str(r.get("id")): r for r in json.loads(path.read_text(encoding="utf-8"))}
                missing = [i for i in ds.ids if str(i) not in by_id]
                if missing or len(by_id) != len(losses):
                    raise ValueError(f"{path}: {len(by_id)} records but {len(losses)} scored (ids not found: "
                                     f"{missing[:5]})")
                records = [by_id[str(i)] for i in ds.ids]  # in the dataset's order, which the turns follow
                out.update({f"{VAL}/{k}": v for k, v in by_kind(records, turns).items()})
    return out


def study_checkpoints(study: Path, configs: list[str] | None) -> dict[tuple[str, int], Path]:
    found = {}
    for final in sorted(study.glob("*/seed*/stage2/final")):
        name, seed = final.parts[-4], final.parts[-3]
        if (final / "DONE").exists() and re.fullmatch(r"seed\d+", seed) and (not configs or name in configs):
            found[name, int(seed[4:])] = final
    return found


def paired(results: dict[tuple[str, int], dict], suites: list[str], ref: str = "fp16",
           references: dict[str, str] | None = None) -> list[dict]:
    """Per configuration and suite: the mean difference of answer loss (and exact match) to its reference (`ref`,
    or `references[config]`: the study's REFERENCES, fp16 given the same steps), paired by seed, with its standard
    error (None for a single pair)."""
    rows = []
    for name in sorted({n for n, _ in results}):
        reference = (references or {}).get(name, ref)
        seeds = sorted(s for n, s in results if n == name and (reference, s) in results)
        if name == reference or not seeds:
            continue
        row = {"config": name, "reference": reference, "seeds": seeds}
        for suite in suites:
            for key in ("nll", "exact_pct"):
                d = [results[name, s][suite][key] - results[reference, s][suite][key] for s in seeds]
                m, se = mean_and_se(d)
                row[f"{suite}/{key}"] = {"delta": m, "se": se}
        rows.append(row)
    return rows


def _cell(d: dict, digits: int) -> str:
    """'+delta +- se' (the standard error only where two seeds or more pair up)."""
    return f"{d['delta']:+.{digits}f}" + ("" if d["se"] is None else f" +- {d['se']:.{digits}f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path, help="stage-2 final folders (with client/ and server/)")
    p.add_argument("--study", type=Path, nargs="+", default=[],
                   help="study folders: every finished <config>/seed<k>/stage2/final (the first one found of a "
                        "config and seed wins)")
    p.add_argument("--configs", nargs="*", help="with --study: only these configurations")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", "-o", action="append", default=[], help="configuration overrides (e.g. data.root)")
    p.add_argument("--suites", nargs="*", default=list(SUITES), choices=SUITES + (VAL,),
                   help=f"suites to score (default: the five), and {VAL}: the tuning split")
    p.add_argument("--val-kinds", nargs="*", default=["word"],
                   help=f"with {VAL}: also show these question kinds of the split (answer turns; default: word, the "
                        "glyph-reading kind); the JSON holds every kind")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.set)
    data_root = Path(cfg.data.root)
    jobs = {(str(c), 0): c for c in args.checkpoints}
    for study in reversed(args.study):
        jobs.update(study_checkpoints(study, args.configs))
    if not jobs:
        raise SystemExit("no checkpoints: name stage-2 final folders, or --study DIR")
    results = {}
    for key, ckpt in jobs.items():
        if not (ckpt / "client").is_dir():
            raise SystemExit(f"{ckpt}: not a checkpoint folder (no client/ inside)")
        results[key] = checkpoint_losses(ckpt, cfg, data_root, args.suites, args.batch_size)
        log.info("%s seed %d: %s", *key, "  ".join(f"{s} {r['nll']:.4f} ({r['exact_pct']:.1f} %)"
                                                   for s, r in results[key].items()))
    kinds = [f"{VAL}/{k}" for k in args.val_kinds] if VAL in args.suites else []
    shown = args.suites + [k for k in kinds if all(k in r for r in results.values())]
    print("| config | seed | " + " | ".join(f"{s} loss | {s} exact %" for s in shown) + " |")
    print("|---|---|" + "---:|---:|" * len(shown))
    for (name, seed), r in sorted(results.items()):
        print(f"| {name} | {seed} | " + " | ".join(f"{r[s]['nll']:.4f} | {r[s]['exact_pct']:.1f}" for s in shown)
              + " |")
    diffs = paired(results, shown, references=REFERENCES) if args.study else []
    if diffs:
        print("\nAgainst fp16 (or the row's reference: fp16 given the same steps), paired by seed (mean difference +- "
              "standard error; loss in nats per question):\n")
        print("| config | reference | seeds | " + " | ".join(f"{s} loss | {s} exact %" for s in shown) + " |")
        print("|---|---|---|" + "---:|---:|" * len(shown))
        for row in diffs:
            cells = [_cell(row[f"{s}/{k}"], 4 if k == "nll" else 1) for s in shown for k in ("nll", "exact_pct")]
            print(f"| {row['config']} | {row['reference']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "runs": [{"config": n, "seed": s, "checkpoint": jobs[n, s], "suites": r}
                                          for (n, s), r in sorted(results.items())],
             "paired_vs_fp16": diffs}, indent=1, default=str))  # paths as strings


if __name__ == "__main__":
    main()
