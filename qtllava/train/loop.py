"""The training loop: one stage, in one process over the loopback link (or any link), checkpointed and resumable.

Data order is a pure function of (seed, stage, step), and every piece of state (weights, optimizer moments, RNGs,
server sessions) goes into each checkpoint, so a run interrupted at step k and resumed equals the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qtllava.config import Config, to_toml
from qtllava.data import LlavaDataset, collate, image_token_id, load_tokenizer
from qtllava.model.parts import ClientPart, ServerPart, build_parts
from qtllava.train.client_runtime import ClientRuntime
from qtllava.train.recipes import recipe, set_seed, stage_compress
from qtllava.train.server_runtime import ServerRuntime
from qtllava.wire.loopback import LoopbackLink

__all__ = ["StageRun", "run_stage", "load_tokenizer_for", "stage_config", "load_part_weights", "latest_checkpoint",
           "sample_indices", "STAGES"]

log = logging.getLogger(__name__)

STAGES = ("stage0", "stage1", "stage2")


def stage_config(cfg: Config, stage: str) -> Config:
    """The configuration a stage really runs with (the base stage sends fp32 both ways)."""
    return dataclasses.replace(cfg, compress=stage_compress(cfg, stage))


def load_tokenizer_for(cfg: Config, data_root: Path):
    return load_tokenizer(cfg.data.tokenizer or data_root / "tokenizer")


def load_part_weights(part: torch.nn.Module, folder: Path, cls, fresh: tuple[str, ...]) -> None:
    """Copy weights saved in `folder` into `part`, except the submodules named in `fresh` (re-initialised).

    Raises when a parameter that should carry over is missing from the folder.
    """
    saved = cls.from_pretrained(folder).state_dict()
    own = part.state_dict()
    keep = {k: v for k, v in saved.items() if k in own and not k.split(".")[0] in fresh}
    missing = [k for k in own if k not in keep and k.split(".")[0] not in fresh
               and k.split(".")[0] not in ("image_codec", "text_codec")]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    # Codec weights carry over only where the shapes agree (same codec configuration).
    keep = {k: v for k, v in keep.items() if own[k].shape == v.shape}
    part.load_state_dict(keep, strict=False)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step-*"))
    ckpts = [c for c in ckpts if (c / "DONE").exists()]
    return ckpts[-1] if ckpts else None


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


@dataclasses.dataclass
class StageRun:
    stage: str
    out_dir: Path
    steps: int
    final: Path
    wall_s: float
    last_loss: float
    traffic: dict


def _save_checkpoint(final: Path, client_rt: ClientRuntime, server_rt: ServerRuntime, cfg: Config) -> Path:
    """Write to a temporary folder and rename, so a crash never leaves a half checkpoint behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    server_rt.save(tmp)
    client_rt.save(tmp)
    (tmp / "config.toml").write_text(to_toml(cfg))
    (tmp / "DONE").write_text("")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def run_stage(cfg: Config, stage: str, data_root: str | Path, out_dir: str | Path, init: str | Path | None = None,
              resume: bool = False, max_steps: int | None = None, progress: bool = True) -> StageRun:
    """Train `stage` from `init` (a previous stage's final folder; None = from scratch) into `out_dir`.

    `max_steps` stops early (for tests of interruption); the schedule still plans `cfg.train.<stage>.steps`.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    rec = recipe(stage)
    scfg = stage_config(cfg, stage)
    st = getattr(cfg.train, stage)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_seed(cfg.train.seed + STAGES.index(stage))
    tok = load_tokenizer_for(cfg, data_root)
    client, server = build_parts(scfg, vocab_size=len(tok), image_token_id=image_token_id(tok))
    if init is not None:
        init = Path(init)
        load_part_weights(client, init / "client", ClientPart, rec.fresh)
        load_part_weights(server, init / "server", ServerPart, rec.fresh)
    out_dir.mkdir(parents=True, exist_ok=True)
    server_rt = ServerRuntime(server, scfg, stage, total_steps=st.steps, checkpoint_dir=out_dir / "checkpoints",
                              generator_seed=cfg.train.seed)
    link = LoopbackLink(server_rt)
    client_rt = ClientRuntime(client, scfg, link, stage, total_steps=st.steps, vocab_size=len(tok))
    start = 0
    metrics_path = out_dir / "metrics.jsonl"
    if resume and (ck := latest_checkpoint(out_dir)) is not None:
        server_rt.load(ck)
        state = client_rt.load(ck)
        start = state["step_id"]
        log.info("%s: resuming from %s at step %d", stage, ck, start)
        _truncate_metrics(metrics_path, start)
    elif metrics_path.exists():
        metrics_path.unlink()
    next_step = client_rt.connect()
    if next_step != start:
        raise RuntimeError(f"server expects step {next_step}, client is at step {start}")

    template = cfg.data.template if rec.template == "chat" else "pretrain"
    datasets = [LlavaDataset.load(data_root / name, data_root / "images", tok, template=template,
                                  image_size=cfg.vision.image_size, num_image_tokens=cfg.vision.num_image_tokens,
                                  max_length=cfg.data.max_length, image_mean=cfg.vision.image_mean,
                                  image_std=cfg.vision.image_std, skip_bad=cfg.data.skip_bad)
                for name in rec.data]
    index = [(d, i) for d, ds in enumerate(datasets) for i in range(len(ds))]
    seed = cfg.train.seed * 1000 + STAGES.index(stage)
    end = st.steps if max_steps is None else min(st.steps, max_steps)
    t0 = time.perf_counter()
    last_loss = float("nan")
    bar = tqdm(range(start, end), desc=stage, disable=not progress, initial=start, total=st.steps)
    with metrics_path.open("a") as mlog:
        for step in bar:
            micro = []
            for m in range(st.grad_accum):
                pos = (step * st.grad_accum + m) * st.batch_size
                samples = [datasets[index[j][0]][index[j][1]] for j in sample_indices(len(index), st.batch_size, pos, seed)]
                micro.append(collate(samples, pad_id=tok.pad_token_id, padding_side="right"))
            stats = client_rt.train_step(micro)
            last_loss = stats.loss
            row = {"stage": stage, **stats.as_dict()}
            mlog.write(json.dumps(row) + "\n")
            mlog.flush()
            bar.set_postfix(loss=f"{stats.loss:.3f}", up=f"{stats.bytes_up / 1024:.0f}K",
                            down=f"{stats.bytes_down / 1024:.0f}K")
            done = step + 1
            if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done < st.steps:
                _save_checkpoint(out_dir / "checkpoints" / f"step-{done:06d}", client_rt, server_rt, scfg)
    wall = time.perf_counter() - t0
    final = out_dir / "final"
    if end == st.steps:
        _save_checkpoint(final, client_rt, server_rt, scfg)
    return StageRun(stage=stage, out_dir=out_dir, steps=end, final=final, wall_s=wall, last_loss=last_loss,
                    traffic=link.traffic.summary())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows at or after `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    path.write_text("".join(r + "\n" for r in rows))
