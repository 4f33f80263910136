"""The error every bad input ends in: :class:`DataError` names the file, the line or row and the field, and the
commands turn it into one message with exit code 2 (``crslight.cli``). It sits below every layer, so data loaders,
model loading and the commands raise and catch the same class (``crslight.data.DataError`` is the same object)."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A source file is missing or malformed.

    Args:
        path: the file (or folder) at fault.
        message: what was expected.
        line: 1-based line (JSONL) or row (CSV, header excluded) number, when known.
        field: the field at fault, when known.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path + (f", line {line}" if line is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")
