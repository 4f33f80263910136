"""Errors raised on bad input files, naming the file, the line or row, and the field."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class LoadReport:
    """What a loader skipped or could not resolve (kept beside the loaded data and printed by ``data stats``)."""

    bad_rows: int = 0
    unknown_items: int = 0
    errors: list[str] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.bad_rows += 1
        if len(self.errors) < 20:
            self.errors.append(str(error))


def require_files(root: str | Path, names: list[str], dataset: str) -> Path:
    """Checks that ``root`` holds every file of the official layout; the error lists the files expected."""
    root = Path(root).expanduser()
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DataError(
            root,
            f"not a {dataset} folder: missing {', '.join(missing)}. Expected the official layout: {', '.join(names)}",
        )
    return root
