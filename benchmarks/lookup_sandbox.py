"""Sandbox for the colour look-up: can the tiny preset's decoder, from scratch, learn "Is the <colour> object on the
left?" when the image tokens are clean, synthetic and known to hold the answer?

Six objects (one per colour, circle or square) on a 4 x 4 grid of cells, each cell 2 x 2 of the 8 x 8 patches. A
patch of an object holds a fixed random colour vector + shape vector (+ noise); every patch also carries a 2-D
sine-cosine code of where it is. A trainable MLP maps patches to the decoder width (as the connector does), then a
from-scratch Qwen2 decoder of the tiny preset's shape reads [image tokens, question] and answers. `--captions`
mixes in (every other step) caption sequences "<colour> <shape> <top|bottom> <left|right>" per object, listed by
colour ("color") or in reading order ("reading").

    python benchmarks/lookup_sandbox.py --steps 1000                     # questions alone
    python benchmarks/lookup_sandbox.py --steps 1000 --captions color    # + captions keyed by colour
    python benchmarks/lookup_sandbox.py --types shape,shape-mc --captions color --filler 10   # + option letters

Kinds (`--types`): `left`, `top` (yes/no), `shape` (the word), `shape-mc` (the shape question with two lettered
options "A . circle B . square" in random order; the answer is the letter: the answer word must be found among the
options and the letter before it read), `shape-paired` (the free-form shape question and its answer, then the same
question with options, both answers trained), `text-mc` (no image look-up: "c3 is circle", the options, the letter;
the option look-up alone). `--max-options N` (3-5) gives the multiple-choice kinds 2..N options, lettered A-E: both
shape words and distractor shapes that never answer (triangle, star, heart), as the real suite has 2-5 options.
`--two-options-until STEP` (a curriculum) and `--two-option-share P` give training turns two options more often;
the accuracy printed is on 2..N options drawn evenly, then per number of options. `--spaced-words` gives each
shape word a second token (" circle", as a byte-level BPE spells a word after a space) used in captions and in
the options, while free-form answers keep the bare one: the real data under ChatML, where the answer follows a
newline (docs/baseline.md, "Session 10").

Prints the loss and the answer accuracy on 256 fresh scenes every 100 steps (one thread; ~25 s per 100 steps on
the 2-core development machine). docs/baseline.md ("Caption order") has the measurements.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
from transformers import Qwen2Config, Qwen2ForCausalLM

N_COLORS, N_SHAPES, GRID, PATCHES = 6, 2, 4, 8  # colours, shapes, cells per side, patches per side
SHAPE_WORDS = ("circle", "square")
FILLER = "<f>"  # in the vocabulary only with --filler, so runs without it are those of docs/baseline.md
WORDS = ["<pad>", "Is", "the", "object", "on", "left", "top", "?", "yes", "no", "What", "shape", "of", "A:", "circle",
         "square", "bottom", "right"] + [f"c{i}" for i in range(N_COLORS)]
MC_WORDS = ["A", "B", ".", "is"]  # in the vocabulary only with a multiple-choice kind (same reason as FILLER)
MORE_OPTIONS = ["C", "D", "E", "triangle", "star", "heart"]  # with --max-options > 2: letters and distractor shapes
DISTRACTORS = ("triangle", "star", "heart")  # shape words that never answer: options only
MC_KINDS = ("shape-mc", "shape-paired", "text-mc")
FEAT_DIM, POS_DIM = 64, 32


def sincos(v: torch.Tensor, n: int) -> torch.Tensor:
    f = torch.exp(-math.log(100.0) * torch.arange(n // 2) / (n // 2))
    return torch.cat([torch.sin(v[..., None] * f), torch.cos(v[..., None] * f)], -1)


class Sandbox:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        torch.manual_seed(args.seed)
        self.types = args.types.split(",")
        words = WORDS + ([FILLER] if args.filler else []) + (MC_WORDS if set(self.types) & set(MC_KINDS) else [])
        words += MORE_OPTIONS if args.max_options > 2 else []
        words += [" " + w for w in SHAPE_WORDS + DISTRACTORS] if args.spaced_words else []
        self.vocab = {w: i for i, w in enumerate(words)}
        width = 256
        cfg = Qwen2Config(vocab_size=len(words), hidden_size=width, intermediate_size=688,
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=False)
        self.model = Qwen2ForCausalLM(cfg)
        g = torch.Generator().manual_seed(123)
        self.color_vec = torch.randn(N_COLORS, FEAT_DIM, generator=g)
        self.shape_vec = torch.randn(N_SHAPES, FEAT_DIM, generator=g)
        yy, xx = torch.meshgrid(torch.arange(PATCHES), torch.arange(PATCHES), indexing="ij")
        self.pos = torch.cat([sincos(yy.flatten().float(), POS_DIM // 2), sincos(xx.flatten().float(), POS_DIM // 2)],
                             -1)
        self.connector = nn.Sequential(nn.Linear(FEAT_DIM + POS_DIM, width), nn.GELU(), nn.Linear(width, width))
        self.params = list(self.model.parameters()) + list(self.connector.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        # the option-count schedule reads them; evaluation draws 2..N evenly, or `forced_options` options
        self.step, self.evaluating, self.forced_options = 0, False, 0

    def scene(self) -> tuple[torch.Tensor, list[tuple[bool, bool, int]]]:
        """Patch features (64 x (FEAT_DIM + POS_DIM)) and per colour (is_left, is_top, shape)."""
        cells = torch.randperm(GRID * GRID)[:N_COLORS]
        shapes = torch.randint(0, N_SHAPES, (N_COLORS,))
        f = torch.zeros(PATCHES * PATCHES, FEAT_DIM)
        info = []
        for c in range(N_COLORS):
            cy, cx = divmod(int(cells[c]), GRID)
            for dy in range(2):
                for dx in range(2):
                    f[(2 * cy + dy) * PATCHES + 2 * cx + dx] = self.color_vec[c] + self.shape_vec[shapes[c]]
            info.append((cx < GRID // 2, cy < GRID // 2, int(shapes[c])))
        f = f + 0.1 * torch.randn_like(f)
        return torch.cat([f, self.pos], -1), info

    def text(self, info: list[tuple[bool, bool, int]], caption: bool, kind: str = "") -> list[tuple[int, bool]]:
        """(token, is_target) pairs: a caption, or `--turns` question turns."""
        toks: list[tuple[int, bool]] = []
        if caption:
            if self.args.captions == "color":
                order = list(range(N_COLORS))
            else:  # reading order: top row first, then left first
                order = sorted(range(N_COLORS), key=lambda c: (not info[c][1], not info[c][0]))
            for c in order:
                left, top, shape = info[c]
                words = (f"c{c}", self._spaced(SHAPE_WORDS[shape]), "top" if top else "bottom",
                         "left" if left else "right")
                toks += [(self.vocab[w], True) for w in words]
            return toks
        for _ in range(self.args.turns):
            c = int(torch.randint(0, N_COLORS, ()))
            k = self.types[int(torch.randint(0, len(self.types), ()))]
            kind = kind or k
            left, top, shape = info[c]
            if kind in MC_KINDS:
                toks += self._mc_turn(c, shape, kind)
                continue
            if kind == "left":
                q, ans = ["Is", "the", f"c{c}", "object", "on", "left", "?", "A:"], "yes" if left else "no"
            elif kind == "top":
                q, ans = ["Is", "the", f"c{c}", "object", "on", "top", "?", "A:"], "yes" if top else "no"
            else:
                q, ans = ["What", "shape", "of", "the", f"c{c}", "object", "?", "A:"], SHAPE_WORDS[shape]
            q = q[:-1] + [FILLER] * self.args.filler + q[-1:]  # template tokens between question and answer
            toks += [(self.vocab[w], False) for w in q] + [(self.vocab[ans], True)]
        return toks

    def _mc_turn(self, c: int, shape: int, kind: str) -> list[tuple[int, bool]]:
        if self.args.max_options == 2:  # the draws of sessions 6-7, so their runs repeat exactly
            first = int(torch.randint(0, 2, ()))  # which shape word is option A
            words = [SHAPE_WORDS[first], SHAPE_WORDS[1 - first]]
        else:  # 2..N options: both shape words and distractors, shuffled
            k = int(torch.randint(2, self.args.max_options + 1, ()))
            share = 1.0 if self.step <= self.args.two_options_until else self.args.two_option_share
            if share > 0 and not self.evaluating and float(torch.rand(())) < share:  # no draw at 0: old runs repeat
                k = 2
            k = self.forced_options or k
            words = list(SHAPE_WORDS) + [DISTRACTORS[i] for i in torch.randperm(len(DISTRACTORS))[:k - 2].tolist()]
            words = [words[i] for i in torch.randperm(k).tolist()]
        options = [t for j, w in enumerate(words) for t in ("ABCDE"[j], ".", self._spaced(w))]
        letter = "ABCDE"[words.index(SHAPE_WORDS[shape])]
        question = ["What", "shape", "of", "the", f"c{c}", "object", "?"]
        fill = [FILLER] * self.args.filler
        toks: list[tuple[int, bool]] = []
        if kind == "shape-paired":
            toks += [(self.vocab[w], False) for w in question + fill + ["A:"]]
            toks.append((self.vocab[SHAPE_WORDS[shape]], True))
        if kind == "text-mc":
            question = [f"c{c}", "is", self._spaced(SHAPE_WORDS[shape])]
        toks += [(self.vocab[w], False) for w in question + options + fill + ["A:"]]
        return toks + [(self.vocab[letter], True)]

    def _spaced(self, word: str) -> str:
        """How a shape word is written inside a sentence: its own token with --spaced-words, else the bare one."""
        return " " + word if self.args.spaced_words else word

    def batch(self, n: int, caption: bool = False, kind: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        feats, texts = [], []
        for _ in range(n):
            f, info = self.scene()
            feats.append(f)
            texts.append(self.text(info, caption, kind))
        img = self.connector(torch.stack(feats))
        width = max(len(tx) for tx in texts)  # kinds differ in length: pad at the end (never a target)
        texts = [tx + [(self.vocab["<pad>"], False)] * (width - len(tx)) for tx in texts]
        ids = torch.tensor([[t for t, _ in tx] for tx in texts])
        is_target = torch.tensor([[m for _, m in tx] for tx in texts])
        emb = torch.cat([img, self.model.get_input_embeddings()(ids)], 1)
        labels = torch.full(emb.shape[:2], -100)
        labels[:, img.shape[1] - 1:-1] = torch.where(is_target, ids, torch.full_like(ids, -100))  # position t -> t+1
        return emb, labels

    def _accuracy(self, kind: str, options: int = 0) -> float:
        """Answer accuracy of `kind` on 256 fresh sequences (with `options` options each, if given)."""
        self.forced_options = options
        emb, labels = self.batch(256, kind=kind)
        self.forced_options = 0
        pred = self.model(inputs_embeds=emb).logits.argmax(-1)
        last = labels.ne(-100).cumsum(1).eq(labels.ne(-100).sum(1, keepdim=True)) & labels.ne(-100)
        return (pred[last] == labels[last]).float().mean().item()

    def train(self) -> None:
        a, t0 = self.args, time.time()
        for step in range(1, a.steps + 1):
            self.step = step
            for group in self.opt.param_groups:
                group["lr"] = a.lr * min(1.0, step / 50)
            emb, labels = self.batch(a.batch, caption=bool(a.captions) and step % 2 == 1)
            logits = self.model(inputs_embeds=emb).logits
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            if step % 100 == 0:
                self.evaluating = True
                with torch.no_grad():
                    emb, labels = self.batch(256)
                    pred = self.model(inputs_embeds=emb).logits.argmax(-1)
                    m = labels != -100
                    acc = (pred[m] == labels[m]).float().mean().item()
                    per_kind = ""
                    if len(self.types) > 1:  # each kind alone, on its own random numbers (training draws unchanged)
                        state = torch.get_rng_state()
                        for kind in self.types:
                            per_kind += f" {kind} {self._accuracy(kind):.3f}"
                            if kind in MC_KINDS and a.max_options > 2:  # and per number of options
                                per_kind += " (" + " ".join(f"{k}: {self._accuracy(kind, k):.2f}"
                                                            for k in range(2, a.max_options + 1)) + ")"
                        torch.set_rng_state(state)
                self.evaluating = False
                print(f"step {step} loss {loss.item():.3f} answer accuracy {acc:.3f}{per_kind} "
                      f"({time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--turns", type=int, default=1, help="question turns per sequence")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--types", default="left",
                   help="question kinds, comma-separated: left, top, shape, shape-mc, shape-paired, text-mc")
    p.add_argument("--captions", choices=["", "color", "reading"], default="",
                   help="mix in caption sequences (every other step), objects listed by colour or reading order")
    p.add_argument("--filler", type=int, default=0,
                   help="filler tokens between the question and the answer (the real template has ~10)")
    p.add_argument("--max-options", type=int, default=2, choices=range(2, 6),
                   help="multiple-choice kinds draw 2..N options (letters A-E): both shape words and distractor "
                        "shapes that never answer, as the real suite has 2-5 options")
    p.add_argument("--two-options-until", type=int, default=0, metavar="STEP",
                   help="with --max-options > 2: only two options up to this training step (a curriculum)")
    p.add_argument("--two-option-share", type=float, default=0.0, metavar="P",
                   help="with --max-options > 2: this share of the training turns gets two options")
    p.add_argument("--spaced-words", action="store_true",
                   help="shape words in captions and options are other tokens than the free-form answers'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Sandbox(args).train()


if __name__ == "__main__":
    main()
