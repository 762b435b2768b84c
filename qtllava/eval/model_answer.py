"""Answering questions with a checkpoint: prompts -> batched greedy generation across the split -> text.

Generation goes through the same client runtime, codecs and link as training, so what is evaluated is what a
deployment computes (in one process the link is the loopback; `--server` will make it gRPC).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from qtllava.data.templates import template_name
from qtllava.config import Config
from qtllava.data import EvalQuestions, collate, image_token_id
from qtllava.data.generator import SUITES
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.train.client_runtime import ClientRuntime
from qtllava.train.server_runtime import ServerRuntime
from qtllava.wire.loopback import LoopbackLink

__all__ = ["load_runtime", "make_answer_fn", "evaluate_checkpoint_results", "evaluate_checkpoint", "checkpoint_halves",
           "checkpoint_tokenizer"]

log = logging.getLogger(__name__)


def checkpoint_halves(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(client folder, server folder or None) of a checkpoint: a stage's final folder (client/ + server/), or the
    folder of a two-process stage (client/final/client + server/final/server), or a client's final folder alone
    (its server half is then reached over `--server`). Raises FileNotFoundError naming what is missing."""
    root = Path(checkpoint)
    for client, server in ((root / "client", root / "server"),
                           (root / "client" / "final" / "client", root / "server" / "final" / "server")):
        if (client / "config.json").is_file():
            return client, server if (server / "config.json").is_file() else None
    raise FileNotFoundError(f"{root}: not a checkpoint folder (neither client/ nor client/final/client/ with a saved "
                            "client part inside); pass a stage's final/ or a two-process stage's folder")


def checkpoint_tokenizer(cfg: Config, checkpoint: str | Path, data_root: Path | None):
    """The tokenizer a checkpoint was trained with: the one saved in its final folder, else the configuration's
    (`llm.pretrained`'s, `data.tokenizer` or the data root's)."""
    from qtllava.data import load_tokenizer
    from qtllava.train.loop import TOKENIZER_DIR, load_tokenizer_for

    client, _ = checkpoint_halves(checkpoint)
    for folder in (client.parent / TOKENIZER_DIR, client.parent.parent / TOKENIZER_DIR):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(folder)
    return load_tokenizer_for(cfg, Path(data_root) if data_root is not None else Path(cfg.data.root))


def load_runtime(cfg: Config, checkpoint: Path, link=None) -> tuple[ClientRuntime, Any]:
    """Client runtime on a checkpoint's client part; in-process server from the same checkpoint unless `link`."""
    client_dir, server_dir = checkpoint_halves(checkpoint)
    client = ClientPart.from_pretrained(client_dir)
    part_cfg = client.cfg
    if link is None:
        if server_dir is None:
            raise FileNotFoundError(f"{checkpoint}: holds no server half; answer through a server with --server")
        server = ServerPart.from_pretrained(server_dir)
        link = LoopbackLink(ServerRuntime(server, server.cfg, stage=None))
    rt = ClientRuntime(client, part_cfg, link, stage=None)
    rt.connect()
    return rt, link


def _question_sets(cfg: Config, data_root: Path, tok, files: Sequence[Path], image_folder: Path) -> dict:
    """question_id -> (dataset, index) over the given question files (ids must be unique across them)."""
    where: dict[str, tuple[EvalQuestions, int]] = {}
    for f in files:
        ds = EvalQuestions.load(f, image_folder, tok, template=template_name(cfg), image_size=cfg.vision.image_size,
                                num_image_tokens=cfg.vision.num_image_tokens, image_mean=cfg.vision.image_mean,
                                image_std=cfg.vision.image_std, skip_bad=cfg.data.skip_bad)
        for i, qid in enumerate(ds.ids):
            key = str(qid)
            if key in where:
                raise ValueError(f"{f}: question_id {qid!r} also appears in another question file")
            where[key] = (ds, i)
    return where


def make_answer_fn(rt: ClientRuntime, tok, where: dict, max_new_tokens: int) -> Callable[[list[dict]], list[str]]:
    """Batched greedy answers; a row stops at the chat template's stop tokens or the tokenizer's eos."""
    template = next(iter(where.values()))[0].template if where else None
    eos = set(template.stop_token_ids(tok)) if template is not None else set()
    eos.add(tok.eos_token_id)

    def answer(questions: list[dict]) -> list[str]:
        samples = []
        for q in questions:
            key = str(q["question_id"])
            if key not in where:
                raise KeyError(f"question {q['question_id']!r} was not loaded (skipped as bad input?)")
            ds, i = where[key]
            samples.append(ds[i])
        batch = collate(samples, pad_id=tok.pad_token_id, padding_side="left")
        out = rt.generate(batch, max_new_tokens=max_new_tokens, eos_token_id=eos)
        return [tok.decode(ids, skip_special_tokens=True).strip() for ids in out]

    return answer


def evaluate_checkpoint_results(cfg: Config, checkpoint: Path, data_root: Path, suites: Sequence[str] | None = None,
                                limit: int | None = None, link=None) -> dict:
    """Answer and score the benchmark suites; returns the runner's results dict (per suite ours/chance/majority)."""
    from qtllava.eval.runner import evaluate

    data_root = Path(data_root)
    tok = checkpoint_tokenizer(cfg, checkpoint, data_root)
    rt, _ = load_runtime(cfg, checkpoint, link)
    if image_token_id(tok) != rt.part.image_token_id:
        raise ValueError(f"{checkpoint}: image token id {rt.part.image_token_id} differs from the tokenizer's "
                         f"({image_token_id(tok)}); wrong data root or tokenizer?")
    results = {}
    for suite in suites or SUITES:  # question ids are unique within a suite, not across suites
        where = _question_sets(cfg, data_root, tok, [data_root / "suites" / suite / "questions.jsonl"],
                               data_root / "images")
        answer = make_answer_fn(rt, tok, where, cfg.eval.max_new_tokens)
        results.update(evaluate(data_root, answer, suites=[suite], limit=cfg.eval.limit if limit is None else limit,
                                batch_size=cfg.eval.batch_size))
    return results


def evaluate_checkpoint(cfg: Config, checkpoint: Path, data_root: Path | None, out: str | None = None,
                        suites: Sequence[str] | None = None, limit: int | None = None, questions: str | None = None,
                        answers: str | None = None, link=None, image_folder: str | Path | None = None) -> str:
    """CLI entry: score the suites (table text), or answer a LLaVA question file (`model_vqa` format) into
    `answers`, its images under `image_folder` (default: the data root's images/). The tokenizer and chat template
    come from the checkpoint (the configuration its client half was trained with)."""
    from qtllava.eval.runner import answer_question_file, format_table, write_results

    client_dir, _ = checkpoint_halves(checkpoint)
    if questions:
        if not answers:
            raise ValueError("--questions needs --answers (where to write the answers JSONL)")
        part_cfg = ClientPart.config_of(client_dir)
        tok = checkpoint_tokenizer(part_cfg, checkpoint, data_root)
        qpath = Path(questions)
        folder = Path(image_folder) if image_folder else Path(data_root or part_cfg.data.root) / "images"
        where = _question_sets(part_cfg, Path(data_root or "."), tok, [qpath], folder)
        rt, _ = load_runtime(cfg, checkpoint, link)
        n = answer_question_file(qpath, make_answer_fn(rt, tok, where, cfg.eval.max_new_tokens), answers,
                                 batch_size=cfg.eval.batch_size)
        return f"answered {n} questions -> {answers}"
    results = evaluate_checkpoint_results(cfg, checkpoint, data_root, suites, limit, link)
    if out:
        write_results(results, out)
    return format_table(results)
