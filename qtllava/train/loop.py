"""The training loop: one stage, in one process over the loopback link (or any link), checkpointed and resumable.

Data order is a pure function of (seed, stage, step), and every piece of state (weights, optimizer moments, RNGs,
server sessions) goes into each checkpoint, so a run interrupted at step k and resumed equals the uninterrupted one.
In a split run (a remote link) the client drives: it asks the server to checkpoint at the steps it checkpoints, and
after a crash of either side both roll back to their latest common checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qtllava.config import Config, to_toml
from qtllava.data import image_token_id, resolve_tokenizer
from qtllava.model.parts import ClientPart, ServerPart, build_parts, saved_weights
from qtllava.train.accounting import MetricsLog
from qtllava.train.batches import stage_batches
from qtllava.train.checkpoints import newest_intact, write_atomic
from qtllava.train.client_runtime import ClientRuntime
from qtllava.train.recipes import STAGE_NAMES, image_fit_due, recipe, set_seed, stage_compress, stage_fresh
from qtllava.train.server_runtime import ServerRuntime
from qtllava.train.ucut import ClientHead, check_cut, load_head_weight
from qtllava.train.warm_start import fit_image_decoder, fit_text_decoder
from qtllava.wire.loopback import LoopbackLink
from qtllava.wire.messages import RemoteError, pb

__all__ = ["StageRun", "run_stage", "load_tokenizer_for", "stage_config", "load_part_weights", "latest_checkpoint",
           "stage_parts", "client_head", "STAGES"]

log = logging.getLogger(__name__)

STAGES = STAGE_NAMES
TOKENIZER_DIR = "tokenizer"  # in a stage's final folder


def stage_config(cfg: Config, stage: str) -> Config:
    """The configuration a stage really runs with (the base stage sends fp32 both ways)."""
    return dataclasses.replace(cfg, compress=stage_compress(cfg, stage))


def load_tokenizer_for(cfg: Config, data_root: Path):
    """The tokenizer of a run (`qtllava.data.resolve_tokenizer`: llm.pretrained's, data.tokenizer or the data's)."""
    return resolve_tokenizer(cfg, data_root)


def load_part_weights(part: torch.nn.Module, folder: Path, cls, fresh: tuple[str, ...]) -> None:
    """Copy weights saved in `folder` into `part`, except the submodules named in `fresh` (re-initialised).

    Weights the saved part keeps by reference to a pretrained folder that `part` was built from too are already
    in place and are not read again. Raises when a parameter that should carry over is missing from the folder.
    """
    saved_base, tensors = saved_weights(folder, cls.PART)
    own_base = getattr(part, "base_weights", {})
    if tensors is None or any(own_base.get(k) != v for k, v in saved_base.items()):
        whole = cls.from_pretrained(folder)  # adapters, or references this part was not built from
        saved_base, saved, shared = whole.base_weights, whole.state_dict(), ()
    else:
        saved, shared = tensors, tuple(saved_base)
    own = part.state_dict()
    keep = {k: v for k, v in saved.items() if k in own and not k.split(".")[0] in fresh}
    missing = [k for k in own if k not in keep and k.split(".")[0] not in fresh + shared
               and k.split(".")[0] not in ("image_codec", "text_codec")]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    # Codec weights carry over only where the shapes agree (same codec configuration).
    keep = {k: v for k, v in keep.items() if own[k].shape == v.shape}
    part.load_state_dict(keep, strict=False)
    # what the saved part held unchanged from a pretrained folder (a part trained in full holds its own weights)
    part.base_weights = {k: v for k, v in own_base.items() if k in saved_base}


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest intact checkpoint of a stage folder (damaged ones are skipped with a warning naming the file)."""
    return newest_intact((out_dir / "checkpoints").glob("step-*"), key=lambda c: c.name)


@dataclasses.dataclass
class StageRun:
    stage: str
    out_dir: Path
    steps: int
    final: Path
    wall_s: float
    last_loss: float
    traffic: dict
    rollbacks: int = 0  # split mode: times the client rolled back to a common checkpoint with the server


def _save_checkpoint(final: Path, client_rt: ClientRuntime, server_rt: ServerRuntime | None, cfg: Config,
                     tok=None) -> Path:
    """Both halves (the server's where it runs here), the configuration and, with `tok`, the tokenizer (a stage's
    final folder carries it, so that it can be evaluated without the data root), written atomically."""
    def fill(folder: Path) -> None:
        if server_rt is not None:
            server_rt.save(folder)
        client_rt.save(folder)
        (folder / "config.toml").write_text(to_toml(cfg))
        if tok is not None:
            tok.save_pretrained(str(folder / TOKENIZER_DIR))

    return write_atomic(final, fill)


def stage_parts(cfg: Config, stage: str, data_root: Path, init: str | Path | None = None,
                sides: tuple[str, ...] = ("client", "server")):
    """Seed, tokenizer and both parts of a stage, as every process of a run builds them.

    Both parts are always built (a split process then drops the half it does not host), so the weights a stage
    starts fresh draw the same random numbers in one process and in two. Only the halves named in `sides` load
    their weights from `init/<side>`. -> (stage config, tokenizer, client, server)
    """
    fresh = stage_fresh(cfg, stage)
    scfg = stage_config(cfg, stage)
    fit_image = init is not None and image_fit_due(cfg, stage)
    if fit_image and not {"client", "server"} <= set(sides):
        raise ValueError(f"{stage}: compress.first_stage = {cfg.compress.first_stage} fits the fresh image decoder on "
                         "the connector's rows, which needs the client and the server half in one process; a split "
                         "run (one half per process) cannot start the codecs there yet: use compress.first_stage = 1")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_seed(cfg.train.seed + STAGES.index(stage))
    tok = load_tokenizer_for(cfg, data_root)
    client, server = build_parts(scfg, vocab_size=len(tok), image_token_id=image_token_id(tok))
    if init is not None:
        init = Path(init)
        if "client" in sides:
            load_part_weights(client, init / "client", ClientPart, fresh)
        if "server" in sides:
            load_part_weights(server, init / "server", ServerPart, fresh)
        if "text_codec" in fresh and "server" in sides:  # a client-only process drops the server half
            fit_text_decoder(client, server, init / "client")
        if fit_image:
            fit_image_decoder(client, server, stage_batches(cfg, stage, data_root, tok))
    if recipe(cfg, stage).llm == "lora":
        # from their own seeded stream: a process that loads one half has drawn fewer random numbers by now
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed * 1000 + STAGES.index(stage))
            server.enable_lora(cfg.llm.lora)
    return scfg, tok, client, server


def client_head(server: ServerPart, init: str | Path | None) -> ClientHead:
    """The U-cut client's LM head at the start of a stage: from `init` (its own or the server part's head), else
    a copy of the freshly built server part's head (same random numbers as the paper cut)."""
    if init is None:
        return ClientHead.from_weight(server.llm.get_output_embeddings().weight.detach())
    return ClientHead.from_weight(load_head_weight(Path(init)))


def run_stage(cfg: Config, stage: str, data_root: str | Path, out_dir: str | Path, init: str | Path | None = None,
              resume: bool = False, max_steps: int | None = None, progress: bool = True, link=None,
              cut: str = "paper", client_name: str = "client", shard: tuple[int, int] | None = None) -> StageRun:
    """Train `stage` from `init` (a previous stage's final folder; None = from scratch) into `out_dir`.

    `max_steps` stops early (for tests of interruption); the schedule still plans `cfg.train.<stage>.steps`.
    `link`: None runs the server part in this process (loopback); a remote link (e.g. `GrpcLink`) makes this the
    client of a split run: only the client part is kept, and at every checkpoint step the server is asked to save
    its own checkpoint (Checkpoint RPC) before the client saves. When the server restarted or the client resumes,
    both roll back to their latest common checkpoint (see `ServerRuntime`). `shard=(i, n)`: this client trains on
    every n-th sample starting at i (several clients, each with its own data).
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    remote = link is not None
    check_cut(cut)
    st = getattr(cfg.train, stage)
    scfg, tok, client, server = stage_parts(cfg, stage, data_root, init,
                                           ("client",) if remote else ("client", "server"))
    head = client_head(server, init) if cut == "u" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    server_rt = None
    if remote:
        del server
    else:
        server_rt = ServerRuntime(server, scfg, stage, total_steps=st.steps,
                                  checkpoint_dir=out_dir / "checkpoints", generator_seed=cfg.train.seed, cut=cut)
        link = LoopbackLink(server_rt)
    client_rt = ClientRuntime(client, scfg, link, stage, total_steps=st.steps, vocab_size=len(tok),
                              name=client_name, cut=cut, head=head)
    start = 0
    ck = latest_checkpoint(out_dir) if resume else None
    if ck is not None:
        if server_rt is not None:
            server_rt.load(ck)
        state = client_rt.load(ck)
        start = state["step_id"]
        log.info("%s: resuming from %s at step %d", stage, ck, start)
    mlog = MetricsLog(out_dir / "metrics.jsonl", start if ck is not None else None)
    rollbacks = 0
    if remote and ck is not None:
        start = _rejoin(client_rt, out_dir, start)
        mlog.truncate(start)
    else:
        next_step = client_rt.connect()
        if next_step != start:
            raise RuntimeError(f"server expects step {next_step}, client is at step {start}")
        if remote:  # a common step-0 checkpoint, so that both sides can roll back to the very start
            client_rt.link.checkpoint(pb.CheckpointRequest(session_id=client_rt.session_id, step_id=0))
            _save_checkpoint(out_dir / "checkpoints" / f"step-{0:06d}", client_rt, None, scfg)

    batches = stage_batches(cfg, stage, data_root, tok, shard)
    end = st.steps if max_steps is None else min(st.steps, max_steps)
    t0 = time.perf_counter()
    last_loss = float("nan")
    bar = tqdm(range(start, end), desc=stage, disable=not progress, initial=start, total=st.steps)
    step = start
    try:
        while step < end:
            micro = batches(step)
            done = step + 1
            try:
                stats = client_rt.train_step(micro)
                if remote and cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 \
                        and done < st.steps:
                    client_rt.link.checkpoint(pb.CheckpointRequest(session_id=client_rt.session_id, step_id=done))
            except RemoteError as e:
                if not remote or e.status not in _RECOVERABLE:
                    raise
                log.warning("%s: server refused step %d (%s); rolling back to a common checkpoint", stage, step,
                            e.details)
                step = _rejoin(client_rt, out_dir, client_rt.step_id)
                mlog.truncate(step)
                rollbacks += 1
                bar.n = step
                bar.refresh()
                continue
            last_loss = stats.loss
            row = {"stage": stage, **stats.as_dict()}
            mlog.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", up=f"{stats.bytes_up / 1024:.0f}K",
                            down=f"{stats.bytes_down / 1024:.0f}K")
            if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done < st.steps:
                _save_checkpoint(out_dir / "checkpoints" / f"step-{done:06d}", client_rt, server_rt, scfg)
            step = done
    finally:
        mlog.close()
        bar.close()
    wall = time.perf_counter() - t0
    final = out_dir / "final"
    if end == st.steps:
        if remote:
            client_rt.link.checkpoint(pb.CheckpointRequest(session_id=client_rt.session_id, step_id=end,
                                                           tag="final"))
        _save_checkpoint(final, client_rt, server_rt, scfg, tok)
    if remote and end == st.steps:  # a client that stops early (max_steps) keeps its session for --resume
        client_rt.link.close(pb.Goodbye(session_id=client_rt.session_id))
    return StageRun(stage=stage, out_dir=out_dir, steps=end, final=final, wall_s=wall, last_loss=last_loss,
                    traffic=link.traffic.summary(), rollbacks=rollbacks)


_RECOVERABLE = ("FAILED_PRECONDITION", "NOT_FOUND")


def _checkpoint_at_or_below(out_dir: Path, step: int) -> tuple[Path, int] | None:
    found = [c for c in (out_dir / "checkpoints").glob("step-*") if c.name[5:].isdigit() and int(c.name[5:]) <= step]
    c = newest_intact(found, key=lambda c: int(c.name[5:]))
    return (c, int(c.name[5:])) if c is not None else None


def _rejoin(client_rt: ClientRuntime, out_dir: Path, step: int) -> int:
    """Agree with the server on the latest common checkpoint at or below `step`, load ours; -> that step.

    The client offers its checkpoint; a server that is ahead rolls back to its own checkpoint of that step (or the
    latest below it, which the client then matches with an older one of its own).
    """
    target = step
    for _ in range(16):
        found = _checkpoint_at_or_below(out_dir, target)
        if found is None:
            raise RuntimeError(f"{out_dir}: no client checkpoint at or below step {target} to roll back to")
        ck, k = found
        client_rt.zero_grad()
        client_rt.load(ck)
        next_step = client_rt.connect(resume_step=k)
        if next_step == k:
            log.info("rejoined the server at step %d (%s)", k, ck)
            return k
        if next_step > k:
            raise RuntimeError(f"server stays at step {next_step} while the client resumes at {k}: the server "
                               "has no checkpoint of this session to roll back to")
        target = next_step
    raise RuntimeError("client and server found no common checkpoint")
