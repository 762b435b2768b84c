"""Checkpoint folders, written the one way both sides write them and read back only when intact.

A checkpoint is written under a temporary name, given `MANIFEST.json` (the sha256 of every file in it) and a `DONE`
marker, then renamed into place, so a crash never leaves a half checkpoint that looks finished. On resume the newest
checkpoint whose files still match their manifest is taken; a damaged one (a truncated safetensors file, a file gone)
is skipped with a warning that names the file, and the one before it is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from qtllava.model.weights import file_sha256

__all__ = ["MANIFEST", "DONE", "write_atomic", "damage", "newest_intact"]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
DONE = "DONE"


def write_atomic(final: Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(folder)` on a fresh temporary folder beside `final`, record its files' checksums, mark it done
    and rename it to `final` (replacing an older one). -> `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    fill(tmp)
    files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1) + "\n")
    (tmp / DONE).write_text("")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def damage(folder: Path) -> str | None:
    """None when `folder` is a finished checkpoint whose files match its manifest, else what is wrong (naming the
    file). Checkpoints written before manifests existed count as intact when they are marked done."""
    folder = Path(folder)
    if not (folder / DONE).exists():
        return f"{folder}: not finished (no {DONE})"
    if not (folder / MANIFEST).exists():
        return None
    try:
        files = json.loads((folder / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{folder / MANIFEST}: unreadable ({e})"
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p}: missing"
        if file_sha256(p) != digest:
            return f"{p}: damaged (its checksum differs from {MANIFEST})"
    return None


def newest_intact(candidates: Iterable[Path], key: Callable[[Path], object]) -> Path | None:
    """The candidate with the largest `key` that is intact; damaged ones are skipped with a warning."""
    for folder in sorted(candidates, key=key, reverse=True):
        problem = damage(folder)
        if problem is None:
            return folder
        if (folder / DONE).exists():
            log.warning("skipping checkpoint %s: %s; falling back to the one before it", folder, problem)
    return None
