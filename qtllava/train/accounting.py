"""What crossed the cut in a run: per direction and per part (modality, labels, layout, envelope), from the
per-step rows of `metrics.jsonl` (serialized message sizes, the same under loopback and gRPC)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["summarize_link", "format_link_table", "read_metrics", "MetricsLog", "truncate_metrics"]

log = logging.getLogger(__name__)

# (direction, part, key in the step row's payload dict, elements key for bits per element)
_PARTS = (
    ("up", "image rows", "image", "image"),
    ("up", "text rows", "text", "text"),
    ("up", "labels", "labels", None),
    ("up", "layout", "layout", None),
    ("up", "hidden grad (U)", "hidden_grad", None),
    ("down", "image grad", "image", "image"),
    ("down", "text grad", "text", "text"),
    ("down", "hidden (U)", "hidden", None),
)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_link(rows: list[dict]) -> dict:
    """Totals over step rows: {"steps", "messages_up", "messages_down", "bytes_up", "bytes_down",
    "parts": [{"direction", "part", "bytes", "bytes_per_step", "bits_per_element"}]}. Envelope = message bytes
    minus the fields listed (protobuf tags, lengths, ids, packet headers are inside the fields)."""
    steps = len(rows)
    out = {"steps": steps, "bytes_up": sum(r["bytes_up"] for r in rows),
           "bytes_down": sum(r["bytes_down"] for r in rows),
           "messages_up": sum(len(r.get("messages_up", [])) for r in rows),
           "messages_down": sum(len(r.get("messages_down", [])) for r in rows), "parts": []}
    elements = {k: sum(r["elements_up"].get(k, 0) for r in rows) for k in ("image", "text")}
    listed = {"up": 0, "down": 0}
    for direction, part, key, el in _PARTS:
        field = "payload_up" if direction == "up" else "payload_down"
        n = sum(r[field].get(key, 0) for r in rows)
        if n == 0 and key in ("hidden_grad", "hidden"):
            continue
        listed[direction] += n
        out["parts"].append({"direction": direction, "part": part, "bytes": n,
                             "bytes_per_step": n / max(1, steps),
                             "bits_per_element": 8 * n / elements[el] if el and elements[el] else None})
    rows_bytes = {"up": 0, "down": 0}
    for direction in ("up", "down"):
        n = out[f"bytes_{direction}"] - listed[direction]
        out["parts"].append({"direction": direction, "part": "envelope", "bytes": n,
                             "bytes_per_step": n / max(1, steps), "bits_per_element": None})
        field = "payload_up" if direction == "up" else "payload_down"
        rows_bytes[direction] = sum(r[field].get(k, 0) for r in rows for k in ("image", "text"))
    # the 16-bit reference for the same rows: 2 bytes per element of the image and text rows each way (the features
    # up, their gradients down), with the same labels, layout and envelope as this run
    for direction in ("up", "down"):
        out[f"fp16_bytes_{direction}"] = out[f"bytes_{direction}"] - rows_bytes[direction] + 2 * sum(elements.values())
    return out


def format_link_table(summary: dict, title: str = "") -> str:
    """Plain-text table of `summarize_link`'s result, with a total line per direction."""
    lines = [title] if title else []
    lines.append(f"{'dir':<5} {'part':<16} {'bytes':>12} {'B/step':>11} {'bits/elem':>9}")
    for direction in ("up", "down"):
        for p in summary["parts"]:
            if p["direction"] != direction:
                continue
            bpe = f"{p['bits_per_element']:.3f}" if p["bits_per_element"] is not None else "-"
            lines.append(f"{direction:<5} {p['part']:<16} {p['bytes']:>12} {p['bytes_per_step']:>11.0f} {bpe:>9}")
        total = summary[f"bytes_{direction}"]
        msgs = summary[f"messages_{direction}"]
        lines.append(f"{direction:<5} {'= messages':<16} {total:>12} {total / max(1, summary['steps']):>11.0f} "
                     f"{'':>9}  ({msgs} messages, {summary['steps']} steps)")
    ours = summary["bytes_up"] + summary["bytes_down"]
    ref = summary.get("fp16_bytes_up", 0) + summary.get("fp16_bytes_down", 0)
    if ref:
        for direction in ("up", "down"):
            r = summary[f"fp16_bytes_{direction}"]
            lines.append(f"{direction:<5} {'fp16 would send':<16} {r:>12} {r / max(1, summary['steps']):>11.0f} "
                         f"{'':>9}  (this run: {100 * summary[f'bytes_{direction}'] / max(1, r):.1f} %)")
        lines.append(f"both  {'this run / fp16':<16} {ours:>12} {'':>11} {'':>9}  ({100 * ours / ref:.1f} % of "
                     f"{ref} bytes)")
    return "\n".join(lines)


class MetricsLog:
    """metrics.jsonl of a stage: one row per optimizer step; rows after a rollback point can be dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None:
            truncate_metrics(path, resume_step)
        elif path.exists():
            path.unlink()
        self.file = path.open("a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def truncate(self, step: int) -> None:
        self.file.close()
        truncate_metrics(self.path, step)
        self.file = self.path.open("a")

    def close(self) -> None:
        self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows at or after `step` (written after the checkpoint we resume from), and a last row that a
    killed process left half-written (no newline). Raises ValueError naming the file and line on any other bad row."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.split("\n")
    if lines[-1]:  # a torn write: the process died inside this row, after the checkpoint it resumes from
        log.warning("%s: dropping a half-written last row (%d characters)", path, len(lines[-1]))
    rows = []
    for i, line in enumerate(lines[:-1], 1):
        if not line:
            continue
        try:
            row_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {i}: not a metrics row ({e})") from e
        if row_step < step:
            rows.append(line)
    path.write_text("".join(r + "\n" for r in rows))
