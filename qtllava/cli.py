"""`qtllava <command>`: data, training stages, the whole pipeline, evaluation, level analysis, split processes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qtllava.config import Config, ConfigError, load_config, to_toml

log = logging.getLogger("qtllava")


def _config(args) -> Config:
    return load_config(args.config, args.set)


def _data_root(cfg: Config, args) -> Path:
    return Path(getattr(args, "data", None) or cfg.data.root)


def cmd_config(args) -> int:
    print(to_toml(_config(args)), end="")
    return 0


def cmd_data_make(args) -> int:
    from qtllava.data import make_data

    cfg = _config(args)
    root = make_data(cfg.data, cfg.vision.image_size, root=_data_root(cfg, args), force=args.force)
    print(f"data ready in {root}")
    return 0


def cmd_train(args) -> int:
    from qtllava.data import make_data
    from qtllava.train.loop import run_stage

    cfg = _config(args)
    root = make_data(cfg.data, cfg.vision.image_size, root=_data_root(cfg, args))
    run = run_stage(cfg, args.stage, root, Path(args.out), init=args.init, resume=args.resume,
                    max_steps=args.max_steps)
    print(f"{run.stage}: {run.steps} steps, last loss {run.last_loss:.4f}, {run.wall_s:.1f} s -> {run.final}")
    return 0


def cmd_pipeline(args) -> int:
    from qtllava.pipeline import run_pipeline

    cfg = _config(args)
    result = run_pipeline(cfg, Path(args.out), data_root=_data_root(cfg, args), resume=args.resume,
                          base=args.base, evaluate=not args.no_eval)
    if "eval_table" in result:
        print(result["eval_table"])
    print(result["traffic_table"])
    return 0


def cmd_demo(args) -> int:
    from qtllava.pipeline import run_demo

    cfg = _config(args)
    text = run_demo(cfg, Path(args.out), data_root=_data_root(cfg, args))
    print(text)
    return 0


def cmd_eval(args) -> int:
    from qtllava.eval.model_answer import evaluate_checkpoint

    cfg = _config(args)
    text = evaluate_checkpoint(cfg, Path(args.checkpoint), data_root=_data_root(cfg, args), out=args.out,
                               suites=args.suites, limit=args.limit, questions=args.questions,
                               answers=args.answers)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtllava", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", default="tiny", help="preset name or TOML file (default: tiny)")
        sp.add_argument("--set", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key, e.g. -o train.stage0.steps=50 (repeatable)")
        sp.add_argument("--data", help="data root (default: the config's data.root)")

    sp = sub.add_parser("config", help="print the resolved configuration as TOML")
    common(sp)
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("data", help="generate the offline corpora and benchmark suites")
    dsub = sp.add_subparsers(dest="data_command", required=True)
    mk = dsub.add_parser("make", help="generate (cached) data for a config")
    common(mk)
    mk.add_argument("--force", action="store_true", help="regenerate even if a matching manifest exists")
    mk.set_defaults(func=cmd_data_make)

    sp = sub.add_parser("train", help="train one stage")
    common(sp)
    sp.add_argument("--stage", required=True, choices=["stage0", "stage1", "stage2"])
    sp.add_argument("--init", help="previous stage's final folder")
    sp.add_argument("--out", required=True)
    sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    sp.add_argument("--max-steps", type=int, help="stop after this step (the schedule still plans the full stage)")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("pipeline", help="data, stages 0-2 and evaluation")
    common(sp)
    sp.add_argument("--out", required=True)
    sp.add_argument("--resume", action="store_true")
    sp.add_argument("--base", help="reuse this stage-0 final folder instead of training stage 0")
    sp.add_argument("--no-eval", action="store_true")
    sp.set_defaults(func=cmd_pipeline)

    sp = sub.add_parser("demo", help="the main job: the whole pipeline on a preset, printing the tables")
    common(sp)
    sp.add_argument("--out", default="runs/demo")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("eval", help="answer the benchmark suites (or a LLaVA question file) with a checkpoint")
    common(sp)
    sp.add_argument("--checkpoint", required=True, help="a stage's final folder (client/ + server/)")
    sp.add_argument("--suites", nargs="*", help="suite names (default: all five)")
    sp.add_argument("--limit", type=int, help="questions per suite (default: eval.limit)")
    sp.add_argument("--out", help="write the results JSON here")
    sp.add_argument("--questions", help="a LLaVA-format question JSONL file to answer instead of the suites")
    sp.add_argument("--answers", help="where to write the answers JSONL (with --questions)")
    sp.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"qtllava: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
