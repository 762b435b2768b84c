"""A stage's data as a pure function of (seed, stage, step): which samples each micro-batch of a step holds.

The order depends on nothing else, so a resumed run and two processes that each build their batches see the same
samples at the same step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtllava.config import Config
from qtllava.data import LlavaDataset, collate
from qtllava.data.templates import template_name
from qtllava.train.recipes import STAGE_NAMES, recipe

__all__ = ["sample_indices", "micro_batch_indices", "stage_batches"]


def sample_indices(n: int, batch: int, position: int, seed: int) -> list[int]:
    """`batch` sample indices starting at global sample `position` of an endless stream of seeded epochs."""
    out = []
    while len(out) < batch:
        epoch, offset = divmod(position, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
        position += take
    return out


def micro_batch_indices(cfg: Config, stage: str, n: int, step: int, micro: int = 0) -> list[int]:
    """Indices (into the stage's n samples) of micro-batch `micro` of `step`: a pure function of seed and step."""
    st = getattr(cfg.train, stage)
    pos = (step * st.grad_accum + micro) * st.batch_size
    return sample_indices(n, st.batch_size, pos, cfg.train.seed * 1000 + STAGE_NAMES.index(stage))


def stage_batches(cfg: Config, stage: str, data_root: Path, tok, shard: tuple[int, int] | None = None):
    """The stage's data as a function of the step: step -> its micro-batches (a pure function of seed and step).

    `shard=(i, n)`: every n-th sample starting at i (each of several clients trains on its own part)."""
    rec = recipe(cfg, stage)
    st = getattr(cfg.train, stage)
    template = template_name(cfg) if rec.template == "chat" else "pretrain"
    datasets = [LlavaDataset.for_config(cfg, data_root / name, data_root / "images", tok, template,
                                        skip_bad=cfg.data.skip_bad) for name in rec.data]
    index = [(d, i) for d, ds in enumerate(datasets) for i in range(len(ds))]
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
        index = index[i::n]

    def batches(step: int) -> list[dict]:
        micro = []
        for m in range(st.grad_accum):
            samples = [datasets[index[j][0]][index[j][1]] for j in micro_batch_indices(cfg, stage, len(index), step, m)]
            micro.append(collate(samples, pad_id=tok.pad_token_id, padding_side="right"))
        return micro

    return batches
