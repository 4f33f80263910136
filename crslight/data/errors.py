"""Errors raised on bad input files, naming the file, the line or row, and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from crslight.errors import DataError

__all__ = ["DataError", "LoadReport", "check_ids", "parse_json", "read_text", "require_files"]


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


def read_text(path: str | Path) -> str:
    """A source file's text, decoded as UTF-8; bytes that are not UTF-8 raise a :class:`DataError` naming the line and
    column, instead of a bare ``UnicodeDecodeError`` from somewhere in the file."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(path, f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {column} ({e.reason}); save the "
                        "file as UTF-8", line=line) from None


def parse_json(text: str, path: str | Path, line: int, field: str | None = None):
    """``json.loads`` whose errors (malformed or nested too deeply) name the file, line and field."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at column {e.colno})", line=line, field=field) from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to be a record of this format", line=line, field=field) from None


def check_ids(path: str | Path, ids: list[tuple[str, int]], field: str, seen: dict[str, tuple[str, int]] | None = None,
              what: str = "dialogue") -> None:
    """Raises a :class:`DataError` at the first ``(id, line)`` of ``ids`` that repeats one before it, in this file or in
    ``seen`` (id → (file, line) of another file; updated): a duplicated dialogue, or one split's dialogue in another
    (``what``: the kind of record, e.g. ``movie`` for a catalogue)."""
    seen = {} if seen is None else seen
    why = " (a test dialogue in the training file leaks the answers)" if what == "dialogue" else ""
    for value, line in ids:
        if value in seen:
            other_path, other_line = seen[value]
            where = "earlier in this file" if other_path == str(path) else f"in {other_path}"
            raise DataError(path, f"{value!r} is already the id of the {what} at line {other_line} {where}: each "
                            f"{what} once{why}", line=line, field=field)
        seen[value] = (str(path), line)


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
