"""`qtllava levels`: choose the number of levels L on a real checkpoint's features (docs/codecs.md).

The level analysis itself (`qtllava.compress.levels`) works on rows of numbers; this module feeds it the rows a
checkpoint's client really quantizes. It sits above model, data and compress (compress never imports the model).

1. `checkpoint_rows`: batches of the instruction **validation** split (never a benchmark suite) go through the
   checkpoint's client part (vision tower -> connector -> splice into the token embeddings); the image rows and the
   non-pad text rows, exactly what `ClientPart.forward` hands to each modality's codec, are kept per batch.
2. Pre-quantisation values per modality: for an `fsq` checkpoint, the trained encoder's `Linear` applied to those
   rows, then its robust normalisation (its own width and statistics); for any other checkpoint (identity 16-bit,
   nf, topk: no learned client map), the rows themselves through a fresh fsq encoder, whose `Linear` starts as the
   identity (d_code = D), with the fsq defaults of the checkpoint's codec configuration.
3. For each L: the empirical entropy of the indices per modality (pooled, and given the channel), the bits per
   element of `pack` and `ans` on all rows of a modality as one array (`analyze_levels`), and the bits per element
   really sent: one fsq packet per batch and modality, as the client sends one per step, made by an `FsqEncoder`
   carrying the checkpoint's encoder weights, measured with `nbytes` (header + payload + side information) and as
   payload only. The recommendation is `analyze_levels`'s (the largest L whose entropy-coded rate fits the budget,
   or the most accurate one within it when accuracies per L are given), with the measured numbers in its reasoning.

For an fsq checkpoint trained at one L, the other L re-quantise the trained encoder's outputs: their rates are
real, their accuracy is not measured here (that needs a run trained at each L; see benchmarks/study.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import zstandard

from qtllava.data.templates import template_name
from qtllava.compress.base import nbytes
from qtllava.compress.coding import channel_entropy
from qtllava.compress.fsq import FsqEncoder
from qtllava.compress.levels import recommend_levels as recommend  # the library's rule, on the packets sent
from qtllava.compress.levels import analyze_levels, indices_for_levels, write_levels_report
from qtllava.config import Config, CodecConfig
from qtllava.data import LlavaDataset, collate, image_token_id, load_tokenizer
from qtllava.model.layout import Layout
from qtllava.model.parts import ClientPart

__all__ = ["CheckpointRows", "checkpoint_rows", "encoder_outputs", "features_from_checkpoint", "sent_bits",
           "levels_for_checkpoint", "format_levels_table", "MODALITIES", "VAL_SPLIT",
           "DEFAULT_CLI_LEVELS"]

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
VAL_SPLIT = "instruct_val.json"  # the instruction corpus's validation split: tuning only, never a benchmark
DEFAULT_CLI_LEVELS = (2, 3, 4, 6, 8, 16)
ZSTD_LEVEL = 3


@dataclass
class CheckpointRows:
    """Pre-codec rows of a checkpoint on some validation batches, and how its codecs would quantize them."""

    checkpoint: str
    rows: dict[str, torch.Tensor]  # modality -> (N, D) rows in batch order (what ClientPart.forward encodes)
    batch_sizes: dict[str, list[int]]  # modality -> rows per batch (one packet per batch and modality)
    encoders: dict[str, torch.nn.Linear | None]  # modality -> trained fsq Linear, None = identity (fresh codec)
    codecs: dict[str, CodecConfig]  # modality -> the checkpoint's codec configuration
    samples: list[str] = field(default_factory=list)  # record ids used, in order
    data_root: str = ""
    split: str = VAL_SPLIT
    batch_size: int = 0
    dim: int = 0
    image_tokens: int = 0

    @property
    def n_batches(self) -> int:
        return len(self.batch_sizes["image"])

    def norm(self, modality: str) -> tuple[float, str]:
        """(width, over) of the robust normalisation the modality's fsq encoder uses."""
        c = self.codecs[modality]
        return float(c.norm_width), str(c.norm_over)

    def d_code(self, modality: str) -> int:
        enc = self.encoders[modality]
        return self.dim if enc is None else int(enc.out_features)

    def source(self) -> dict:
        """Plain description of where the rows come from (for the JSON report)."""
        out = {"checkpoint": self.checkpoint, "data_root": self.data_root, "split": self.split,
               "batches": self.n_batches, "batch_size": self.batch_size, "samples": len(self.samples),
               "dim": self.dim, "image_tokens_per_image": self.image_tokens, "modalities": {}}
        for mod in self.rows:
            c = self.codecs[mod]
            trained = c.name == "fsq"
            out["modalities"][mod] = {
                "rows": int(self.rows[mod].shape[0]), "d_code": self.d_code(mod),
                "checkpoint_codec": c.name, "checkpoint_levels": int(c.levels) if trained else None,
                "checkpoint_coder": c.coder if trained else None,
                "norm_width": float(c.norm_width), "norm_over": c.norm_over,
                "pre_quantization": ("the trained fsq encoder's Linear, then its robust normalisation" if trained else
                                     f"the raw rows ({c.name} checkpoint) through a fresh, identity-initialised fsq "
                                     "encoder"),
            }
        return out


@torch.no_grad()
def checkpoint_rows(checkpoint: str | Path, data_root: str | Path | None = None, batches: int = 8,
                    batch_size: int | None = None, cfg: Config | None = None, split: str = VAL_SPLIT,
                    part: ClientPart | None = None) -> CheckpointRows:
    """Push `batches` batches of the validation split through the checkpoint's client part; keep the rows.

    checkpoint: a folder with `client/` (a stage's `final/` or a training checkpoint). data_root: the generated
    data root (default: `cfg.data.root`, with `cfg` defaulting to the configuration saved in the client part).
    Samples are taken in file order (the first batches * batch_size records of the split). batch_size defaults to
    the stage-2 batch size of the configuration. Only the split named by `split` is read.
    """
    checkpoint = Path(checkpoint)
    if part is None:
        if not (checkpoint / "client").is_dir():
            raise FileNotFoundError(f"{checkpoint}: no client/ folder (expected a checkpoint with client/ and "
                                    "server/, e.g. runs/<run>/stage2/final)")
        part = ClientPart.from_pretrained(checkpoint / "client")
    part.eval()
    pcfg = part.cfg
    cfg = cfg or pcfg
    root = Path(data_root or cfg.data.root)
    path = root / split
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the level analysis reads the instruction validation split of a "
                                f"generated data root (make one with `qtllava data make --data {root}`)")
    if Path(split).name.startswith("suites") or "suites" in Path(split).parts:
        raise ValueError("the level analysis never reads the benchmark suites; use the validation split")
    tok = load_tokenizer(cfg.data.tokenizer or root / "tokenizer")
    if image_token_id(tok) != part.image_token_id:
        raise ValueError(f"{checkpoint}: image token id {part.image_token_id} differs from the tokenizer's "
                         f"({image_token_id(tok)}) in {root}; wrong data root?")
    ds = LlavaDataset.for_config(pcfg, path, root / "images", tok, template_name(pcfg), skip_bad=True)
    bs = int(batch_size or cfg.train.stage2.batch_size)
    if batches < 1 or bs < 1:
        raise ValueError(f"need at least one batch of at least one sample (batches={batches}, batch_size={bs})")
    n = min(len(ds), batches * bs)
    if n == 0:
        raise ValueError(f"{path}: no usable samples")
    if n < batches * bs:
        log.warning("%s holds %d usable samples: %d batches of %d asked, using %d batches", path, len(ds), batches,
                    bs, math.ceil(n / bs))
    rows: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
    sizes: dict[str, list[int]] = {m: [] for m in MODALITIES}
    ids: list[str] = []
    for start in range(0, n, bs):
        batch = collate([ds[i] for i in range(start, min(n, start + bs))], pad_id=tok.pad_token_id)
        layout = Layout.from_batch(batch["input_ids"], batch["attention_mask"], part.image_token_id)
        pixels = batch["pixel_values"] if batch["pixel_values"].shape[0] else None
        embeds = part.embed(batch["input_ids"], pixels)
        for mod, mask in (("image", layout.image_mask), ("text", layout.text_mask)):
            r = embeds[mask].float()
            rows[mod].append(r)
            sizes[mod].append(int(r.shape[0]))
        ids += [str(i) for i in batch["ids"]]
    codecs = {"image": pcfg.compress.image, "text": pcfg.compress.text}
    client_codecs = {"image": part.image_codec, "text": part.text_codec}
    encoders = {m: client_codecs[m].pre_map() for m in MODALITIES}
    return CheckpointRows(checkpoint=str(checkpoint), rows={m: torch.cat(v) for m, v in rows.items()},
                          batch_sizes=sizes, encoders=encoders, codecs=codecs, samples=ids, data_root=str(root),
                          split=split, batch_size=bs, dim=part.hidden_size,
                          image_tokens=part.vision_tower.num_tokens)


@torch.no_grad()
def encoder_outputs(cr: CheckpointRows) -> dict[str, torch.Tensor]:
    """{modality: (N, d_code)}: the fsq encoder's Linear applied to the rows (trained, or the identity), before the
    robust normalisation, i.e. what `benchmarks/codec.py` re-quantizes at every L."""
    return {m: (x if cr.encoders[m] is None else cr.encoders[m](x)).float() for m, x in cr.rows.items()}


def features_from_checkpoint(checkpoint: str | Path, data_root: str | Path | None = None, batches: int = 1,
                             batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Pre-quantisation rows of a checkpoint ({modality: (N, d_code) encoder outputs}) on validation batches."""
    return encoder_outputs(checkpoint_rows(checkpoint, data_root, batches=batches, batch_size=batch_size))


def _fsq_encoder(cr: CheckpointRows, modality: str, levels: int, coder: str) -> FsqEncoder:
    width, over = cr.norm(modality)
    enc = FsqEncoder(cr.dim, cr.d_code(modality), levels, coder=coder, over=over, width=width,
                     send_stats=cr.codecs[modality].send_stats)
    if cr.encoders[modality] is not None:  # the trained map; a fresh FsqEncoder starts as the identity
        enc.proj.load_state_dict(cr.encoders[modality].state_dict())
    return enc.eval()


@torch.no_grad()
def sent_bits(cr: CheckpointRows, modality: str, levels: int, coder: str) -> dict:
    """Bits per element really sent: one fsq packet per batch (an `FsqEncoder` with the checkpoint's encoder
    weights), summed over the batches. -> {"packet_bits" (nbytes: header + payload + side), "bits" (payload +
    side), "payload_bits", "packets", "numel"}; with coder="pack" also "zstd_bits": zstd (level 3, what a user
    tries first) applied to each packet's pack bytes, for comparison (it is no coder of the wire format)."""
    enc = _fsq_encoder(cr, modality, levels, coder)
    zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    total = payload = side = numel = zbytes = 0
    for x in torch.split(cr.rows[modality], cr.batch_sizes[modality]):
        p = enc(x).packet
        total += nbytes(p)
        payload += len(p.payload)
        side += len(p.side)
        numel += p.numel
        if coder == "pack":
            zbytes += len(zc.compress(p.payload))
    n = max(numel, 1)
    out = {"packet_bits": total * 8 / n, "bits": (payload + side) * 8 / n, "payload_bits": payload * 8 / n,
           "packets": len(cr.batch_sizes[modality]), "numel": numel}
    if coder == "pack":
        out["zstd_bits"] = zbytes * 8 / n
    return out


def levels_for_checkpoint(checkpoint: str | Path | None = None, data_root: str | Path | None = None,
                          levels: Sequence[int] = DEFAULT_CLI_LEVELS, batches: int = 8, batch_size: int | None = None,
                          budget_bits: float = 2.0, accuracy: Mapping[int, float] | None = None,
                          out: str | Path | None = None, cfg: Config | None = None,
                          rows: CheckpointRows | None = None) -> dict:
    """The whole `qtllava levels` analysis; writes `out/levels.json` and `out/levels.png` when `out` is given.

    Returns `analyze_levels`'s result (per modality and overall rows per L, "recommended", "reasoning") where each
    row also has: "entropy_channel_bits", "ans_payload_bits", "distortion", and the per-batch packets really sent
    ("pack_sent_bits", "pack_sent_packet_bits", "ans_sent_bits", "ans_sent_payload_bits", "ans_sent_packet_bits");
    plus "source" (checkpoint, data, codecs) and "settings".
    """
    t0 = time.perf_counter()
    levels = sorted({int(v) for v in levels})
    for lv in levels:
        if not 2 <= lv <= 256:
            raise ValueError(f"levels must lie in 2..256, got {lv}")
    cr = rows or checkpoint_rows(checkpoint, data_root, batches=batches, batch_size=batch_size, cfg=cfg)
    indices: dict[str, dict[int, np.ndarray]] = {}
    extra: dict[tuple[str, int], dict] = {}
    for mod, x in cr.rows.items():
        if x.shape[0] == 0:
            log.warning("no %s rows in %d batches: modality left out", mod, cr.n_batches)
            continue
        width, over = cr.norm(mod)
        indices[mod] = {}
        for lv in levels:
            idx, dist = indices_for_levels(x, lv, cr.encoders[mod], width, over)
            indices[mod][lv] = idx
            pk, an = sent_bits(cr, mod, lv, "pack"), sent_bits(cr, mod, lv, "ans")
            extra[(mod, lv)] = {"distortion": dist, "entropy_channel_bits": channel_entropy(idx, lv),
                                "pack_sent_bits": pk["bits"], "pack_sent_packet_bits": pk["packet_bits"],
                                "ans_sent_bits": an["bits"], "ans_sent_payload_bits": an["payload_bits"],
                                "ans_sent_packet_bits": an["packet_bits"], "zstd_pack_sent_bits": pk["zstd_bits"],
                                "rows": int(idx.shape[0]),
                                "distinct_rows": int(np.unique(idx, axis=0).shape[0]) if idx.size else 0,
                                "packets": an["packets"]}
    if not indices:
        raise ValueError(f"{cr.checkpoint}: no rows to analyse")
    res = analyze_levels(indices=indices, levels=levels, budget_bits=budget_bits, accuracy=accuracy)
    for mod, rws in res["modalities"].items():
        for r in rws:
            r["ans_payload_bits"] = r["ans_bits"] - r["ans_side_bytes"] * 8 / max(r["numel"], 1)
            r.update(extra[(mod, r["levels"])])
    keys = ("distortion", "entropy_channel_bits", "ans_payload_bits", "pack_sent_bits", "pack_sent_packet_bits",
            "ans_sent_bits", "ans_sent_payload_bits", "ans_sent_packet_bits", "zstd_pack_sent_bits")
    for o in res["overall"]:
        rws = [r for rs in res["modalities"].values() for r in rs if r["levels"] == o["levels"]]
        n = max(sum(r["numel"] for r in rws), 1)
        for k in keys:
            o[k] = sum(r[k] * r["numel"] for r in rws) / n
    # The rate is the bits really sent. The recommendation is made on the per-batch packets (payload + side
    # information, as `analyze_levels` counts them); its choice on all rows as one array is kept beside it.
    res["recommended_one_array"], res["reasoning_one_array"] = res["recommended"], res["reasoning"]
    sent = [{**o, "ans_bits": o["ans_sent_bits"], "pack_bits": o["pack_sent_bits"]} for o in res["overall"]]
    res["recommended"], res["reasoning"] = recommend(sent, budget_bits)
    res["reasoning"] = _reasoning(res, cr)
    res["source"] = cr.source()
    res["settings"] = {"levels": levels, "batches": cr.n_batches, "batch_size": cr.batch_size,
                       "budget_bits": budget_bits, "accuracy": dict(accuracy) if accuracy else None,
                       "seconds": round(time.perf_counter() - t0, 2), "torch_threads": torch.get_num_threads()}
    if out is not None:
        out = Path(out)
        # the plot shows the rates of the packets really sent (what the recommendation uses); the JSON keeps both
        shown = {**res, "modalities": {m: [{**r, "ans_bits": r["ans_sent_bits"], "pack_bits": r["pack_sent_bits"]}
                                           for r in rs] for m, rs in res["modalities"].items()}}
        write_levels_report(shown, out / "levels.json", out / "levels.png")
        (out / "levels.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _reasoning(res: dict, cr: CheckpointRows) -> str:
    rec = res["recommended"]
    text = [f"Rates are those of the packets really sent: one fsq packet per batch and modality ({cr.n_batches} "
            f"batches of {cr.batch_size} validation samples), payload + side information (the ans model) per "
            "element.", res["reasoning"]]
    o = next((r for r in res["overall"] if r["levels"] == rec), None)
    if o is not None:
        text.append(f"With the packet headers ans sends {o['ans_sent_packet_bits']:.3f} bits/element at L={rec} "
                    f"({o['ans_sent_payload_bits']:.3f} payload only) and pack {o['pack_sent_packet_bits']:.3f}; "
                    f"coding all rows as one array, ans would send {o['ans_bits']:.3f}.")
        if o["zstd_pack_sent_bits"] < o["ans_sent_bits"]:
            distinct = ", ".join(f"{m} {r['distinct_rows']} of {r['rows']}"
                                 for m, rs in res["modalities"].items() for r in rs if r["levels"] == rec)
            text.append(f"Caveat: zstd on the pack bytes sends {o['zstd_pack_sent_bits']:.3f} bits/element at "
                        f"L={rec}, less than ans: the code rows repeat (distinct code rows: {distinct}), which a "
                        "code of independent symbols cannot exploit; H bounds only such codes, and a code over "
                        "rows (or a context model) would send less on these features.")
        if o["ans_sent_bits"] < o["entropy_bits"]:
            text.append("ans sends less than the pooled entropy H, which bounds only codes of independent symbols: "
                        "it codes groups of channels with their own models and, where code rows repeat, each "
                        "distinct row once plus a row stream, with context models on a similar earlier row "
                        "(qtllava/compress/coding.py, mode 4).")
        per = ", ".join(f"{m} H = {r['entropy_bits']:.3f} (given the channel {r['entropy_channel_bits']:.3f}), "
                        f"ans {r['ans_bits']:.3f}"
                        for m, rs in res["modalities"].items() for r in rs if r["levels"] == rec)
        text.append(f"Per modality at L={rec}: {per}.")
    trained = {m: c.levels for m, c in cr.codecs.items() if c.name == "fsq" and m in res["modalities"]}
    if trained:
        lv = ", ".join(f"{m} L={v}" for m, v in trained.items())
        text.append(f"This fsq checkpoint was trained at {lv}; other L re-quantize its trained encoder's outputs, "
                    "so their rates are real but their accuracy needs a run trained at that L.")
        nested = sorted({m for t in set(trained.values()) for m in res["levels"] if m != t and (m - 1) % (t - 1) == 0})
        if nested:
            text.append(f"L = {', '.join(map(str, nested))} contain the trained levels (L - 1 a multiple of the "
                        "trained L - 1), so the trained encoder's outputs, which cluster on its own levels, keep "
                        "their codes there: their entropy can lie below that of a smaller L that splits them.")
    else:
        text.append("The checkpoint has no fsq encoder: the raw rows were quantized by a fresh (identity) fsq "
                    "encoder, i.e. before any training with the quantizer (training with the distortion loss may "
                    "spread the codes and raise H).")
    return " ".join(text)


def format_levels_table(res: dict) -> str:
    """Compact plain-text table: per modality and overall, bits per element per L, then the recommendation."""
    hdr = (f"{'modality':<8} {'L':>3} {'log2L':>6} {'H':>6} {'H|ch':>6} {'pack':>6} {'ans':>6} {'ans pl':>6} "
           f"{'ans sent':>8} {'pack sent':>9} {'zstd':>6} {'1-cos':>7}")
    lines = [hdr, "-" * len(hdr)]
    groups = list(res["modalities"].items()) + [("all", res["overall"])]
    for mod, rows in groups:
        for r in rows:
            lines.append(f"{mod:<8} {r['levels']:>3} {math.log2(r['levels']):6.3f} {r['entropy_bits']:6.3f} "
                         f"{r['entropy_channel_bits']:6.3f} {r['pack_bits']:6.3f} {r['ans_bits']:6.3f} "
                         f"{r['ans_payload_bits']:6.3f} {r['ans_sent_packet_bits']:8.3f} "
                         f"{r['pack_sent_packet_bits']:9.3f} {r['zstd_pack_sent_bits']:6.3f} {r['distortion']:7.4f}")
    src = res.get("source", {})
    lines.append("")
    lines.append("bits per element; H = empirical entropy of the indices (pooled), H|ch = given the channel; pack/ans "
                 "= payload + side information on all rows as one array; ans pl = ans payload only; sent = one "
                 f"packet per batch with its header ({src.get('batches', '?')} batches of "
                 f"{src.get('batch_size', '?')} validation samples); zstd = zstd -3 on each packet's pack bytes (for "
                 "comparison; not a wire coder); 1-cos = quantization distortion.")
    lines.append(f"recommended L = {res['recommended']} (budget {res['budget_bits']:g} bits/element): "
                 f"{res['reasoning']}")
    return "\n".join(lines)
