"""Can the LLM answer the questions when it is told the scene in words? Each instruction conversation that holds a
description turn gives (description, question, answer) triples; the LLM alone (no image) gets "Image: <description>"
before the question. Greedy accuracy on the validation split before and after `--steps` steps of full fine-tuning on
the training split's triples.

If the LLM cannot learn this from text in a few hundred steps, it will not learn it from image tokens either; if it
can, what a vision model must still learn is to put the scene into tokens the LLM reads that way.

    python benchmarks/diagnostics/text_qa.py [--config smol] [--steps 100] [--lr 1e-4] [--n-val 120]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtllava.config import load_config

DESCRIBE = ("Give a short description", "What is in the image", "Describe the image", "Summarize the image")


def triples(path: Path) -> list[tuple[str, str, str]]:
    """(description, question, answer) for every question of a conversation that also describes its image."""
    out = []
    for record in json.loads(path.read_text()):
        turns = record["conversations"]
        pairs = [(turns[i]["value"].replace("<image>\n", ""), turns[i + 1]["value"])
                 for i in range(0, len(turns) - 1, 2)]
        desc = next((a for q, a in pairs if q.startswith(DESCRIBE)), None)
        if desc is not None:
            out += [(desc, q, a) for q, a in pairs if not q.startswith(DESCRIBE)]
    return out


def prompt_ids(tok, desc: str, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": f"Image: {desc}\n{question}"}],
                                  add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@torch.no_grad()
def accuracy(model, tok, items) -> float:
    ok = 0
    for desc, q, a in items:
        ids = torch.tensor([prompt_ids(tok, desc, q)])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        got = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().rstrip(".").lower()
        ok += got == a.strip().lower()
    return 100.0 * ok / max(len(items), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smol")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-val", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    root = Path(cfg.data.root)
    tok = AutoTokenizer.from_pretrained(cfg.llm.pretrained, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.llm.pretrained, local_files_only=True)
    train, val = triples(root / "instruct_train.json"), triples(root / "instruct_val.json")[:args.n_val]
    rng = random.Random(0)
    model.eval()
    before = accuracy(model, tok, val)
    print(f"{len(train)} training triples, {len(val)} validation; accuracy before: {before:.1f} %", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = rng.sample(train, args.batch)
        seqs, labels = [], []
        for desc, q, a in batch:
            prompt = prompt_ids(tok, desc, q)
            answer = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    print(f"accuracy after {args.steps} steps at lr {args.lr:g}: {accuracy(model, tok, val):.1f} % "
          f"(before: {before:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
