"""Semantic scores: probes trained on clean images (the evaluator's, not the attacker's), applied to reconstructions.

- Scenes (Sort-of-CLEVR, one object per colour): for each of the 6 colours the probe predicts the object's shape
  (circle / square) and its cell on the 4 x 4 grid. The semantic score is the fraction of (image, colour) pairs
  whose shape *and* cell are both right (chance 1/2 x 1/16 = 3.1 %); shape and position are reported apart too.
- Fashion-MNIST: the probe predicts the class (chance 10 %).
Probes train with blur and noise augmentation so that a blurry but correct reconstruction still counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtllava.data.world import GRID, SOC_COLORS, SOC_SHAPES
from qtllava.privacy.images import load_fashion, soc_probe_data, soc_targets, to_pixels
from qtllava.privacy.nets import Probe, blur_noise, fit, predict

__all__ = ["N_COLORS", "N_CELLS", "SCENE_CHANCE", "FASHION_CHANCE", "unit_images", "train_scene_probe",
           "scene_semantic", "train_fashion_probe", "fashion_semantic"]

N_COLORS, N_SHAPES, N_CELLS = len(SOC_COLORS), len(SOC_SHAPES), GRID * GRID
SCENE_CHANCE = 1.0 / (N_SHAPES * N_CELLS)
FASHION_CHANCE = 0.1
_FASHION_PROBE_START = 30000  # probe images come from the second half of the training split (the attacker's from
# the first)


def unit_images(images, size: int) -> torch.Tensor:
    """PIL images -> (n, 3, size, size) in [0, 1]."""
    return torch.stack([to_pixels(im, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) for im in images])


def _scene_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    shapes, cells = _split(logits)
    return F.cross_entropy(shapes.reshape(-1, N_SHAPES), target[:, :N_COLORS].reshape(-1)) + \
        F.cross_entropy(cells.reshape(-1, N_CELLS), target[:, N_COLORS:].reshape(-1))


def _split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = logits.shape[0]
    shapes = logits[:, :N_COLORS * N_SHAPES].reshape(b, N_COLORS, N_SHAPES)
    cells = logits[:, N_COLORS * N_SHAPES:].reshape(b, N_COLORS, N_CELLS)
    return shapes, cells


def train_scene_probe(image_size: int, n_images: int, steps: int, seed: int,
                      exclude: set[str] | None = None) -> Probe:
    """A probe trained on `n_images` clean Sort-of-CLEVR scenes drawn under `seed` (minus `exclude` signatures)."""
    images, shapes, cells = soc_probe_data(image_size, n_images, seed, exclude)
    x = unit_images(images, image_size)
    torch.manual_seed(seed)
    probe = Probe(image_size, N_COLORS * (N_SHAPES + N_CELLS))
    fit(probe, x, _scene_loss, torch.cat([shapes, cells], 1), steps, 32, 2e-3, seed=seed, augment=blur_noise)
    return probe


def scene_semantic(probe: Probe, images: torch.Tensor, objects: list[list]) -> dict[str, float]:
    """images (n, 3, S, S) in [0, 1]; objects: per image its [[colour, shape, col, row], ...] ->
    semantic (shape and cell right), semantic_shape, semantic_position, over all (image, colour) pairs."""
    if not len(objects):
        return {"semantic": float("nan"), "semantic_shape": float("nan"), "semantic_position": float("nan")}
    shapes, cells = _split(predict(probe, images))
    targets = [soc_targets(o) for o in objects]
    ts = torch.tensor([t[0] for t in targets])
    tc = torch.tensor([t[1] for t in targets])
    ok_s = shapes.argmax(-1) == ts
    ok_c = cells.argmax(-1) == tc
    return {"semantic": float((ok_s & ok_c).float().mean()), "semantic_shape": float(ok_s.float().mean()),
            "semantic_position": float(ok_c.float().mean())}


def train_fashion_probe(image_size: int, n_images: int, steps: int, seed: int) -> Probe:
    """A class probe on clean Fashion-MNIST training images (a slice the attacker's auxiliary set does not use)."""
    from PIL import Image

    raw, labels = load_fashion("train", _FASHION_PROBE_START, n_images)
    x = unit_images([Image.fromarray(im) for im in raw], image_size)
    torch.manual_seed(seed)
    probe = Probe(image_size, 10)
    fit(probe, x, F.cross_entropy, torch.from_numpy(labels), steps, 32, 2e-3, seed=seed, augment=blur_noise)
    return probe


def fashion_semantic(probe: Probe, images: torch.Tensor, classes: list[int]) -> float:
    if not classes:
        return float("nan")
    return float((predict(probe, images).argmax(-1) == torch.tensor(classes)).float().mean())
