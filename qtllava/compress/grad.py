"""Downlink: the gradients the server returns to the client, compressed by a fixed (not learned) codec.

Codecs, by exact name: `fp32`, `fp16`, `bf16` (cast), `int8`, `int4` (per-row absmax scaling: each row of the last
axis gets one fp32 scale, values are rounded to the symmetric grid -Q..Q, Q = 127 or 7, deterministic or
stochastic); `int8-ans`, `int6-ans`, `int5-ans`, `int4-ans`, `int2-ans` (ternary) use the same kind of grid
(Q = 2^(bits-1) - 1) but entropy-code the symbols with
constriction's ANS (model in the packet), since gradients are peaked around 0. fp32 scales rather than fp16: gradients can be far below fp16's smallest normal (6e-5) and would
flush to zero; 32 bits per row is 0.025 bits per element at D = 1280.

Packet: codec "grad", dtype = the codec name, shape = the gradient's shape; payload = the values (int4: two per
byte, low nibble first, stored as q + 8); side = the per-row scales (int codecs only).

Error bounds per element (row absmax s): deterministic rounding |g - g_hat| <= s / (2Q); stochastic rounding
|g - g_hat| < s / Q and E[g_hat] = g.

Rows with equal values (`merge_rows` / `spread_rows`, config `compress.merge_text_rows`): where rows with equal values
come from equal inputs (the same token's embedding through the text codec), they have equal Jacobians, so the
gradient any client parameter receives depends only on the sum of their gradients (inputs that differ but whose
codes collide would share one sum: an approximation only there). The server sends one summed row per distinct value;
the client, which holds bit-equal values, finds the same groups (in the lexicographic order of the rows) and hands
each of a group's rows an equal share of its sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from qtllava.compress.base import WIRE_FLOAT_DTYPES, Packet, PacketError, bytes_to_float, float_to_bytes

__all__ = ["GradCodec", "register_grad_codec", "grad_codec_names", "encode_grad", "decode_grad", "GRAD_CODEC",
           "row_groups", "merge_rows", "spread_rows"]

GRAD_CODEC = "grad"


@dataclass(frozen=True)
class GradCodec:
    name: str
    encode: Callable[[torch.Tensor, bool, "torch.Generator | None"], tuple[bytes, bytes]]
    decode: Callable[[bytes, bytes, tuple[int, ...]], torch.Tensor]


_GRAD_CODECS: dict[str, GradCodec] = {}


def register_grad_codec(name: str, encode: Callable, decode: Callable) -> GradCodec:
    """Register a downlink codec under an exact name; raises ValueError on a duplicate name."""
    if name in _GRAD_CODECS:
        raise ValueError(f"gradient codec {name!r} is already registered")
    spec = GradCodec(name, encode, decode)
    _GRAD_CODECS[name] = spec
    return spec


def grad_codec_names() -> list[str]:
    return sorted(_GRAD_CODECS)


def _spec(name: str) -> GradCodec:
    if name not in _GRAD_CODECS:
        raise KeyError(f"unknown gradient codec {name!r}; known: {', '.join(sorted(_GRAD_CODECS))}")
    return _GRAD_CODECS[name]


def encode_grad(g: torch.Tensor, name: str, stochastic: bool = False,
                generator: torch.Generator | None = None) -> Packet:
    """Gradient g (..., D) -> Packet with codec "grad" and dtype `name`. `stochastic` applies to int codecs only;
    `generator` (on g's device) makes stochastic rounding reproducible."""
    spec = _spec(name)
    if g.dim() < 1:
        raise ValueError("encode_grad needs a tensor with at least one axis")
    payload, side = spec.encode(g.detach(), stochastic, generator)
    return Packet(codec=GRAD_CODEC, shape=tuple(int(s) for s in g.shape), payload=payload, side=side, dtype=name,
                  coder="raw")


def decode_grad(packet: Packet) -> torch.Tensor:
    """Packet from `encode_grad` -> float32 gradient of packet.shape. Raises PacketError on a malformed packet."""
    if packet.codec != GRAD_CODEC:
        raise PacketError(f"packet codec {packet.codec!r} is not a gradient packet ({GRAD_CODEC!r})")
    if packet.dtype not in _GRAD_CODECS:
        raise PacketError(f"unknown gradient codec {packet.dtype!r}; known: {', '.join(sorted(_GRAD_CODECS))}")
    if len(packet.shape) < 1:
        raise PacketError("gradient packet has no axes")
    return _GRAD_CODECS[packet.dtype].decode(packet.payload, packet.side, packet.shape)


def row_groups(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `values` (N, d) grouped by equal content -> (group of each row (N,), rows per group (G,)); groups in
    the lexicographic order of their rows, so that two parties holding bit-equal values agree on them."""
    v = values.detach().reshape(values.shape[0], -1)
    if v.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=v.device)
        return empty, empty
    _, inverse, counts = torch.unique(v, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def merge_rows(g: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Gradient g (N, d) of rows `values` (N, d') -> (G, d): the sum over each group of equal rows (`row_groups`)."""
    if g.shape[0] != values.shape[0]:
        raise ValueError(f"merge_rows: {g.shape[0]} gradient rows for {values.shape[0]} value rows")
    inverse, counts = row_groups(values)
    return g.new_zeros((counts.shape[0],) + tuple(g.shape[1:])).index_add_(0, inverse.to(g.device), g)


def spread_rows(sums: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Inverse of `merge_rows` on the client: (G, d) group sums -> (N, d), each row an equal share of its group's
    sum. Raises PacketError when `values` do not form G groups (the two parties' values differ)."""
    inverse, counts = row_groups(values)
    if sums.shape[0] != counts.shape[0]:
        raise PacketError(f"merged gradient has {sums.shape[0]} rows, but these {values.shape[0]} rows hold "
                          f"{counts.shape[0]} distinct values")
    inverse, counts = inverse.to(sums.device), counts.to(sums.device)
    return sums[inverse] / counts[inverse].to(sums.dtype).unsqueeze(-1)


# --- float casts ---------------------------------------------------------------------------------------------


def _float_codec(dtype: str) -> tuple[Callable, Callable]:
    def enc(g: torch.Tensor, stochastic: bool, generator) -> tuple[bytes, bytes]:
        return float_to_bytes(g, dtype), b""

    def dec(payload: bytes, side: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        if side:
            raise PacketError(f"{dtype} gradient packet carries {len(side)} bytes of side information (expected 0)")
        return bytes_to_float(payload, dtype, shape)

    return enc, dec


for _name in WIRE_FLOAT_DTYPES:
    register_grad_codec(_name, *_float_codec(_name))


# --- integers with per-row absmax ---------------------------------------------------------------------------


def _int_codec(bits: int) -> tuple[Callable, Callable]:
    qmax = (1 << (bits - 1)) - 1  # 127 or 7: a symmetric grid, 0 exact

    def enc(g: torch.Tensor, stochastic: bool, generator) -> tuple[bytes, bytes]:
        rows = g.reshape(-1, g.shape[-1]).to(torch.float32) if g.shape[-1] else g.reshape(0, 0).float()
        scale = rows.abs().amax(dim=1) if rows.numel() else torch.zeros(rows.shape[0], device=g.device)
        y = rows * (qmax / torch.where(scale > 0, scale, 1.0))[:, None]
        if stochastic:
            u = torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            q = torch.floor(y + u)
        else:
            q = torch.round(y)
        q = q.clamp(-qmax, qmax).to(torch.int8).reshape(-1).cpu().numpy()
        side = scale.cpu().numpy().astype("<f4").tobytes()
        if bits == 8:
            return q.tobytes(), side
        nib = (q + 8).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(8))
        return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes(), side

    def dec(payload: bytes, side: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        n_rows = math.prod(shape[:-1]) if shape[-1] else 0
        if len(side) != 4 * n_rows:
            raise PacketError(f"int{bits} gradient: {len(side)} bytes of scales, shape {shape} needs {4 * n_rows}")
        need = n if bits == 8 else (n + 1) // 2
        if len(payload) != need:
            raise PacketError(f"int{bits} gradient: payload has {len(payload)} bytes, shape {shape} needs {need}")
        raw = np.frombuffer(payload, dtype=np.uint8)
        if bits == 8:
            q = raw.view(np.int8).astype(np.float32)
        else:
            nib = np.empty(2 * raw.size, dtype=np.uint8)
            nib[0::2], nib[1::2] = raw & 0x0F, raw >> 4
            q = nib[:n].astype(np.float32) - 8.0
        if n and np.abs(q).max() > qmax:
            raise PacketError(f"int{bits} gradient payload holds a value outside -{qmax}..{qmax}")
        scale = torch.from_numpy(np.frombuffer(side, dtype="<f4").astype(np.float32))
        out = torch.from_numpy(q).reshape(n_rows, -1) * (scale / qmax)[:, None] if n else torch.zeros(0)
        return out.reshape(shape)

    return enc, dec


register_grad_codec("int8", *_int_codec(8))
register_grad_codec("int4", *_int_codec(4))


# --- integers, entropy-coded -------------------------------------------------------------------------------------


def _int_ans_codec(bits: int) -> tuple[Callable, Callable]:
    """Same grid as `_int_codec` (int2 = ternary -1, 0, 1), but the symbols are ANS-coded with the model in the
    packet: gradients are peaked around 0, so they cost far fewer bits than the fixed width. side = fp32 scales
    per row, then the entropy model."""
    from qtllava.compress.coding import CodingError, ans_decode, ans_encode

    qmax = (1 << (bits - 1)) - 1
    levels = 2 * qmax + 1

    def enc(g: torch.Tensor, stochastic: bool, generator) -> tuple[bytes, bytes]:
        rows = g.reshape(-1, g.shape[-1]).to(torch.float32) if g.shape[-1] else g.reshape(0, 0).float()
        scale = rows.abs().amax(dim=1) if rows.numel() else torch.zeros(rows.shape[0], device=g.device)
        y = rows * (qmax / torch.where(scale > 0, scale, 1.0))[:, None]
        if stochastic:
            q = torch.floor(y + torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype))
        else:
            q = torch.round(y)
        idx = (q.clamp(-qmax, qmax) + qmax).to(torch.uint8).cpu().numpy()
        payload, model = ans_encode(idx, levels)
        return payload, scale.cpu().numpy().astype("<f4").tobytes() + model

    def dec(payload: bytes, side: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        n_rows = math.prod(shape[:-1]) if shape[-1] else 0
        if len(side) < 4 * n_rows:
            raise PacketError(f"int{bits}-ans gradient: {len(side)} bytes of side information, the scales alone "
                              f"need {4 * n_rows}")
        scale = torch.from_numpy(np.frombuffer(side[:4 * n_rows], dtype="<f4").astype(np.float32))
        try:
            idx = ans_decode(payload, side[4 * n_rows:], levels, (n_rows, shape[-1]) if n else (0,))
        except CodingError as e:
            raise PacketError(f"int{bits}-ans gradient: {e}") from e
        q = torch.from_numpy(idx.astype(np.float32)) - qmax
        out = q.reshape(n_rows, -1) * (scale / qmax)[:, None] if n else torch.zeros(0)
        return out.reshape(shape)

    return enc, dec


for _bits in (8, 6, 5, 4, 2):
    register_grad_codec(f"int{_bits}-ans", *_int_ans_codec(_bits))
