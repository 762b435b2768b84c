"""JSONL reading with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl", "JsonlError"]


class JsonlError(ValueError):
    """A JSONL file has a bad line; the message reads `<path>:<line>: <what is wrong>`."""


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def read_jsonl(path: str | Path, required: Iterable[str] = (), str_keys: Iterable[str] = (),
               unique_key: str | None = None) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; blank lines are skipped.

    required: keys every line must have; str_keys: keys whose values must be strings; unique_key: a key whose
    values must be a non-empty string or an integer and unique in the file. Any violation raises JsonlError
    naming the file and the 1-based line number.
    """
    p = Path(path)
    required = tuple(required)
    str_keys = tuple(str_keys)
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        fh = p.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such file") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(f"{p}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, Mapping):
                raise JsonlError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise JsonlError(f"{p}:{lineno}: missing key(s) {', '.join(repr(k) for k in missing)}")
            for k in str_keys:
                if k in rec and not isinstance(rec[k], str):
                    raise JsonlError(f"{p}:{lineno}: {k!r} must be a string, got {rec[k]!r}")
            if unique_key is not None and unique_key in rec:
                key = rec[unique_key]
                if not _valid_id(key):
                    raise JsonlError(f"{p}:{lineno}: {unique_key!r} must be a non-empty string or an integer, "
                                     f"got {key!r}")
                if str(key) in seen:
                    raise JsonlError(f"{p}:{lineno}: duplicate {unique_key} {key!r} (first on line "
                                     f"{seen[str(key)]})")
                seen[str(key)] = lineno
            out.append(dict(rec))
    return out
