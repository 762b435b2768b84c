"""`qtllava attack`: one attack against one checkpoint, as an honest-but-curious server would run it.

    qtllava attack --checkpoint runs/x/stage2/final --attack image --attacker white --image-set scenes --out a.json

The command replays the image set's held-out samples from the checkpoint's client to its server over a recording
loopback link, runs the attack on the recorded messages only, and scores it (see docs/privacy.md).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_attack_parser", "cmd_attack"]


def cmd_attack(args) -> int:
    import torch

    from qtllava.config import load_config
    from qtllava.privacy.nets import InversionConfig
    from qtllava.privacy.suite import FashionMissing, PrivacyRun, SuiteSettings, micro_settings

    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint)
    cfg = load_config(ckpt / "config.toml")
    data_root = Path(args.data or cfg.data.root)
    if args.quick or cfg.name == "micro":
        settings = micro_settings()
    else:
        settings = SuiteSettings(inversion=InversionConfig(steps=args.inversion_steps),
                                 surrogate_steps=args.surrogate_steps)
    if args.limit is not None:
        settings.eval_limit = args.limit
    run = PrivacyRun(ckpt, data_root, Path(args.work or ckpt.parent / "privacy-work"), settings, base=args.base)
    try:
        result = run.run(args.attack, args.attacker, args.image_set)
    except FashionMissing as e:
        print(f"qtllava attack: {e}")
        return 3
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def add_attack_parser(sub) -> None:
    """Register the `attack` subcommand on the CLI's subparsers (the configuration is the checkpoint's)."""
    sp = sub.add_parser("attack", help="run one privacy attack on what a checkpoint's client sends")
    sp.add_argument("--data", help="data root the checkpoint was trained on (default: its config's data.root)")
    sp.add_argument("--checkpoint", required=True, help="a stage's final folder (client/ + server/)")
    sp.add_argument("--attack", required=True, choices=["image", "text", "labels"])
    sp.add_argument("--attacker", default="white", choices=["white", "black"],
                    help="white: holds the client's weights; black: trains a surrogate client on its own data")
    sp.add_argument("--image-set", default="scenes", choices=["scenes", "fashion", "skimage"],
                    help="the client's held-out images (fashion needs Debian's dataset-fashion-mnist)")
    sp.add_argument("--base", help="stage-0 folder the black-box surrogate starts from (default: ../../stage0/final)")
    sp.add_argument("--out", help="write the result JSON here")
    sp.add_argument("--work", help="folder for the attacker's files and cached probes (default: beside the checkpoint)")
    sp.add_argument("--limit", type=int, help="held-out samples to replay (default: all)")
    sp.add_argument("--inversion-steps", type=int, default=1000)
    sp.add_argument("--surrogate-steps", type=int, default=150)
    sp.add_argument("--quick", action="store_true", help="tiny attack networks and few steps (smoke test)")
    sp.add_argument("--threads", type=int, default=1)
    sp.set_defaults(func=cmd_attack)
