"""Codec benchmark (`make bench-codec`): what `pack` and `ans` really send and how fast, against the entropy and zstd.

For each source (Gaussian stand-ins; "trained-tiny": features of a trained tiny checkpoint, at the tiny shape only,
image and text rows), each shape
(the paper's 728 x 1280 per image, the tiny preset's 64 x 256 per image, batch 8) and L = 2, 4, 8, 16: the
indices that the fsq client sends (robust normalisation per row, L uniform levels) are coded as one packet per
batch with `pack`, `ans` and zstd applied to the `pack` bytes. Reported per row: bits per element (payload + side
information; and the whole packet with its header), the empirical entropy (pooled, and given the channel: the
bound for per-channel models, which `ans` approaches with channel groups), encode and decode throughput in
M elements/s (codes <-> bytes; best of several runs; at 1 and 2 torch threads, which the numpy/constriction coders
do not use: constriction holds the GIL, so two threads cannot split one stream either, see `ans_2streams_*`), the
time of the torch quantization step (features -> codes) at 1 and 2 threads, and per image, encode + decode in ms.
Per (shape, source, L): the link speed above which `pack` is faster end to end than `ans`
(coding time + transfer time; quantization costs the same for both and cancels).

Writes results/codec.json ({"meta", "rows", "crossover"}) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zstandard

from qtllava.compress.base import Packet
from qtllava.compress.coding import (ans_decode, ans_encode, channel_entropy, empirical_entropy, pack_indices,
                                     unpack_indices)
from qtllava.compress.fsq import clip_width, quantize_indices, robust_normalize

log = logging.getLogger("bench.codec")

SHAPES = {"paper": (728, 1280), "tiny": (64, 256)}  # tokens x channels per image
BATCH = 8
LEVELS = (2, 4, 8, 16)
ZSTD_LEVEL = 3  # zstd's default: what a user tries first


# the study's fsq L = 4 rows (maps frozen, the default; any seed), then any finished tiny run
DEFAULT_CHECKPOINTS = ("runs/study/fsq-L4-ans-clr0/seed*/stage2/final", "runs/baseline/stage2/final",
                       "runs/try-tiny/stage2/final")


def default_checkpoint() -> str:
    """The newest (by its DONE marker) of the folders that DEFAULT_CHECKPOINTS (glob patterns) name, or "" when
    none is finished."""
    found = [p for pat in DEFAULT_CHECKPOINTS for p in Path().glob(pat) if (p / "DONE").exists()]
    return str(max(found, key=lambda p: (p / "DONE").stat().st_mtime)) if found else ""


def checkpoint_features(path: str | Path, data_root: str | Path | None = None,
                        batch: int = BATCH) -> tuple[dict[str, torch.Tensor], dict]:
    """`features_from_checkpoint` and a plain description of the source (codecs, normalisation, samples)."""
    from qtllava.eval.levels_cli import checkpoint_rows, encoder_outputs

    cr = checkpoint_rows(path, data_root, batches=1, batch_size=batch)
    return encoder_outputs(cr), cr.source()


def features_from_checkpoint(path: str | Path, data_root: str | Path | None = None,
                             batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Pre-quantization rows of a trained checkpoint, {modality: (N, d_code) encoder outputs}: one batch of `batch`
    samples of the instruction validation split through its client part (tower, connector, embedding table; the
    extraction `qtllava levels` uses, `qtllava.eval.levels_cli`), then each modality's fsq encoder Linear (the
    trained one for an fsq checkpoint; the identity, i.e. the rows themselves, otherwise), before robust
    normalisation, so that every L can be re-quantized here."""
    return checkpoint_features(path, data_root, batch)[0]


def gaussian_rows(n_rows: int, dim: int, seed: int, channels: bool) -> torch.Tensor:
    """Standard normal rows; with `channels`, each channel gets its own mean and scale (as real features do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, dim, generator=g)
    if channels:
        x = x * (0.5 + torch.rand(dim, generator=g)) + torch.randn(dim, generator=g) * 0.7
    return x


def best_time(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def packet_bits(shape, payload: bytes, side: bytes, levels: int, coder: str) -> float:
    return len(Packet("fsq", tuple(shape), payload, side, levels, coder).to_bytes()) * 8 / math.prod(shape)


def bench_codes(idx: np.ndarray, levels: int, repeats: int, per_image: int) -> list[dict]:
    n = idx.size
    h = empirical_entropy(idx, levels)
    h_ch = channel_entropy(idx, levels)
    out = []
    packed = pack_indices(idx, levels)
    assert np.array_equal(unpack_indices(packed, levels, n).reshape(idx.shape), idx)
    payload, side = ans_encode(idx, levels)
    assert np.array_equal(ans_decode(payload, side, levels, idx.shape), idx)
    zc, zd = zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor()
    zbytes = zc.compress(packed)
    coders = {
        "pack": (lambda: pack_indices(idx, levels), lambda: unpack_indices(packed, levels, n), packed, b""),
        "ans": (lambda: ans_encode(idx, levels), lambda: ans_decode(payload, side, levels, idx.shape), payload, side),
        "zstd-pack": (lambda: zc.compress(pack_indices(idx, levels)),
                      lambda: unpack_indices(zd.decompress(zbytes), levels, n), zbytes, b""),
    }
    for name, (enc, dec, pl, sd) in coders.items():
        row = {"coder": name, "levels": levels, "numel": n, "entropy_bits": h, "entropy_channel_bits": h_ch,
               "bits_per_element": (len(pl) + len(sd)) * 8 / n, "payload_bytes": len(pl), "side_bytes": len(sd),
               "packet_bits_per_element": packet_bits(idx.shape, pl, sd, levels, name) if name != "zstd-pack" else
               None}
        if name == "ans":
            row["ans_mode"] = ("raw", "const", "pooled", "grouped", "rows")[side[0]]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            te, td = best_time(enc, repeats), best_time(dec, repeats)
            sfx = "" if threads == 1 else "_2threads"
            row[f"encode_melem_s{sfx}"] = n / te / 1e6
            row[f"decode_melem_s{sfx}"] = n / td / 1e6
            if threads == 1:
                row["encode_ms"], row["decode_ms"] = te * 1e3, td * 1e3
                row["per_image_encode_decode_ms"] = (te + td) * 1e3 * per_image / n
        out.append(row)
    # two streams in two threads: does the ANS coder scale? (constriction holds the GIL)
    halves = np.array_split(idx, 2)
    coded = [ans_encode(hh, levels) for hh in halves]
    with ThreadPoolExecutor(2) as ex:
        te = best_time(lambda: list(ex.map(lambda a: ans_encode(a, levels), halves)), repeats)
        td = best_time(lambda: list(ex.map(lambda c: ans_decode(c[0][0], c[0][1], levels, c[1].shape),
                                           zip(coded, halves))), repeats)
    out[1]["ans_2streams_encode_melem_s"] = n / te / 1e6
    out[1]["ans_2streams_decode_melem_s"] = n / td / 1e6
    return out


def crossover_mbit_s(pack: dict, ans: dict) -> float | None:
    """Link speed (Mbit/s) above which pack (faster, larger) beats ans end to end; None if ans is never slower."""
    dt = (ans["encode_ms"] + ans["decode_ms"] - pack["encode_ms"] - pack["decode_ms"]) / 1e3
    dbytes = pack["payload_bytes"] + pack["side_bytes"] - ans["payload_bytes"] - ans["side_bytes"]
    if dbytes <= 0:
        return 0.0  # ans is not smaller: pack wins at any speed
    if dt <= 0:
        return None  # ans is smaller and not slower: it wins at any speed
    return dbytes * 8 / dt / 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="auto",
                    help="trained tiny checkpoint folder for the 'trained-tiny' source; auto (default): the newest "
                         f"of {', '.join(DEFAULT_CHECKPOINTS)} that exists; none: skip")
    ap.add_argument("--data", default="", help="data root of the checkpoint (default: its configuration's)")
    ap.add_argument("--out", default="results/codec.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default="paper,tiny")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    levels = [int(v) for v in args.levels.split(",")]

    sources: dict[str, dict[str, torch.Tensor]] = {}
    for shape_name in args.shapes.split(","):
        tokens, dim = SHAPES[shape_name]
        rows = BATCH * tokens
        sources[f"{shape_name}/gaussian"] = {"image": gaussian_rows(rows, dim, args.seed, channels=False)}
        sources[f"{shape_name}/gaussian-channels"] = {"image": gaussian_rows(rows, dim, args.seed + 1, channels=True)}
    ckpt = default_checkpoint() if args.checkpoint == "auto" else args.checkpoint
    trained_source = None
    if not ckpt or ckpt == "none":
        log.info("source 'trained-tiny' skipped: no checkpoint (none of %s exists)", ", ".join(DEFAULT_CHECKPOINTS))
    elif not Path(ckpt).exists():
        log.info("source 'trained-tiny' skipped: %s does not exist", ckpt)
    else:
        feats, trained_source = checkpoint_features(ckpt, args.data or None)
        tokens = trained_source["image_tokens_per_image"]
        # the tiny shape when the checkpoint is a tiny-preset one; the paper shape needs the paper's model
        # (728 x 1280 rows cannot come from a 64 x 256 model), so trained features exist at the tiny shape only
        name = "tiny" if (tokens, trained_source["dim"]) == SHAPES["tiny"] else "checkpoint"
        src = "trained-tiny" if name == "tiny" else "trained"
        trained_source.update(shape_name=name, source=src)
        for mod, z in feats.items():
            if z.shape[0]:
                sources[f"{name}/{src}"] = {**sources.get(f"{name}/{src}", {}), mod: z}
        log.info("source %r: %s (%s)", src, ckpt, ", ".join(f"{m} {tuple(z.shape)}" for m, z in feats.items()))

    results, crossovers = [], []
    for key, feats in sources.items():
        shape_name, source = key.split("/")
        for mod, z in feats.items():
            if mod == "image":
                tokens = SHAPES.get(shape_name, (z.shape[0] // BATCH, z.shape[1]))[0]
                shape = f"{tokens}x{z.shape[1]}x{BATCH}"
            else:  # text rows of the batch's BATCH samples: no per-image shape; "per image" = per sample
                tokens = z.shape[0] / BATCH
                shape = f"{z.shape[0]}x{z.shape[1]}"
            per_image = tokens * z.shape[1]
            for lv in levels:
                # the checkpoint's own normalisation for its features; the fsq defaults (per row, the Gaussian-optimal
                # width for L) otherwise
                norm = (trained_source or {}).get("modalities", {}).get(mod) if source.startswith("trained") else None
                width, over = (norm["norm_width"], norm["norm_over"]) if norm else (0.0, "sample")
                width = clip_width(width, lv)
                qt = {}
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    qt[threads] = best_time(lambda: quantize_indices(robust_normalize(z, width, over), lv),
                                            args.repeats)
                idx = quantize_indices(robust_normalize(z, width, over), lv)[1].numpy()
                rows = bench_codes(idx, lv, args.repeats, per_image)
                for r in rows:
                    r.update(shape=shape, shape_name=shape_name, source=source, modality=mod,
                             quantize_melem_s=idx.size / qt[1] / 1e6, quantize_melem_s_2threads=idx.size / qt[2] / 1e6)
                results += rows
                by = {r["coder"]: r for r in rows}
                crossovers.append({"shape": rows[0]["shape"], "source": source, "modality": mod, "levels": lv,
                                   "pack_beats_ans_above_mbit_s": crossover_mbit_s(by["pack"], by["ans"])})
    torch.set_num_threads(1)

    meta = {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "zstd_level": ZSTD_LEVEL, "batch": BATCH,
            "repeats": args.repeats, "timing": "best of repeats, one process; the machine may be shared",
            "bits_per_element": "(payload + side information) * 8 / codes; packet_bits_per_element adds the header",
            "trained_source": trained_source,
            "trained_source_note": "features of a trained tiny checkpoint (one batch of 8 instruction-validation "
                                   "samples through its client part), at the tiny shape only: the paper shape "
                                   "(728 x 1280) would need the paper's tower and LLM; text rows are all non-pad "
                                   "text rows of the same 8 samples (shape rows x D)"}
    out = {"meta": meta, "rows": results, "crossover": crossovers}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print_table(results, crossovers)
    log.info("wrote %s", args.out)
    return out


def print_table(rows: list[dict], crossovers: list[dict]) -> None:
    hdr = (f"{'shape':>13} {'source':>17} {'L':>3} {'coder':>9} {'bits/el':>8} {'H':>7} {'over H':>7} {'H|ch':>7} "
           f"{'enc M/s':>8} {'dec M/s':>8} {'enc2t':>7} {'dec2t':>7} {'ms/img':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        over = f"{100 * (r['bits_per_element'] / r['entropy_bits'] - 1):+.2f}%" if r["entropy_bits"] else "-"
        src = r["source"] if r.get("modality", "image") == "image" else f"{r['source']}:{r['modality'][:4]}"
        print(f"{r['shape']:>13} {src:>17} {r['levels']:>3} {r['coder']:>9} {r['bits_per_element']:8.4f} "
              f"{r['entropy_bits']:7.4f} {over:>7} {r['entropy_channel_bits']:7.4f} "
              f"{r['encode_melem_s']:8.1f} {r['decode_melem_s']:8.1f} "
              f"{r['encode_melem_s_2threads']:7.1f} {r['decode_melem_s_2threads']:7.1f} "
              f"{r['per_image_encode_decode_ms']:7.2f}")
    print()
    for c in crossovers:
        v = c["pack_beats_ans_above_mbit_s"]
        txt = "never (ans is smaller and not slower)" if v is None else f"{v:,.0f} Mbit/s"
        src = c["source"] if c.get("modality", "image") == "image" else f"{c['source']}:{c['modality'][:4]}"
        print(f"{c['shape']:>13} {src:>17} L={c['levels']:<3} pack beats ans above {txt}")


if __name__ == "__main__":
    main()
