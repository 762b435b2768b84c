"""Probe: the image codec's server decoder fitted by least squares to the client's current rows during training.

At one bit (fsq L = 2, statistics sent) a frozen identity decoder hands the LLM rows whose elements are all the row's
mean +- its std: one magnitude for every channel. On the rows a trained client sends, that round trip loses 20-40 %
of their variance, while a linear decoder fitted by least squares to the same codes loses 1-4 % (the rows are highly
redundant across channels). Trained by Adam the decoder drifts (docs/study.md, session 7; learned in stage 1 only it
did worse, session 16). Here it is instead refitted in closed form (`fsq.fit_decoder`) every `--every` optimizer
steps, on the connector rows of the last `--window` steps' images, so the LLM reads rows close to the connector's own
while the codes stay one bit.

In-process training only: in a split deployment the client holds the rows and would send the fitted map (D x (D+1)
numbers) to the server; that message does not exist yet. This probe only measures whether the fit helps, with the
study's steps, base and seeds, into `--out` (default runs/refit/<config>-refit<every>[-through]/seed<k>):

    python benchmarks/refit_probe.py --config-name fsq-L2-ans-clr0 --seeds 5 6 [--through-fit]

Measured (session 16, docs/study.md): it does not help. Both gradient paths ended stage 1 at a loss of 1.7-1.9
against 0.81 with the frozen identity decoder, and the runs were stopped in stage 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from collections import deque
from pathlib import Path

import torch

from qtllava.compress.fsq import FsqDecoder, FsqEncoder, fit_decoder
from qtllava.config import load_config
from qtllava.pipeline import run_pipeline
from qtllava.train.client_runtime import ClientRuntime
from qtllava.train.loop import connector_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import CONFIGS, STUDY_STEPS  # noqa: E402

log = logging.getLogger("refit_probe")


def _straight_through_forward(self: FsqDecoder, values: torch.Tensor) -> torch.Tensor:
    # the fitted map's output forward, the identity backward: the gradient the server returns is the one at the
    # decoded rows (~ the client's rows), not that gradient through the fitted map's transpose
    fitted = self.proj(values.to(self.proj.weight.dtype)) * self.out_scale.to(self.proj.weight.dtype)
    return values + (fitted - values).detach()


def refit_step(original, every: int, window: int, straight_through: bool = True):
    """`ClientRuntime.train_step` wrapped: before every `every`-th step of a runtime whose link is in this process,
    the server's fsq image decoder is refitted on the connector rows of the last `window` steps (this one included).
    `straight_through`: the decoder passes the gradient on unchanged (else through the fitted map's transpose)."""

    def train_step(self, micro_batches):
        server = getattr(getattr(self.link, "handler", None), "part", None)
        enc, dec = self.part.image_codec, getattr(server, "image_codec", None)
        if isinstance(enc, FsqEncoder) and isinstance(dec, FsqDecoder):
            rows = getattr(self, "_refit_rows", None)
            if rows is None:
                rows = self._refit_rows = deque(maxlen=window)
                self._refit_calls = 0
                if straight_through:
                    dec.forward = types.MethodType(_straight_through_forward, dec)
            got = connector_rows(self.part, micro_batches)
            if got is not None:
                rows.append(got)
            if self._refit_calls % every == 0 and rows:
                err = fit_decoder(enc, dec, torch.cat(list(rows)))
                if self._refit_calls % (10 * every) == 0:
                    log.info("%s step %d: image decoder refitted on %d rows, relative squared error %.4f",
                             self.stage, self._refit_calls, sum(len(r) for r in rows), err)
            self._refit_calls += 1
        return original(self, micro_batches)

    return train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="fsq-L2-ans-clr0", choices=sorted(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[5])
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--base", default="runs/baseline/stage0/final")
    p.add_argument("--out", default="runs/refit")
    p.add_argument("--set", "-o", action="append", default=[])
    p.add_argument("--through-fit", action="store_true",
                   help="the gradient through the fitted map's transpose (default: straight through the decoder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    ClientRuntime.train_step = refit_step(ClientRuntime.train_step, args.every, args.window,
                                          straight_through=not args.through_fit)
    for seed in args.seeds:
        cfg = load_config("tiny", STUDY_STEPS + CONFIGS[args.config_name] + args.set +
                          [f"train.seed={seed}", "train.threads=1"])
        out = Path(args.out) / f"{args.config_name}-refit{args.every}{'-through' if args.through_fit else ''}" / \
            f"seed{seed}"
        res = run_pipeline(cfg, out, resume=True, base=args.base, progress=False)
        scores = {s: r["ours"] for s, r in res["eval"].items()}
        log.info("%s seed %d: %s", args.config_name, seed, json.dumps(scores))


if __name__ == "__main__":
    main()
