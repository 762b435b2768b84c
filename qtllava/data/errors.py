"""The one exception the data package raises for bad input files and records."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file or one of its records is unusable; the message names the file (and record index and id).

    Attributes: ``path`` (the file), ``index`` (record index or None), ``record_id`` (or None), ``reason`` (a short
    key such as "missing_image", "corrupt_image", "schema", "placeholder_mismatch", "empty_answer", "too_long",
    "invalid_json").
    """

    def __init__(self, path: object, reason: str, detail: str, index: int | None = None,
                 record_id: object = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        self.index = index
        self.record_id = record_id
        where = self.path
        if index is not None:
            where += f": record {index} (id={record_id!r})"
        super().__init__(f"{where}: {reason}: {detail}")
