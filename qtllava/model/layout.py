"""Which positions of a batch hold padding, text or image rows: the only structure the server needs besides rows.

The client sends image rows and non-pad text rows as two packets; the server puts them back where the layout says.
On the wire a layout costs 2 bits per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Layout", "PAD", "TEXT", "IMAGE"]

PAD, TEXT, IMAGE = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    """kinds: (B, T) uint8, one of PAD (0), TEXT (1), IMAGE (2) per position."""

    kinds: torch.Tensor

    def __post_init__(self) -> None:
        if self.kinds.dim() != 2 or self.kinds.dtype != torch.uint8:
            raise ValueError(f"layout kinds must be a (B, T) uint8 tensor, got {tuple(self.kinds.shape)} "
                             f"{self.kinds.dtype}")

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_token_id: int) -> "Layout":
        """input_ids, attention_mask: (B, T); positions with mask 0 are PAD, `image_token_id` positions IMAGE."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        kinds = torch.where(input_ids == image_token_id, IMAGE, TEXT)
        kinds = torch.where(attention_mask.bool(), kinds, PAD)
        return cls(kinds.to(torch.uint8))

    # --- shape and masks ----------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.kinds.shape[0]), int(self.kinds.shape[1]))

    @property
    def image_mask(self) -> torch.Tensor:
        return self.kinds == IMAGE

    @property
    def text_mask(self) -> torch.Tensor:
        return self.kinds == TEXT

    @property
    def n_image(self) -> int:
        """Number of image rows (positions of kind IMAGE)."""
        return int(self.image_mask.sum())

    @property
    def n_text(self) -> int:
        """Number of non-pad text rows."""
        return int(self.text_mask.sum())

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, T) int64, 1 at every non-pad position."""
        return (self.kinds != PAD).long()

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, T) int64: index among the row's non-pad positions (so left padding starts at 0); 0 at pads."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def left_padded(self) -> bool:
        """True when every row ends with a non-pad position (what generation needs)."""
        return bool((self.kinds[:, -1] != PAD).all()) if self.kinds.shape[1] else True

    def append_text(self, k: int = 1) -> "Layout":
        """A layout with `k` more text columns (each generation step adds one)."""
        extra = torch.full((self.kinds.shape[0], k), TEXT, dtype=torch.uint8, device=self.kinds.device)
        return Layout(torch.cat([self.kinds, extra], dim=1))

    def to(self, device: torch.device | str) -> "Layout":
        return self if self.kinds.device == torch.device(device) else Layout(self.kinds.to(device))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.kinds.shape == other.kinds.shape and bool(
            (self.kinds.cpu() == other.kinds.cpu()).all())

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside

    # --- wire form ------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Row-major kinds packed 2 bits each, 4 per byte, first position in the lowest bits; ceil(B*T/4) bytes."""
        flat = self.kinds.detach().reshape(-1).cpu().to(torch.int32)
        pad = (-flat.numel()) % 4
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        q = flat.reshape(-1, 4)
        packed = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
        return packed.to(torch.uint8).numpy().tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, shape: tuple[int, int]) -> "Layout":
        """Inverse of `to_bytes`; raises ValueError on a wrong length, an invalid kind or non-zero padding bits."""
        b, t = (int(s) for s in shape)
        if b < 0 or t < 0:
            raise ValueError(f"layout shape {shape} is negative")
        n = b * t
        if len(data) != (n + 3) // 4:
            raise ValueError(f"layout of shape {(b, t)} needs {(n + 3) // 4} bytes, got {len(data)}")
        if n == 0:
            return cls(torch.zeros((b, t), dtype=torch.uint8))
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)
        q = torch.stack([(raw >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)
        if bool((q[n:] != 0).any()):
            raise ValueError("layout bytes have non-zero padding bits")
        q = q[:n]
        if bool((q > IMAGE).any()):
            raise ValueError("layout bytes hold an invalid position kind (3)")
        return cls(q.to(torch.uint8).reshape(b, t))
