"""What does a downlink codec do to the client's update? Exact gradients against coded ones, per parameter group.

From a checkpoint, the client and server parts of `--stage` are built as the training run builds them (stage 1
from a stage-0 folder: fresh connector and codecs, the text decoder fitted; stage 2 from a stage-1 folder), with a
configuration of `benchmarks/study.py` (`--study NAME`) or plain overrides. For each of `--batches` batches of the
stage's data the server's gradient with respect to the image and text rows is computed exactly (fp32), then sent
through each downlink codec of `--codecs` (encode, decode) and backpropagated into the client, and the client's
trainable parameters' gradients are compared with the exact ones, per group (`connector`, `embed_tokens`, ...):

- cos: cosine of the coded gradient to the exact one, per batch, averaged;
- norm: |coded| / |exact|, averaged;
- bits: payload bits (values and side information) per element of the image and of the text rows;
- zeroed: the share of the rows' non-zero gradient elements that arrive as zero (fp16 flushes those below 3e-8,
  half its smallest subnormal; an integer grid those below half a step of their row's absmax);
- rows: relative error |coded - exact| / |exact| of the image and of the text rows' gradient as sent (merged:
  of the summed rows);
- adam: cosine between Adam-like directions after all batches, mean_k g_k / (sqrt(mean_k g_k^2) + eps) per element
  (exact vs coded; eps = AdamW's 1e-8): how much of the per-element step survives the codec once Adam normalises
  each element;
- clip: mean ratio of the coded to the exact total gradient norm over all groups (what `max_grad_norm` sees).

Only the downlink part of the client's gradient is compared (the codecs' auxiliary losses are the same either way).

    python benchmarks/downlink_probe.py runs/baseline/stage0/final --stage stage1 --study fsq-L4-ans-clr0
    python benchmarks/downlink_probe.py runs/baseline/stage0/final --stage stage1 --train-as stage2 --study ...
    python benchmarks/downlink_probe.py runs/study/fsq-L4-ans-clr0/seed0/stage1/final --study fsq-L4-ans-clr0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from qtllava.compress.grad import decode_grad, encode_grad, merge_rows, spread_rows
from qtllava.config import load_config
from qtllava.train.loop import stage_batches, stage_parts
from qtllava.train.recipes import apply_trainable, recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import CONFIGS  # noqa: E402

log = logging.getLogger("downlink_probe")
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which qtllava's optimizers use


def group_of(name: str) -> str:
    """A client parameter's group: its top-level submodule (connector, embed_tokens, image_codec, ...)."""
    return name.split(".")[0]


def coded(g: torch.Tensor, codec: str, sr: bool, generator: torch.Generator,
          merge_by: torch.Tensor | None = None) -> tuple[torch.Tensor, int, float, float]:
    """g after the wire, the payload bytes it took, the relative error of the rows sent and the share of their
    non-zero elements that arrive as zero: exact for "exact", else encoded and decoded by the gradient codec
    `codec`; `merge_by`: the rows' values, rows with equal values sent as one summed row."""
    sent = merge_rows(g, merge_by) if merge_by is not None else g
    if codec == "exact":
        back, nbytes = sent, 0
    else:
        packet = encode_grad(sent, codec, stochastic=sr, generator=generator)
        back, nbytes = decode_grad(packet).to(g.dtype), len(packet.payload) + len(packet.side)
    err = float((back - sent).norm() / sent.norm().clamp_min(1e-30))
    nonzero = sent != 0
    zeroed = float(((back == 0) & nonzero).sum() / nonzero.sum().clamp_min(1))
    return (spread_rows(back, merge_by) if merge_by is not None else back), nbytes, err, zeroed


def probe(client, server, batches, n_batches: int, codecs: list[str], sr: bool, seed: int,
          loss_average: str, merge_text: bool = False) -> dict:
    """-> {codec: {group: {cos, norm, adam}, "clip": ratio, "rows": {image, text} relative errors, "bits": {image,
    text} payload bits per element}} over `n_batches` batches."""
    params = {n: p for n, p in client.named_parameters() if p.requires_grad}
    groups = sorted({group_of(n) for n in params})
    names = ["exact"] + [c for c in codecs if c != "exact"]
    per = {c: {g: {"cos": 0.0, "norm": 0.0} for g in groups} for c in names}
    clip = {c: 0.0 for c in names}
    rows = {c: {"image": 0.0, "text": 0.0} for c in names}
    bits = {c: {"image": 0.0, "text": 0.0} for c in names}
    zeros = {c: {"image": 0.0, "text": 0.0} for c in names}
    sums = {c: {g: None for g in groups} for c in names}  # sum_k g_k, sum_k g_k^2 per group (flattened)
    gen = torch.Generator().manual_seed(seed)
    for k in range(n_batches):
        batch = batches(k)[0]
        out = client(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
        image = out.image.values.detach().clone().requires_grad_(True)
        text = out.text.values.detach().clone().requires_grad_(True)
        res = server(image, text, out.layout, labels=batch["labels"], loss_average=loss_average)
        gi, gt = torch.autograd.grad(res.loss, [image, text], allow_unused=True)
        gi = torch.zeros_like(image) if gi is None else gi
        gt = torch.zeros_like(text) if gt is None else gt
        flat = {}
        for c in names:
            tensors, grads = [], []
            for m, v, g in (("image", out.image.values, gi), ("text", out.text.values, gt)):
                sent, nbytes, err, zeroed = coded(g, c, sr, gen, v if m == "text" and merge_text else None)
                rows[c][m] += err / n_batches
                zeros[c][m] += zeroed / n_batches
                bits[c][m] += 8 * nbytes / max(g.numel(), 1) / n_batches
                if v.requires_grad:
                    tensors.append(v)
                    grads.append(sent)
            got = torch.autograd.grad(tensors, list(params.values()), grads, retain_graph=True, allow_unused=True)
            flat[c] = {g: torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                     for (n, p), x in zip(params.items(), got) if group_of(n) == g])
                       for g in groups}
        ex_total = torch.cat(list(flat["exact"].values())).norm()
        for c in names:
            clip[c] += float(torch.cat(list(flat[c].values())).norm() / ex_total.clamp_min(1e-30)) / n_batches
            for g in groups:
                e, q = flat["exact"][g], flat[c][g]
                per[c][g]["cos"] += float(torch.nn.functional.cosine_similarity(e, q, dim=0, eps=1e-30)) / n_batches
                per[c][g]["norm"] += float(q.norm() / e.norm().clamp_min(1e-30)) / n_batches
                s = sums[c][g]
                sums[c][g] = (q.clone(), q * q) if s is None else (s[0] + q, s[1] + q * q)
        log.info("batch %d/%d: loss %.4f", k + 1, n_batches, float(res.loss.detach()))

    def adam(s: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # mean / (root mean square + AdamW's eps)
        return (s[0] / n_batches) / ((s[1] / n_batches).sqrt() + ADAM_EPS)

    for c in names:
        ex = {g: adam(sums["exact"][g]) for g in groups}
        for g in groups:
            d = adam(sums[c][g])
            per[c][g]["adam"] = float(torch.nn.functional.cosine_similarity(ex[g], d, dim=0, eps=1e-30))
        per[c]["clip"] = clip[c]
        per[c]["rows"] = rows[c]
        per[c]["zeroed"] = zeros[c]
        per[c]["bits"] = bits[c]
    return per


def table(result: dict) -> str:
    groups = sorted(g for g in next(iter(result.values())) if g not in ("clip", "rows", "bits", "zeroed"))
    head = "| codec | image bits/el | text bits/el | image rows err | text rows err | image zeroed | text zeroed | " + \
        " | ".join(f"{g} cos | {g} norm | {g} adam" for g in groups) + " | clip |"
    lines = [head, "|" + "---|" * (8 + 3 * len(groups))]
    for c, r in result.items():
        cells = [f"{r[g]['cos']:.4f} | {r[g]['norm']:.3f} | {r[g]['adam']:.4f}" for g in groups]
        lines.append(f"| {c} | {r['bits']['image']:.3f} | {r['bits']['text']:.3f} | {r['rows']['image']:.4f} | "
                     f"{r['rows']['text']:.4f} | {r['zeroed']['image']:.3f} | {r['zeroed']['text']:.3f} | " +
                     " | ".join(cells) +
                     f" | {r['clip']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="folder with client/ and server/ (the previous stage's final)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--stage", default="stage2", choices=["stage1", "stage2"],
                   help="build the parts as this stage does from the checkpoint")
    p.add_argument("--train-as", choices=["stage1", "stage2"],
                   help="the trainable parameters and data of this stage (default: --stage); e.g. --stage stage1 "
                        "--train-as stage2 probes stage 2's gradients straight from a stage-0 base")
    p.add_argument("--study", help="a configuration name of benchmarks/study.py (its overrides come first)")
    p.add_argument("--set", "-o", action="append", default=[])
    p.add_argument("--codecs", nargs="+", default=["fp16", "int8-ans", "int6-ans", "int4-ans", "int2-ans"])
    p.add_argument("--sr", action="store_true", help="stochastic rounding for the integer codecs")
    p.add_argument("--merge-text", action="store_true",
                   help="text rows with equal values sent as one summed row (compress.merge_text_rows)")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.study and args.study not in CONFIGS:
        raise SystemExit(f"--study {args.study!r}: not a configuration of benchmarks/study.py")
    cfg = load_config(args.config, (CONFIGS[args.study] if args.study else []) + args.set)
    data_root = Path(cfg.data.root)
    scfg, tok, client, server = stage_parts(cfg, args.stage, data_root, args.checkpoint)
    train_as = args.train_as or args.stage
    apply_trainable(client, recipe(cfg, train_as).client_trainable)
    server.requires_grad_(False)
    client.train()
    server.train()
    batches = stage_batches(scfg, train_as, data_root, tok)
    result = probe(client, server, batches, args.batches, args.codecs, args.sr, cfg.train.seed,
                   cfg.train.loss_average, args.merge_text)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=1))


if __name__ == "__main__":
    main()
