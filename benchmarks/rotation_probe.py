"""Would an orthogonal rotation before fsq's scalar quantizer lower the round-trip error of real rows?

Low-bit quantizers of LLM activations (QuaRot, QuIP#, SpinQuant) rotate each row by an orthogonal matrix first
("incoherence processing"): outlier channels get spread over all channels, so one row's scale fits every element
better and the error per bit falls. fsq's maps start at the identity (and stay there with the maps frozen), so a
rotation would be a different start of the client map (R) and the server map (R^T). This probe measures, on the rows
a checkpoint's client sends (the instruction validation split; never the benchmark suites), the fsq round trip
(per-row normalisation at the Gaussian-optimal width, L levels, the row's mean and std restored) through

- `identity` (the default),
- `orthogonal`: a random orthogonal matrix (QR of a Gaussian one, seeded),
- `hadamard`: a randomised Walsh-Hadamard matrix (random signs, then Hadamard; D a power of two),

reporting per modality and L the relative squared error of the centred rows, their mean cosine, and the pooled
entropy of the codes (what `ans` would pay before its row dictionary and context models), with the rows' channel
scale spread (max / median channel std) and kurtosis that decide whether rotating can help.

    python benchmarks/rotation_probe.py runs/study/fsq-L4-ans-clr0/seed5/stage1/final --json results/rotation_probe.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from qtllava.compress.fsq import FsqEncoder

log = logging.getLogger("rotation_probe")


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def rotations(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """name -> (dim, dim) orthogonal matrix R; a row x is quantized as x R^T and restored as x_hat R."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]  # Haar-distributed
    out = {"identity": torch.eye(dim), "orthogonal": q.float()}
    if dim & (dim - 1) == 0:
        signs = torch.where(torch.rand(dim, generator=g) < 0.5, -1.0, 1.0)
        out["hadamard"] = hadamard(dim) * signs[None, :]
    return out


@torch.no_grad()
def round_trip(x: torch.Tensor, rot: torch.Tensor, levels: int) -> dict[str, float]:
    """fsq's round trip of the rows x (N, D) in the rotated basis (an fsq encoder whose map is `rot`, its defaults
    otherwise: per-row statistics sent, the Gaussian-optimal width; back through rot^T): relative squared error and
    mean cosine of the centred rows, and the pooled entropy of the codes in bits per element."""
    enc = FsqEncoder(x.shape[1], x.shape[1], levels)
    enc.proj.weight.copy_(rot)
    _, values, idx, _ = enc.quantize(x)
    x_hat = values @ rot
    centred = x - x.mean(dim=1, keepdim=True)
    centred_hat = x_hat - x.mean(dim=1, keepdim=True)
    p = torch.bincount(idx.flatten().long(), minlength=levels).double()
    p = p[p > 0] / p.sum()
    return {"rel_err": float(((x_hat - x) ** 2).sum() / (centred ** 2).sum()),
            "cos": float(F.cosine_similarity(centred_hat, centred, dim=1).mean()),
            "entropy_bits": float(-(p * p.log2()).sum())}


def row_shape(x: torch.Tensor) -> dict[str, float]:
    """What decides whether rotating helps: how unequal the channels' scales are, and how heavy-tailed a row is."""
    std = x.std(dim=0)
    rows = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True).clamp_min(1e-12)
    return {"channel_std_max_over_median": float(std.max() / std.median()), "row_kurtosis": float((rows ** 4).mean())}


def probe(rows: dict[str, torch.Tensor], levels: list[int], seed: int = 0) -> dict:
    out = {}
    for mod, x in rows.items():
        x = x.float()
        out[mod] = {"rows": int(x.shape[0]), **row_shape(x),
                    "levels": {str(L): {name: round_trip(x, rot, L) for name, rot in rotations(x.shape[1], seed).items()}
                               for L in levels}}
    return out


def table(result: dict) -> str:
    lines = ["| rows | L | rotation | rel. squared error | cosine | pooled entropy bits |", "|---|---:|---|---:|---:|---:|"]
    for mod, r in result.items():
        for L, by in r["levels"].items():
            for name, m in by.items():
                lines.append(f"| {mod} | {L} | {name} | {m['rel_err']:.4f} | {m['cos']:.4f} | {m['entropy_bits']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="folder with client/ (a stage's final/)")
    p.add_argument("--data", help="generated data root (default: the checkpoint's configuration's)")
    p.add_argument("--batches", type=int, default=4, help="validation batches (stage-2 batch size)")
    p.add_argument("--levels", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qtllava.eval.levels_cli import checkpoint_rows

    cr = checkpoint_rows(args.checkpoint, args.data, batches=args.batches)
    result = probe(cr.rows, args.levels, args.seed)
    for mod, r in result.items():
        log.info("%s: %d rows, channel std max/median %.2f, row kurtosis %.2f", mod, r["rows"],
                 r["channel_std_max_over_median"], r["row_kurtosis"])
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=1))


if __name__ == "__main__":
    main()
