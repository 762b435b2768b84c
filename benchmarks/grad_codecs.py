"""What the downlink codecs cost and distort on real gradients (issue 6: is the int4 gradient the weak point?).

The gradients that the server returns to the client in the first `--steps` steps of a stage (stage 2 by default),
started from a study run's checkpoint (`--run`, a folder with pipeline.json and stage1/final, by default the study's
fsq L = 4 ans, frozen maps, seed 0; stage 1 starts from the base, `--init`) and trained as the study trains them,
are kept and coded again with every registered gradient codec (rounding to nearest, and stochastic where the codec
has a grid), and with two reference quantizers that are not on the wire:

- `ecsq rms/k`: uniform steps of (row rms) / k, symbols ANS-coded: the entropy-coded scalar quantizer, which at
  these rates is within 0.25 bits (1.53 dB) of the rate-distortion bound of a Gaussian source;
- `int4 absmax/64`: the int4 grid with one fp32 absmax per 64 elements instead of per row, ANS-coded.

Per codec: bits per element as sent (payload + scales + entropy model), the relative squared error
sum (g - g')^2 / sum g^2, the cosine between g and g' (both over all rows of a step, averaged over steps), and the
Gaussian bound 2^(-2R) at the same rate for scale. Also the rows' kurtosis and median absmax / rms (3 and ~2.9 for
Gaussian rows of 256). Writes results/grad_codecs.json and prints the table.

    python benchmarks/grad_codecs.py [--run runs/study/fsq-L4-ans-clr0/seed0] [--stage stage2] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from qtllava.compress.coding import ans_encode
from qtllava.compress.grad import decode_grad, encode_grad, grad_codec_names
from qtllava.config import from_dict
from qtllava.train import server_runtime
from qtllava.train.loop import run_stage


def collect(run: Path, stage: str, steps: int, init: Path) -> list[torch.Tensor]:
    """The gradient tensors the server encodes in the first `steps` steps of `stage` (two per step: image, text),
    trained from `init` with the run's configuration."""
    cfg = from_dict(json.loads((run / "pipeline.json").read_text(encoding="utf-8"))["config"])
    if not (init / "client").is_dir():
        raise SystemExit(f"{init} holds no checkpoint: run `make bench-study` first, or pass --run / --init")
    seen: list[torch.Tensor] = []
    real = server_runtime.encode_grad

    def keep(g, name, stochastic=False, generator=None):
        seen.append(g.detach().to(torch.float32).clone())
        return real(g, name, stochastic, generator)

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(server_runtime, "encode_grad", keep):
        run_stage(cfg, stage, cfg.data.root, Path(tmp) / stage, init=init, max_steps=steps, progress=False)
    return seen


def _registered(name: str, stochastic: bool):
    def code(g: torch.Tensor) -> tuple[torch.Tensor, int]:
        packet = encode_grad(g, name, stochastic=stochastic, generator=torch.Generator().manual_seed(0))
        return decode_grad(packet), len(packet.payload) + len(packet.side)
    return code


def _uniform(block: int | None, scale: str, step: float):
    """Uniform grid of `step` x (the block's rms or absmax), clamped to +-127 steps, ANS-coded with 4-byte scales."""
    def code(g: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows = g.reshape(-1, block or g.shape[-1])
        s = rows.pow(2).mean(1).sqrt() if scale == "rms" else rows.abs().amax(1)
        d = torch.where(s > 0, s, torch.ones_like(s)) * step
        q = torch.round(rows / d[:, None]).clamp(-127, 127)
        payload, model = ans_encode((q + 127).to(torch.uint8).numpy(), 255)
        return (q * d[:, None]).reshape(g.shape), len(payload) + len(model) + 4 * rows.shape[0]
    return code


def codecs() -> dict[str, object]:
    out = {}
    for name in grad_codec_names():
        out[name] = _registered(name, False)
        if name.startswith("int"):
            out[f"{name} sr"] = _registered(name, True)
    for k in (1.0, 1.4, 2.0, 2.4, 3.0):
        out[f"ecsq rms/{k:g}"] = _uniform(None, "rms", 1 / k)
    out["int4 absmax/64"] = _uniform(64, "absmax", 1 / 7)
    return out


def measure(grads: list[torch.Tensor]) -> list[dict]:
    rows = []
    for name, code in codecs().items():
        bits, rel, cos = [], [], []
        for g in grads:
            h, nbytes = code(g)
            bits.append(8 * nbytes / g.numel())
            rel.append(float((g - h).pow(2).sum() / g.pow(2).sum().clamp_min(1e-30)))
            cos.append(float(torch.nn.functional.cosine_similarity(g.flatten(), h.flatten(), dim=0)))
        r = float(np.mean(bits))
        rows.append({"codec": name, "bits_per_element": r, "relative_sq_error": float(np.mean(rel)),
                     "cosine": float(np.mean(cos)), "gaussian_bound": 2.0 ** (-2 * r)})
    return rows


def row_shape(grads: list[torch.Tensor]) -> dict:
    flat = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads])
    flat = flat[flat.abs().amax(1) > 0]
    rms = flat.pow(2).mean(1, keepdim=True).sqrt()
    return {"rows": int(flat.shape[0]), "channels": int(flat.shape[1]),
            "kurtosis": float((flat / rms).pow(4).mean()),
            "median_absmax_over_rms": float((flat.abs().amax(1, keepdim=True) / rms).median())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/study/fsq-L4-ans-clr0/seed0"))
    ap.add_argument("--stage", choices=["stage1", "stage2"], default="stage2")
    ap.add_argument("--init", type=Path, help="the checkpoint the stage starts from (default: the run's stage1/final "
                    "for stage 2, the baseline's runs/baseline/stage0/final for stage 1, as the study does)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/grad_codecs.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not (args.run / "pipeline.json").exists():
        raise SystemExit(f"{args.run}/pipeline.json not found: run `make bench-study` first, or pass --run")
    init = args.init or (args.run / "stage1/final" if args.stage == "stage2" else Path("runs/baseline/stage0/final"))
    grads = collect(args.run, args.stage, args.steps, init)
    rows = measure(grads)
    shape = row_shape(grads)
    sys.stdout.write(f"gradients of {args.run} {args.stage}, first {args.steps} steps: {shape['rows']} rows of "
                     f"{shape['channels']}, kurtosis {shape['kurtosis']:.2f}, median absmax/rms "
                     f"{shape['median_absmax_over_rms']:.2f}\n")
    sys.stdout.write(f"{'codec':<16} {'bits/el':>8} {'rel sq err':>11} {'cosine':>8} {'Gauss bound':>12}\n")
    for r in rows:
        sys.stdout.write(f"{r['codec']:<16} {r['bits_per_element']:>8.3f} {r['relative_sq_error']:>11.4f} "
                         f"{r['cosine']:>8.4f} {r['gaussian_bound']:>12.4f}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "meta": {"run": str(args.run), "init": str(init), "stage": args.stage, "steps": args.steps,
                 "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
                 "command": " ".join(sys.argv)},
        "gradients": shape, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
