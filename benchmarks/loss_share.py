"""What share of a stage's training loss each kind of answer gets, under per-token and per-turn averaging.

The loss of a batch is an average over its label tokens (`train.loss_average = "token"`, as Hugging Face) or over
its assistant turns ("turn"; qtllava.model.loss). A kind of answer that is short and rare, like an option letter,
then gets a small share of every gradient. This replays the stage's own batches (the same datasets, sampler, seed,
template, tokenizer and truncation as training; no model, no images read) and sums, per question kind (the kinds of
benchmarks/answer_probe.py), the loss weight of its answer tokens (end-of-turn token included), and separately that
of the first answer token alone (for a letter, the letter itself):

    python benchmarks/loss_share.py --config tiny -o 'data.root="data/tiny-mc2"' [--stage stage0] [--steps 500]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from qtllava.data.templates import template_name
from qtllava.config import load_config
from qtllava.data import IGNORE_INDEX, LlavaDataset
from qtllava.train.loop import STAGES, load_tokenizer_for, micro_batch_indices
from qtllava.train.recipes import recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answer_probe import question_kind  # noqa: E402


def turn_runs(labels: np.ndarray) -> list[int]:
    """Lengths of the maximal runs of label positions (one per assistant turn, in order)."""
    runs, n = [], 0
    for keep in labels != IGNORE_INDEX:
        if keep:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs + ([n] if n else [])


def record_turns(ds: LlavaDataset, records: list[dict], i: int) -> list[tuple[str, int]]:
    """(kind, trained tokens) of each assistant turn of record i that survives truncation."""
    questions = [t["value"] for t in records[i]["conversations"] if t["from"] == "human"]
    labels = ds.items[i].labels
    runs = turn_runs(labels[1:] if labels is not None else np.zeros(0))  # shifted, as the loss sees them
    return [(question_kind(q), n) for q, n in zip(questions, runs)]


def stage_turns(cfg, stage: str) -> list[list[tuple[str, int]]]:
    """(kind, trained tokens) of every turn of every sample of the stage's data, indexed as the stage samples."""
    root = Path(cfg.data.root)
    rec = recipe(cfg, stage)
    tok = load_tokenizer_for(cfg, root)
    template = template_name(cfg) if rec.template == "chat" else "pretrain"
    turns = []  # per dataset, per record: [(kind, n)]
    for name in rec.data:
        ds = LlavaDataset.for_config(cfg, root / name, root / "images", tok, template)
        records = json.loads((root / name).read_text(encoding="utf-8"))
        ids = {r["id"]: k for k, r in enumerate(records)}
        turns += [record_turns(ds, records, ids[item_id]) for item_id in ds.ids]
    return turns


def batch_turns(cfg, stage: str, turns: list[list[tuple[str, int]]], step: int, micro: int = 0
                ) -> list[tuple[str, int]]:
    """The turns of the stage's micro-batch `micro` of `step` (the sampler of qtllava.train.loop.stage_batches)."""
    return [t for j in micro_batch_indices(cfg, stage, len(turns), step, micro) for t in turns[j]]


def loss_shares(cfg, stage: str, steps: int) -> dict[str, dict[str, float]]:
    """kind -> {"turns", "token", "turn", "first_token", "first_turn"}: shares (%) over the first `steps` batches."""
    turns = stage_turns(cfg, stage)
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for step in range(steps):
        batch = batch_turns(cfg, stage, turns, step)
        n_tokens, n_turns = sum(n for _, n in batch), len(batch)
        for kind, n in batch:
            a = acc[kind]
            a["turns"] += 1
            a["token"] += n / n_tokens
            a["turn"] += 1 / n_turns
            a["first_token"] += 1 / n_tokens
            a["first_turn"] += 1 / (n * n_turns)
    total_turns = sum(a["turns"] for a in acc.values())
    return {kind: {"turns": 100 * a["turns"] / total_turns,
                   **{k: 100 * a[k] / steps for k in ("token", "turn", "first_token", "first_turn")}}
            for kind, a in sorted(acc.items(), key=lambda kv: -kv[1]["token"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stage", default="stage0", choices=STAGES)
    ap.add_argument("--steps", type=int, default=500, help="batches to replay from the stage's first")
    args = ap.parse_args(argv)
    shares = loss_shares(load_config(args.config, args.set), args.stage, args.steps)
    sys.stdout.write(f"{'kind':<8} {'turns %':>8} {'token avg %':>12} {'turn avg %':>11} "
                     f"{'1st token: token avg %':>23} {'turn avg %':>11}\n")
    for kind, s in shares.items():
        sys.stdout.write(f"{kind:<8} {s['turns']:>8.2f} {s['token']:>12.2f} {s['turn']:>11.2f} "
                         f"{s['first_token']:>23.2f} {s['first_turn']:>11.2f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
