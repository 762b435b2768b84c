"""Batched greedy generation through the codecs, client and server in one process.

This is the reference that split generation over the network mirrors: every call below is either the client's or
the server's, and only packets (plus the layout) pass between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from qtllava.model.parts import ClientPart, ServerPart

__all__ = ["greedy_generate"]


@torch.no_grad()
def greedy_generate(client: ClientPart, server: ServerPart, batch: Mapping[str, torch.Tensor | None],
                    max_new_tokens: int, eos_token_id: int | Iterable[int] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt; -> one list of new token ids per row (eos excluded).

    batch: `input_ids` (B, T) LEFT-padded, optional `attention_mask` (B, T) and `pixel_values` (n, 3, H, W).
    A row stops at its first eos; the batch stops when every row has, or after `max_new_tokens` tokens.
    """
    if eos_token_id is None:
        eos: set[int] = set()
    elif isinstance(eos_token_id, int):
        eos = {eos_token_id}
    else:
        eos = {int(e) for e in eos_token_id}
    # client: prompt -> packets
    sent = client(batch["input_ids"], batch.get("attention_mask"), batch.get("pixel_values"))
    layout = sent.layout
    # server: packets -> values -> prefill
    image_values, text_values = server.dequantize(sent.image.packet, sent.text.packet)
    logits, cache = server.prefill(image_values, text_values, layout)
    b = layout.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)
        for i, tok in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if tok in eos:
                done[i] = True
            else:
                out[i].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        # client: new token ids -> one text packet (finished rows keep feeding their argmax; it is discarded)
        new = client.embed_text_rows(next_ids)
        layout = layout.append_text()
        # server: packet -> values -> one more step on the cache
        logits, cache = server.extend(server.text_codec.dequantize(new.packet), cache, layout)
    return out
