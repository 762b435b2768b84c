"""Reconstruction and leakage metrics: MSE, PSNR, SSIM (scikit-image), token accuracy, ROC AUC.

Images are float arrays in [0, 1], (3, H, W) or (N, 3, H, W) (torch or numpy). PSNR is in dB with data range 1;
identical images give PSNR = inf and SSIM = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import structural_similarity

__all__ = ["mse", "psnr", "ssim", "image_scores", "token_accuracy", "roc_auc"]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def mse(a, b) -> float:
    """Mean squared error over all elements."""
    a, b = _np(a), _np(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.mean((a - b) ** 2))


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (inf when identical)."""
    m = mse(a, b)
    return math.inf if m == 0 else 10.0 * math.log10(1.0 / m)


def ssim(a, b) -> float:
    """Structural similarity of two (3, H, W) images in [0, 1], channels averaged (scikit-image, data range 1).

    The Gaussian-free 7 x 7 window is shrunk to the largest odd size that fits images smaller than 7 px.
    """
    a, b = _np(a), _np(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim expects two (C, H, W) images of one shape, got {a.shape} and {b.shape}")
    win = min(7, a.shape[1], a.shape[2])
    win -= 1 - win % 2
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=win))


def image_scores(originals, recons) -> dict[str, float]:
    """Per-image MSE / PSNR / SSIM averaged over a batch (N, 3, H, W); PSNR averages finite values per image."""
    o, r = _np(originals), _np(recons)
    ms = [mse(x, y) for x, y in zip(o, r)]
    ps = [psnr(x, y) for x, y in zip(o, r)]
    ss = [ssim(x, y) for x, y in zip(o, r)]
    return {"mse": float(np.mean(ms)), "psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "n": len(ms)}


def token_accuracy(pred, truth) -> float:
    """Fraction of positions where the predicted token id equals the true one."""
    p, t = _np(pred).reshape(-1), _np(truth).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions for {t.size} tokens")
    return float((p == t).mean()) if t.size else float("nan")


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive` labels (ties count half; Mann-Whitney)."""
    s, y = _np(scores).reshape(-1), _np(positive).reshape(-1).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
