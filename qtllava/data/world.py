"""The synthetic world: palettes, lexicon, scene sampling, rendering and scene signatures.

Three kinds of scenes, all on a white canvas laid out on a 4 x 4 grid of cells (no cell straddles the image's
vertical or horizontal middle, so "left" / "top" are never ambiguous):

- ``soc``: Sort-of-CLEVR (Santoro et al. 2017): 6 objects, one per colour, each a circle or a square.
- ``shape``: 3-6 objects of 3 shapes x 6 colours drawn from a prior with deliberate popularity and co-occurrence
  bias (so POPE's "popular" and "adversarial" negatives mean something).
- ``glyph``: 1-2 words from a small lexicon, each in its own colour, rendered with Pillow's bundled font.

Scenes are drawn at ``ss`` times the target size and box-downsampled, so shapes stay recognisable (anti-aliased)
even at 16 px. Everything here is a pure function of a ``numpy.random.Generator``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "SOC_COLORS",
    "SOC_SHAPES",
    "SHAPE_COLORS",
    "SHAPES",
    "GLYPH_COLORS",
    "LEXICON",
    "GRID",
    "Layout",
    "Obj",
    "Word",
    "Scene",
    "ShapePrior",
    "shape_prior",
    "sample_soc",
    "sample_shape",
    "sample_glyph",
    "render",
]

_PALETTE: dict[str, tuple[int, int, int]] = {  # object colours of the Sort-of-CLEVR and shape worlds
    "red": (230, 0, 0),
    "blue": (0, 60, 240),
    "green": (0, 170, 0),
    "orange": (255, 140, 0),
    "yellow": (235, 205, 0),
    "purple": (150, 30, 200),
    "gray": (128, 128, 128),
}
SOC_COLORS = {c: _PALETTE[c] for c in ("red", "blue", "green", "orange", "yellow", "gray")}
SOC_SHAPES = ("circle", "square")
SHAPE_COLORS = {c: _PALETTE[c] for c in ("red", "blue", "green", "yellow", "purple", "gray")}
SHAPES = ("circle", "square", "triangle")

GLYPH_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "blue": (0, 60, 240),
    "green": (0, 150, 0),
    "orange": (255, 130, 0),
    "purple": (150, 30, 200),
    "black": (0, 0, 0),
}

# 30 short, distinct, lowercase words (no colour or shape names, so answers are never ambiguous).
LEXICON = (
    "cat", "dog", "sun", "sky", "car", "box", "hat", "cup", "pen", "map",
    "key", "bus", "egg", "fox", "owl", "bee", "ant", "ice", "jam", "kit",
    "log", "net", "oak", "pig", "rat", "toy", "van", "web", "zip", "gem",
)

GRID = 4  # cells per side; even, so no cell straddles the middle
WORLD_SEED = 20240517  # fixes the shape prior (popularity, themes): part of the world, not of a data seed


@dataclass(frozen=True)
class Layout:
    """Pixel geometry for one image size (all lengths in supersampled pixels unless noted)."""

    image_size: int

    @property
    def ss(self) -> int:
        """Supersampling factor: shapes are drawn this many times larger, then box-downsampled."""
        return 4 if self.image_size <= 64 else (2 if self.image_size <= 160 else 1)

    @property
    def canvas(self) -> int:
        return self.image_size * self.ss

    @property
    def cell(self) -> int:
        return self.canvas // GRID

    @property
    def obj_size(self) -> int:
        return max(3 * self.ss, int(round(0.8 * self.cell)))

    @property
    def font_size(self) -> int:
        """Largest font size such that every lexicon word fits in half the canvas height and 85 % of its width."""
        return _font_size(self.canvas)


@functools.lru_cache(maxsize=32)
def _font_size(canvas: int) -> int:
    fs = max(4, int(0.45 * canvas))
    while fs > 4:
        font = _font(fs)
        boxes = [font.getbbox(wd) for wd in LEXICON]
        w = max(b[2] - b[0] for b in boxes)
        h = max(b[3] - b[1] for b in boxes)
        if w <= 0.85 * canvas and h <= 0.45 * canvas:
            break
        fs -= 1
    return fs


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=256)
def _word_mask(text: str, size: int) -> Image.Image:
    """Coverage mask of a word's ink box (rendering once per word and size keeps glyph scenes fast)."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    return mask


@dataclass(frozen=True)
class Obj:
    """One object: shape and colour names, grid cell and top-left corner / size in supersampled pixels."""

    shape: str
    color: str
    col: int
    row: int
    x0: int
    y0: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def center(self, ss: int) -> tuple[float, float]:
        """Centre in output pixels."""
        return ((self.x0 + self.size / 2) / ss, (self.y0 + self.size / 2) / ss)

    @property
    def is_left(self) -> bool:
        return self.col < GRID // 2

    @property
    def is_top(self) -> bool:
        return self.row < GRID // 2

    @property
    def where(self) -> str:
        return f"{'top' if self.is_top else 'bottom'} {'left' if self.is_left else 'right'}"


@dataclass(frozen=True)
class Word:
    text: str
    color: str
    x: int  # top-left corner of the text's ink box, supersampled pixels
    y: int
    row: int  # 0 = top half, 1 = bottom half (by the text's centre)
    col: int  # 0, 1, 2: left / middle / right third (by the text's centre)
    cell: tuple[int, int] = (0, 0)  # (column, row) of the text's centre on an 8 x 8 grid (for the signature)


@dataclass
class Scene:
    kind: str  # "soc" | "shape" | "glyph"
    image_size: int
    objects: list[Obj] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)

    def signature(self) -> str:
        """Coarse identity of a scene: its content at grid-cell resolution (positions within a cell ignored):
        objects by colour, shape and 4 x 4 cell; words by text, colour and the 8 x 8 cell of their centre (the
        finer grid keeps enough distinct one-word scenes for large corpora).

        Two scenes with equal signatures count as the same scene for the train / benchmark disjointness rule.
        """
        if self.kind == "glyph":
            parts = sorted(f"{w.text}:{w.color}:{w.cell[0]}{w.cell[1]}" for w in self.words)
        else:
            parts = sorted(f"{o.color}-{o.shape}@{o.col}{o.row}" for o in self.objects)
        return f"{self.kind}|" + ",".join(parts)

    def describe(self) -> list[list]:
        """Compact JSON-able content (for scenes.jsonl)."""
        if self.kind == "glyph":
            return [[w.text, w.color, w.col, w.row] for w in self.words]
        return [[o.color, o.shape, o.col, o.row] for o in self.objects]


# --- sampling ----------------------------------------------------------------------------------------------


def _place(rng: np.random.Generator, lay: Layout, n: int) -> list[tuple[int, int, int, int]]:
    """n distinct cells with a random offset inside each: (col, row, x0, y0)."""
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    slack = max(0, lay.cell - lay.obj_size)
    out = []
    for c in cells:
        col, row = int(c) % GRID, int(c) // GRID
        dx, dy = (int(v) for v in rng.integers(0, slack + 1, size=2))
        out.append((col, row, col * lay.cell + dx, row * lay.cell + dy))
    return out


def sample_soc(rng: np.random.Generator, lay: Layout) -> Scene:
    """Sort-of-CLEVR: one object per colour, circle or square, in 6 distinct cells."""
    colors = list(SOC_COLORS)
    shapes = rng.integers(0, 2, size=len(colors))
    places = _place(rng, lay, len(colors))
    objs = [Obj(SOC_SHAPES[int(s)], c, col, row, x0, y0, lay.obj_size)
            for c, s, (col, row, x0, y0) in zip(colors, shapes, places)]
    return Scene("soc", lay.image_size, objects=objs)


@dataclass(frozen=True)
class ShapePrior:
    """Class popularity and co-occurrence of the shape world (18 classes = colour x shape)."""

    classes: tuple[tuple[str, str], ...]  # (color, shape)
    popularity: np.ndarray  # (C,) probabilities
    themes: tuple[tuple[int, ...], ...]  # groups of class indices that tend to co-occur
    theme_of: tuple[int, ...]
    cooc: np.ndarray  # (C, C) empirical co-occurrence frequency, zero diagonal
    frequency: np.ndarray  # (C,) empirical fraction of scenes containing the class
    p_theme: float = 0.7

    def names(self) -> list[str]:
        return [f"{c} {s}" for c, s in self.classes]

    def draw_classes(self, rng: np.random.Generator, n: int) -> list[int]:
        t = self.themes[int(rng.integers(0, len(self.themes)))]
        tp = self.popularity[list(t)] / self.popularity[list(t)].sum()
        out = []
        for _ in range(n):
            if rng.random() < self.p_theme:
                out.append(int(t[int(rng.choice(len(t), p=tp))]))
            else:
                out.append(int(rng.choice(len(self.classes), p=self.popularity)))
        return out

    def negatives(self, rule: str, present: set[int], k: int, rng: np.random.Generator) -> list[int]:
        """k absent classes by POPE's rule: random (uniform), popular (most frequent overall), adversarial
        (co-occur most with the present classes). Popular and adversarial are deterministic top-k."""
        absent = [c for c in range(len(self.classes)) if c not in present]
        if rule == "random":
            return [absent[int(i)] for i in rng.choice(len(absent), size=k, replace=False)]
        if rule == "popular":
            score = {c: float(self.frequency[c]) for c in absent}
        elif rule == "adversarial":
            score = {c: float(sum(self.cooc[p, c] for p in present)) for c in absent}
        else:
            raise ValueError(f"unknown POPE rule {rule!r}")
        return sorted(absent, key=lambda c: (-score[c], c))[:k]


@functools.lru_cache(maxsize=1)
def shape_prior() -> ShapePrior:
    """The fixed prior of the shape world (depends only on WORLD_SEED)."""
    rng = np.random.default_rng(WORLD_SEED)
    classes = tuple((c, s) for c in SHAPE_COLORS for s in SHAPES)
    n = len(classes)
    rank = rng.permutation(n)
    pop = 1.0 / (1.0 + rank) ** 0.8
    pop = pop / pop.sum()
    perm = rng.permutation(n)
    themes = tuple(tuple(int(x) for x in perm[i:i + 3]) for i in range(0, n, 3))
    theme_of = [0] * n
    for ti, t in enumerate(themes):
        for c in t:
            theme_of[c] = ti
    prior = ShapePrior(classes, pop, themes, tuple(theme_of), np.zeros((n, n)), np.zeros(n))
    # empirical statistics of the prior (what POPE would compute from a dataset's annotations)
    cooc = np.zeros((n, n))
    freq = np.zeros(n)
    draws = 4000
    for _ in range(draws):
        present = sorted(set(prior.draw_classes(rng, int(rng.integers(3, 7)))))
        for a in present:
            freq[a] += 1
            for b in present:
                if a != b:
                    cooc[a, b] += 1
    return ShapePrior(classes, pop, themes, tuple(theme_of), cooc / draws, freq / draws)


def sample_shape(rng: np.random.Generator, lay: Layout, n_min: int = 3, n_max: int = 6) -> Scene:
    prior = shape_prior()
    n = int(rng.integers(n_min, n_max + 1))
    cls = prior.draw_classes(rng, n)
    places = _place(rng, lay, n)
    objs = [Obj(prior.classes[c][1], prior.classes[c][0], col, row, x0, y0, lay.obj_size)
            for c, (col, row, x0, y0) in zip(cls, places)]
    return Scene("shape", lay.image_size, objects=objs)


def sample_glyph(rng: np.random.Generator, lay: Layout, n_words: int | None = None) -> Scene:
    """1-2 distinct lexicon words in distinct colours; two words go to different halves (top / bottom)."""
    if n_words is None:
        n_words = int(rng.integers(1, 3))
    words = [LEXICON[int(i)] for i in rng.choice(len(LEXICON), size=n_words, replace=False)]
    colors = [list(GLYPH_COLORS)[int(i)] for i in rng.choice(len(GLYPH_COLORS), size=n_words, replace=False)]
    font = _font(lay.font_size)
    R = lay.canvas
    halves = [int(h) for h in rng.permutation(2)] if n_words == 2 else [-1]
    out = []
    for text, color, half in zip(words, colors, halves):
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left, bottom - top
        if half < 0:
            ylo, yhi = 0, R - h
        else:
            ylo, yhi = half * R // 2, (half + 1) * R // 2 - h
        bx = int(rng.integers(0, max(0, R - w) + 1))
        by = int(rng.integers(ylo, max(ylo, yhi) + 1))
        cx, cy = bx + w / 2, by + h / 2
        out.append(Word(text, color, bx, by, row=int(cy >= R / 2), col=min(2, int(3 * cx / R)),
                        cell=(min(7, int(8 * cx / R)), min(7, int(8 * cy / R)))))
    return Scene("glyph", lay.image_size, words=out)


# --- rendering ---------------------------------------------------------------------------------------------


def render(scene: Scene, lay: Layout | None = None) -> Image.Image:
    """RGB image of the scene at its image size."""
    lay = lay or Layout(scene.image_size)
    R = lay.canvas
    img = Image.new("RGB", (R, R), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if scene.kind == "glyph":
        for w in scene.words:
            img.paste(GLYPH_COLORS[w.color], (w.x, w.y), _word_mask(w.text, lay.font_size))
    else:
        palette = SOC_COLORS if scene.kind == "soc" else SHAPE_COLORS
        for o in scene.objects:
            rgb = palette[o.color]
            box = (o.x0, o.y0, o.x0 + o.size - 1, o.y0 + o.size - 1)
            if o.shape == "circle":
                draw.ellipse(box, fill=rgb)
            elif o.shape == "square":
                # squares are drawn a little smaller than the bounding box so circle and square have similar area
                m = int(round(o.size * 0.06))
                draw.rectangle((box[0] + m, box[1] + m, box[2] - m, box[3] - m), fill=rgb)
            elif o.shape == "triangle":
                draw.polygon([(o.x0 + (o.size - 1) / 2, o.y0), (o.x0, box[3]), (box[2], box[3])], fill=rgb)
            else:  # pragma: no cover - closed set
                raise ValueError(o.shape)
    if lay.ss > 1:
        img = img.resize((scene.image_size, scene.image_size), Image.Resampling.BOX)
    return img


def distance(a: Obj, b: Obj) -> float:
    return math.dist((a.x0 + a.size / 2, a.y0 + a.size / 2), (b.x0 + b.size / 2, b.y0 + b.size / 2))
