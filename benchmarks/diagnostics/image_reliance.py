"""Does a checkpoint's answer depend on the image? The mean teacher-forced loss per label token of LLaVA-JSON
records with each record's own image, with another record's (the batch rolled by one) and with a blank image.

A model that reads the image has a much lower loss with its own image than with another one; equal losses mean the
answers come from the text alone. `--suites` turns the generated suites' questions and answers into records.

    python benchmarks/diagnostics/image_reliance.py CHECKPOINT --config smol [--data data/smol]
        [--records captions.json instruct_val.json] [--suites shape-pope soc-vqa soc-mc] [--n 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from qtllava.config import load_config
from qtllava.data import LlavaDataset, collate
from qtllava.data.templates import template_name
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.train.loop import load_tokenizer_for

MODES = ("own", "swapped", "blank")


def suite_records(root: Path, suite: str, n: int) -> list[dict]:
    """The first `n` questions of a generated suite with their answers, as LLaVA-JSON records."""
    folder = root / "suites" / suite
    answers = {r["question_id"]: r["answer"] for r in map(json.loads, (folder / "answers.jsonl").open())}
    qs = [json.loads(line) for line in (folder / "questions.jsonl").open()][:n]
    return [{"id": str(q["question_id"]), "image": q["image"],
             "conversations": [{"from": "human", "value": "<image>\n" + q["text"]},
                               {"from": "gpt", "value": answers[q["question_id"]]}]} for q in qs]


@torch.no_grad()
def reliance(client: ClientPart, server: ServerPart, ds: LlavaDataset, pad_id: int, n: int,
             batch_size: int = 8) -> dict[str, float]:
    out = {}
    for mode in MODES:
        total, count = 0.0, 0
        for i in range(0, min(n, len(ds)) - batch_size + 1, batch_size):
            b = collate([ds[j] for j in range(i, i + batch_size)], pad_id=pad_id)
            pixels = b["pixel_values"]
            if mode == "swapped":
                pixels = pixels.roll(1, 0)
            elif mode == "blank":
                pixels = torch.zeros_like(pixels)
            enc = client(b["input_ids"], b["attention_mask"], pixels)
            o = server(server.image_codec.dequantize(enc.image.packet), server.text_codec.dequantize(enc.text.packet),
                       enc.layout, labels=b["labels"])
            total += float(o.loss) * int(o.n_tokens)
            count += int(o.n_tokens)
        out[mode] = round(total / max(count, 1), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a folder with client/ and server/ (a stage's final/ or a checkpoint)")
    p.add_argument("--config", default="smol")
    p.add_argument("--data", help="the generated data root (default: the config's data.root)")
    p.add_argument("--records", nargs="*", default=["captions.json"], help="LLaVA-JSON files under the data root")
    p.add_argument("--suites", nargs="*", default=["shape-pope", "soc-vqa", "soc-mc"])
    p.add_argument("--n", type=int, default=48, help="records per file (whole batches of 8)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    root = Path(args.data or cfg.data.root)
    tok = load_tokenizer_for(cfg, root)
    ck = Path(args.checkpoint)
    client, server = ClientPart.from_pretrained(ck / "client").eval(), ServerPart.from_pretrained(ck / "server").eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = [(name, root / name) for name in args.records]
        for suite in args.suites:
            path = Path(tmp) / f"{suite}.json"
            path.write_text(json.dumps(suite_records(root, suite, args.n)))
            files.append((suite, path))
        print(f"{'records':<22} " + " ".join(f"{m:>8}" for m in MODES))
        for name, path in files:
            ds = LlavaDataset.load(path, root / "images", tok, template=template_name(cfg),
                                   image_size=cfg.vision.image_size, num_image_tokens=cfg.vision.num_image_tokens,
                                   max_length=cfg.data.max_length)
            r = reliance(client, server, ds, tok.pad_token_id, args.n)
            print(f"{name:<22} " + " ".join(f"{r[m]:>8.4f}" for m in MODES), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
