"""Image sources of the privacy suite: the client's held-out images, the attacker's auxiliary images, probe data.

Three sets a client may hold (`IMAGE_SETS`):
- ``scenes``: the instruction corpus's validation split of the data root (held out from training; its scenes'
  objects are in ``scenes.jsonl``), replayed with its own conversations;
- ``fashion``: Fashion-MNIST test images from Debian's ``dataset-fashion-mnist`` package (grey, 28 px);
- ``skimage``: photographs bundled with scikit-image (astronaut, coffee, chelsea, ...), centre-cropped to a square.
All are resized to the preset's image size the way the client's loader does (bicubic).

The attacker's auxiliary images never come from those: scenes drawn with the generator's own functions under the
attacker's seed (any scene whose signature occurs in the data root is dropped), Fashion-MNIST *training* images, and
random crops of *other* scikit-image pictures.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from qtllava.data.llava_json import image_to_tensor
from qtllava.data import questions as Q
from qtllava.data.world import (GRID, SOC_COLORS, SOC_SHAPES, Layout, Scene, render, sample_glyph, sample_shape,
                                sample_soc)

__all__ = ["IMAGE_SETS", "FASHION_DIR", "FASHION_CLASSES", "SKIMAGE_EVAL", "SKIMAGE_AUX", "fashion_available",
           "load_fashion", "skimage_photos", "to_pixels", "to_unit", "VictimSet", "scene_set", "fashion_set",
           "skimage_set", "AuxImages", "aux_images", "soc_targets", "soc_probe_data", "data_signatures"]

IMAGE_SETS = ("scenes", "fashion", "skimage")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SKIMAGE_EVAL = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "clock")
SKIMAGE_AUX = ("hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "colorwheel",
               "page", "text", "cell", "microaneurysms", "checkerboard")
_CAPTION_MIX = (0.4, 0.2, 0.4)  # soc, glyph, shape: the generator's caption corpus mix


# --- pixels ---------------------------------------------------------------------------------------------------


def to_pixels(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL image -> (3, size, size) float32 normalised exactly as the client's loader does."""
    return image_to_tensor(img, size, mean, std)


def to_unit(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised pixels (..., 3, H, W) -> RGB in [0, 1] (what the metrics compare)."""
    m = torch.tensor(mean, dtype=pixels.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels * s + m).clamp(0, 1)


def _rgb(arr: np.ndarray) -> Image.Image:
    """An image array (grey, RGB, RGBA, bool or float) as an RGB PIL image."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return Image.fromarray(arr).convert("RGB")


def _square(arr: np.ndarray) -> Image.Image:
    """Centre square crop of an image array as an RGB PIL image."""
    img = _rgb(arr)
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


# --- Fashion-MNIST (Debian package) and scikit-image photographs ------------------------------------------------


def fashion_available(root: Path = FASHION_DIR) -> bool:
    return all((root / f"{s}-{k}-idx{n}-ubyte.gz").is_file() for s in ("train", "t10k")
               for k, n in (("images", 3), ("labels", 1)))


def load_fashion(split: str, start: int = 0, count: int | None = None,
                 root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """IDX files of `split` ("train" or "t10k") -> (images (n, 28, 28) uint8, labels (n,) int64)."""
    if not fashion_available(root):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}: apt-get install dataset-fashion-mnist")
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz") as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    end = n if count is None else min(n, start + count)
    return images[start:end].copy(), labels[start:end].copy()


def skimage_photos(names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named pictures bundled with scikit-image (no download), as arrays."""
    import skimage.data

    return {n: np.asarray(getattr(skimage.data, n)()) for n in names}


# --- what the client holds ----------------------------------------------------------------------------------------


@dataclass
class VictimSet:
    """Held-out client samples as a LLaVA-JSON file + images (what the victim's loader reads), with the truth the
    evaluator keeps: per record, the scene objects (scenes) or class index (fashion)."""

    name: str
    json_path: Path
    image_folder: Path
    template: str
    ids: list[str]
    objects: dict[str, list] = field(default_factory=dict)  # record id -> [[colour, shape, col, row], ...] (soc)
    classes: dict[str, int] = field(default_factory=dict)  # record id -> Fashion-MNIST class


def scene_set(data_root: Path, template: str, limit: int | None = None, out: Path | None = None,
              split: str = "instruct_val") -> VictimSet:
    """A split of the instruction corpus (default: the validation split, held out from training) with its scenes'
    objects; with `limit`, its first records, written to `out` (never into the data root)."""
    data_root = Path(data_root)
    records = json.loads((data_root / f"{split}.json").read_text())
    if limit is not None:
        records = records[:limit]
    scenes = {}
    with (data_root / "scenes.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "soc":
                scenes[row["image"]] = row["content"]
    objects = {r["id"]: scenes[r["image"]] for r in records if r.get("image") in scenes}
    path = data_root / f"{split}.json"
    if limit is not None:
        if out is None:
            raise ValueError("scene_set: a limit needs an output folder")
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{split}-first{limit}.json"
        path.write_text(json.dumps(records))
    name = "scenes" if split == "instruct_val" else split
    return VictimSet(name, path, data_root / "images", template, [r["id"] for r in records], objects=objects)


def _write_set(name: str, out: Path, images: list[tuple[str, Image.Image, str, str]], template: str) -> VictimSet:
    """Write (id, image, prompt, answer) records as PNGs + a LLaVA-JSON file under `out/name`."""
    folder = out / name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for rid, img, prompt, answer in images:
        img.save(folder / "images" / f"{rid}.png")
        records.append({"id": rid, "image": f"{rid}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return VictimSet(name, path, folder / "images", template, [r["id"] for r in records])


def fashion_set(out: Path, image_size: int, template: str, count: int = 200) -> VictimSet:
    """The first `count` Fashion-MNIST test images, asked for their class (answer: the class name)."""
    images, labels = load_fashion("t10k", 0, count)
    items = [(f"fashion-{i:05d}", Image.fromarray(im).convert("RGB").resize((image_size, image_size),
                                                                           Image.Resampling.BICUBIC),
              "What is shown in the image?\nAnswer with one word.", FASHION_CLASSES[int(c)])
             for i, (im, c) in enumerate(zip(images, labels))]
    vs = _write_set("fashion", out, items, template)
    vs.classes = {f"fashion-{i:05d}": int(c) for i, c in enumerate(labels)}
    return vs


def skimage_set(out: Path, image_size: int, template: str) -> VictimSet:
    photos = skimage_photos(SKIMAGE_EVAL)
    items = [(f"skimage-{n}", _square(a).resize((image_size, image_size), Image.Resampling.BICUBIC),
              "Describe the image.", n) for n, a in photos.items()]
    return _write_set("skimage", out, items, template)


def data_signatures(data_root: Path) -> set[str]:
    """Signatures of every scene in a data root (the evaluator keeps the attacker's scenes disjoint from them)."""
    out = set()
    with (Path(data_root) / "scenes.jsonl").open() as f:
        for line in f:
            out.add(json.loads(line)["signature"])
    return out


# --- what the attacker holds ------------------------------------------------------------------------------------


@dataclass
class AuxImages:
    """The attacker's own images (PIL, RGB) with where each came from, and captions for its scenes."""

    images: list[Image.Image]
    source: list[str]  # "scenes" | "fashion" | "skimage"
    captions: list[tuple[str, str]]  # (prompt, caption) for the scene images, aligned with the first scenes


def aux_images(image_size: int, n_scenes: int, n_fashion: int, n_crops: int, seed: int,
               exclude: set[str] | None = None) -> AuxImages:
    """The attacker's auxiliary set: generator scenes (caption mix) drawn under `seed`, minus any scene whose
    signature is in `exclude`; Fashion-MNIST training images (when the package is installed); random crops of the
    scikit-image pictures not used for evaluation."""
    rng = np.random.default_rng(seed)
    lay = Layout(image_size)
    images, source, captions = [], [], []
    exclude = exclude or set()
    while len(images) < n_scenes:
        kind = ("soc", "glyph", "shape")[int(rng.choice(3, p=np.asarray(_CAPTION_MIX)))]
        scene: Scene = {"soc": sample_soc, "glyph": sample_glyph, "shape": sample_shape}[kind](rng, lay)
        if scene.signature() in exclude:
            continue
        images.append(render(scene, lay))
        source.append("scenes")
        prompt = Q.CAPTION_PROMPTS[int(rng.integers(0, len(Q.CAPTION_PROMPTS)))]
        captions.append((prompt, Q.caption(scene)))
    if n_fashion and fashion_available():
        fim, _ = load_fashion("train", 0, n_fashion)
        for im in fim:
            images.append(Image.fromarray(im).convert("RGB"))
            source.append("fashion")
    if n_crops:
        photos = [_rgb(a) for a in skimage_photos(SKIMAGE_AUX).values()]
        for _ in range(n_crops):
            p = photos[int(rng.integers(0, len(photos)))]
            w, h = p.size
            s = int(rng.integers(max(8, min(w, h) // 6), min(w, h) + 1))
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            crop = p.crop((x, y, x + s, y + s))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(crop.resize((image_size, image_size), Image.Resampling.BICUBIC))
            source.append("skimage")
    return AuxImages(images, source, captions)


# --- semantic probe data (evaluator side) ------------------------------------------------------------------------


def soc_targets(objects: list) -> tuple[list[int], list[int]]:
    """Sort-of-CLEVR objects [[colour, shape, col, row], ...] -> (shape index, cell index) per colour, in
    SOC_COLORS order (each colour occurs exactly once)."""
    by_color = {o[0]: o for o in objects}
    shapes = [SOC_SHAPES.index(by_color[c][1]) for c in SOC_COLORS]
    cells = [int(by_color[c][3]) * GRID + int(by_color[c][2]) for c in SOC_COLORS]
    return shapes, cells


def soc_probe_data(image_size: int, n: int, seed: int,
                   exclude: set[str] | None = None) -> tuple[list[Image.Image], torch.Tensor, torch.Tensor]:
    """Clean Sort-of-CLEVR scenes for training the semantic probe -> (images, shapes (n, 6), cells (n, 6))."""
    rng = np.random.default_rng(seed)
    lay = Layout(image_size)
    images, shapes, cells = [], [], []
    exclude = exclude or set()
    while len(images) < n:
        scene = sample_soc(rng, lay)
        if scene.signature() in exclude:
            continue
        images.append(render(scene, lay))
        s, c = soc_targets(scene.describe())
        shapes.append(s)
        cells.append(c)
    return images, torch.tensor(shapes), torch.tensor(cells)
