"""Warm starts of fresh learned codecs at the start of a stage: the server's decoder fitted by least squares on the
rows the client will send, through the codec's `fit` hook (a codec without a learned decoder fits nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qtllava.model.parts import CONFIG_NAME, WEIGHTS_NAME, ClientPart, ServerPart

__all__ = ["fit_image_decoder", "fit_text_decoder", "connector_rows"]


def fit_image_decoder(client: ClientPart, server: ServerPart, batches, max_rows: int = 16384) -> float | None:
    """Warm start of a fresh learned image codec behind a trained connector (`compress.first_stage` = 2): the
    server's decoder fitted by least squares on the connector's rows of the stage's first batches (`batches`: step
    -> micro-batches, as `stage_batches` returns): the first `max_rows` rows, or every image of the first 64 steps.

    At one bit a frozen identity decoder hands the LLM rows whose elements all sit at the row's mean +- its std,
    20-40 % of their variance lost; a linear map fitted on the same codes loses 0.7-4 % (docs/experiments.md,
    "Does an image decoder refitted by least squares during training help one bit?"). Refitted every few steps
    under a connector that trains from scratch, such a map gave the LLM no stable input; fitted once, on a
    connector that already speaks the LLM's language, it does not move (measured on the tiny study: it leaves
    0.6-1 % of the rows' squared norm, and glyph reading is no better for it; docs/experiments.md, "Does starting
    the codecs at stage 2, behind a fitted image decoder, close the one-bit glyph gap?"). The rows are the client's
    own data and are used in-process only. Returns the relative squared error of the fit, or None when the image
    codec has no learned decoder."""
    if not server.image_codec.fits:
        return None
    rows, n = [], 0
    for step in range(64):
        got = connector_rows(client, batches(step))
        if got is not None:
            rows.append(got)
            n += got.shape[0]
        if n >= max_rows:
            break
    if not rows:
        raise ValueError("fit_image_decoder: the stage's first 64 batches hold no image to fit the decoder on")
    return server.image_codec.fit(client.image_codec, torch.cat(rows)[:max_rows])


@torch.no_grad()
def connector_rows(client: ClientPart, micro_batches: list[dict]) -> torch.Tensor | None:
    """The connector's output rows (n, D), float32, for the images of one step's micro-batches (None: no image)."""
    w = next(client.connector.parameters())
    feats = [client.image_features(b["pixel_values"].to(device=w.device, dtype=w.dtype)) for b in micro_batches
             if b.get("pixel_values") is not None and b["pixel_values"].numel()]
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).float() if feats else None


def fit_text_decoder(client: ClientPart, server: ServerPart, folder: Path, max_rows: int = 16384) -> float | None:
    """Warm start of a fresh learned text codec: the server's decoder fitted by least squares on the token rows.

    The normalisation removes each row's scale, so a fresh decoder hands the LLM standardised rows (std ~1 per
    element), while the base LLM was trained on the embedding table's own scale (tiny preset: std 0.024, ~40x smaller).
    Left so, the text rows swamp the residual stream of the frozen stage-1 LLM and stage 2 has to undo it (measured: L
    = 2 text codes lost the yes/no existence questions; docs/experiments.md). What the text codec encodes at the start
    of a stage is exactly the rows of the pretrained embedding table (a public part of the pretrained weights, read
    from `folder`), so the server process fits its decoder from that file alone, with nothing private crossing, and
    gets what a single process gets. Only `fsq` has a learned decoder; other codecs keep the scale themselves. Returns
    the relative squared error of the fit, or None when nothing was fitted.
    """
    if not server.text_codec.fits:
        return None
    meta = json.loads((folder / CONFIG_NAME).read_text()) if (folder / CONFIG_NAME).is_file() else {}
    if "embed_tokens" in meta.get("base_weights", {}) and "embed_tokens" in client.base_weights:
        # kept by reference to the pretrained folder, from which every process built this same table
        table = client.embed_tokens.weight.detach()
    else:
        path = folder / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a fresh fsq text codec is fitted on the pretrained token-embedding "
                                    "table, which this file should hold (the client half of the stage's init "
                                    "checkpoint)")
        with safe_open(str(path), framework="pt") as f:
            if "embed_tokens.weight" not in f.keys():
                raise ValueError(f"{path}: no embed_tokens.weight to fit the text decoder on")
            table = f.get_tensor("embed_tokens.weight")
    rows = table[:: max(1, -(-table.shape[0] // max_rows))]  # a strided subset of very large vocabularies
    device = next(server.text_codec.parameters()).device
    return server.text_codec.fit(client.text_codec, rows.to(device=device, dtype=torch.float32))
