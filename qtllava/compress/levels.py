"""Choosing the number of levels L (library half of `qtllava levels`; docs/codecs.md, "Choosing L").

For each modality and each L in a range: the empirical entropy of the indices (bits per element, the lower bound
for any lossless code of these symbols under a per-symbol model), the bits per element actually sent by `pack`
and by `ans` (payload + side information, and the whole packet including its header), and, where the features are
given, the quantization distortion (mean 1 - cos between normalised rows and their quantized values). The
recommendation: the largest L whose `ans` rate, averaged over modalities by element count, fits the budget (2 bits
per element by default, what the paper sends at L = 4 with fixed-length codes). With accuracies per L (from real
runs), the most accurate L within the budget wins instead.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from qtllava.compress.base import Packet
from qtllava.compress.coding import ans_encode, empirical_entropy, index_bits, pack_indices
from qtllava.compress.fsq import clip_width, quantize_indices, robust_normalize

__all__ = ["indices_for_levels", "measure_indices", "analyze_levels", "recommend_levels", "write_levels_report",
           "DEFAULT_LEVELS"]

log = logging.getLogger(__name__)

DEFAULT_LEVELS = tuple(range(2, 17))


@torch.no_grad()
def indices_for_levels(features: torch.Tensor, levels: int, encoder: Callable | None = None, width: float = 0.0,
                       over: str = "sample") -> tuple[np.ndarray, float]:
    """Rows (N, D) -> (indices (N, d_code) uint8, distortion): optional encoder (e.g. FsqEncoder.proj), robust
    normalisation (width 0: the Gaussian-optimal width, `clip_width`) and L levels, exactly as the fsq client does.
    Distortion = mean over rows of 1 - cos."""
    z = encoder(features) if encoder is not None else features
    zn = robust_normalize(z.float(), clip_width(width, levels), over)
    z_hat, idx = quantize_indices(zn, levels)
    dist = float((1 - torch.nn.functional.cosine_similarity(zn, z_hat, dim=-1, eps=1e-8)).mean()) if len(zn) else 0.0
    return idx.cpu().numpy(), dist


def measure_indices(idx: np.ndarray, levels: int) -> dict:
    """Bits per element of one index array (N, C): entropy, pack and ans (payload + side; whole packet)."""
    n = idx.size
    packed = pack_indices(idx, levels)
    payload, side = ans_encode(idx, levels)
    shape = tuple(int(s) for s in idx.shape)

    def packet_bits(p: bytes, s: bytes, coder: str) -> float:
        return len(Packet("fsq", shape, p, s, levels, coder).to_bytes()) * 8 / max(n, 1)

    return {
        "levels": levels,
        "numel": int(n),
        "entropy_bits": empirical_entropy(idx, levels),
        "log2_levels": math.log2(levels),
        "pack_bits": len(packed) * 8 / max(n, 1),
        "pack_packet_bits": packet_bits(packed, b"", "pack"),
        "ans_bits": (len(payload) + len(side)) * 8 / max(n, 1),
        "ans_side_bytes": len(side),
        "ans_packet_bits": packet_bits(payload, side, "ans"),
        "pack_index_bits": index_bits(levels),
    }


def analyze_levels(indices: Mapping[str, Mapping[int, np.ndarray]] | None = None,
                   features: Mapping[str, torch.Tensor] | None = None,
                   encoders: Mapping[str, Callable] | None = None, levels=DEFAULT_LEVELS, budget_bits: float = 2.0,
                   width: float = 3.0, over: str = "sample", accuracy: Mapping[int, float] | None = None) -> dict:
    """Measure rates per modality and L and recommend an L.

    indices: {modality: {L: index array (N, C)}} (codes already computed), or
    features: {modality: rows (N, D)} with optional encoders {modality: callable (N, D) -> (N, d_code)}; each L in
    `levels` is then quantized here. accuracy: optional {L: score} from real runs (higher is better).
    Returns {"budget_bits", "levels", "modalities": {m: [row per L]}, "overall": [row per L], "recommended",
    "reasoning"}; each row has the keys of `measure_indices` (+ "distortion" with features).
    """
    if (indices is None) == (features is None):
        raise ValueError("analyze_levels: pass exactly one of `indices` or `features`")
    per_mod: dict[str, list[dict]] = {}
    if features is not None:
        for mod, x in features.items():
            enc = (encoders or {}).get(mod)
            rows = []
            for lv in levels:
                idx, dist = indices_for_levels(x, lv, enc, width, over)
                rows.append({**measure_indices(idx, lv), "distortion": dist})
            per_mod[mod] = rows
    else:
        for mod, by_level in indices.items():
            per_mod[mod] = [measure_indices(np.asarray(by_level[lv]), lv) for lv in sorted(by_level)]
    all_levels = sorted({r["levels"] for rows in per_mod.values() for r in rows})
    overall = []
    for lv in all_levels:
        rows = [r for rs in per_mod.values() for r in rs if r["levels"] == lv]
        n = sum(r["numel"] for r in rows)
        avg = {k: sum(r[k] * r["numel"] for r in rows) / max(n, 1)
               for k in ("entropy_bits", "pack_bits", "ans_bits", "pack_packet_bits", "ans_packet_bits")}
        if all("distortion" in r for r in rows):
            avg["distortion"] = sum(r["distortion"] * r["numel"] for r in rows) / max(n, 1)
        if accuracy and lv in accuracy:
            avg["accuracy"] = float(accuracy[lv])
        overall.append({"levels": lv, "numel": n, **avg})
    recommended, reasoning = recommend_levels(overall, budget_bits)
    return {"budget_bits": budget_bits, "levels": all_levels, "modalities": per_mod, "overall": overall,
            "recommended": recommended, "reasoning": reasoning}


def recommend_levels(overall: list[dict], budget: float) -> tuple[int | None, str]:
    """The recommended L and its reasoning from per-L rows (`levels`, `ans_bits`, `pack_bits`, `entropy_bits`,
    optional `accuracy`, `distortion`) under a budget in bits per element."""
    if not overall:
        return None, "no levels measured"
    fits = [r for r in overall if r["ans_bits"] <= budget]
    pack_fits = [r for r in overall if r["pack_bits"] <= budget]
    best_pack = max(pack_fits, key=lambda r: r["levels"]) if pack_fits else None
    if not fits:
        low = min(overall, key=lambda r: r["ans_bits"])
        return low["levels"], (f"no L fits {budget:g} bits/element with ans; the cheapest is L={low['levels']} at "
                               f"{low['ans_bits']:.3f} bits/element (entropy {low['entropy_bits']:.3f})")
    if any("accuracy" in r for r in fits):
        scored = [r for r in fits if "accuracy" in r]
        pick = max(scored, key=lambda r: (r["accuracy"], -r["ans_bits"]))
        why = f"the most accurate L within the budget (accuracy {pick['accuracy']:.4f})"
    else:
        pick = max(fits, key=lambda r: r["levels"])
        why = "the largest L (finest quantization) whose entropy-coded rate fits the budget"
    text = [f"recommend L={pick['levels']}: {why}. A fixed-length code spends ceil(log2 L) bits per index and is "
            f"tight only for L = 2^b, while any lossless code needs at least the entropy H of the indices; robust "
            f"normalisation makes level use uneven, so H is well below log2 L."]
    text.append(f"Measured at L={pick['levels']}: H = {pick['entropy_bits']:.3f} bits/element, ans sends "
                f"{pick['ans_bits']:.3f} ({100 * (pick['ans_bits'] / max(pick['entropy_bits'], 1e-12) - 1):+.2f}% "
                f"over H, model bytes included), pack sends {pick['pack_bits']:.3f}; log2 L = "
                f"{math.log2(pick['levels']):.3f}.")
    if best_pack is not None:
        text.append(f"With pack the same budget of {budget:g} bits/element allows at most L={best_pack['levels']} "
                    f"({best_pack['pack_bits']:.3f} bits/element).")
    nxt = [r for r in overall if r["levels"] > pick["levels"]]
    if nxt:
        r = min(nxt, key=lambda r: r["levels"])
        text.append(f"The next L={r['levels']} would send {r['ans_bits']:.3f} bits/element with ans "
                    f"({'over' if r['ans_bits'] > budget else 'within'} the budget).")
    if "distortion" in pick:
        text.append(f"Quantization distortion (1 - cos) at L={pick['levels']}: {pick['distortion']:.4f}.")
    return pick["levels"], " ".join(text)


def write_levels_report(result: dict, json_path: str | Path, png_path: str | Path) -> None:
    """Write the `analyze_levels` result as JSON and a PNG plot (bits/element vs L per modality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path, png_path = Path(json_path), Path(png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    mods = list(result["modalities"])
    fig, axes = plt.subplots(1, max(1, len(mods)), figsize=(5.5 * max(1, len(mods)), 4.2), squeeze=False)
    for ax, mod in zip(axes[0], mods):
        rows = result["modalities"][mod]
        lv = [r["levels"] for r in rows]
        ax.plot(lv, [r["log2_levels"] for r in rows], ":", color="gray", label="log2 L")
        ax.step(lv, [r["pack_bits"] for r in rows], where="mid", label="pack (sent)")
        ax.plot(lv, [r["ans_bits"] for r in rows], "o-", label="ans (sent, incl. model)")
        ax.plot(lv, [r["entropy_bits"] for r in rows], "x--", label="empirical entropy")
        ax.axhline(result["budget_bits"], color="red", lw=0.8, label=f"budget {result['budget_bits']:g}")
        if result.get("recommended") is not None:
            ax.axvline(result["recommended"], color="green", lw=0.8, ls="--", label=f"L = {result['recommended']}")
        ax.set_xlabel("levels L")
        ax.set_ylabel("bits per element")
        ax.set_title(mod)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    log.info("levels report written to %s and %s", json_path, png_path)
