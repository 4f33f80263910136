"""A team's own interaction logs, in crslight's documented format (``docs/logs.md``, ``logs.schema.json``).

Layout: ``root`` is a folder or one conversations file.

- Conversations: ``*.jsonl`` (one conversation per line), ``*.parquet`` (one per row, the same fields as columns) or
  ``*.arrow`` (the same rows as Arrow files: what ``datasets``' ``save_to_disk`` writes, so a ``Dataset`` folder, or a
  ``DatasetDict`` folder with its ``train/``, ``validation/``, ``test/`` subfolders, reads as it is) in the folder,
  and/or in its subfolders ``train/``, ``valid/`` (or ``validation/``), ``test/``. Given a file, that file alone.
- Catalogue: ``catalogue.csv`` (header with ``id``, ``title``, optional ``popularity``, any other column an
  attribute), ``catalogue.jsonl`` or ``catalogue.parquet`` (the same fields; an ``attributes`` object is flattened),
  in the folder (beside the file). Popularity, when a row has none: the number of train conversations that mention
  the item.
- Splits: the subfolder a file is in; else the conversation's ``split`` field; else a stable hash of its id,
  ``crc32(conversation_id) % 10``: 0 test, 1 valid, otherwise train (about 80/10/10, independent of file order).
  A ``split`` field that disagrees with the subfolder is an error. ``data stats`` says which rule placed how many.

Each conversation is converted by :func:`crslight.data.logrecord.convert_conversation`. :func:`read_logs` reads
everything in one of three modes: ``raise`` (the first problem is a :class:`DataError`), ``skip`` (a conversation
or catalogue row with problems is skipped and counted) or ``collect`` (every problem kept: ``crslight data
validate``).
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from crslight.data.errors import DataError, LoadReport, check_ids, parse_json, read_text
from crslight.data.logrecord import Problems, convert_conversation

CATALOGUE_NAMES = ("catalogue.csv", "catalogue.jsonl", "catalogue.parquet")
CONVERSATION_SUFFIXES = (".jsonl", ".parquet", ".arrow")
SPLIT_FOLDERS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
HASH_RULE = "hash of conversation_id (crc32 % 10: 0 test, 1 valid, else train)"
RULES = {"folder": "folder per split", "field": "split field", "hash": HASH_RULE}
Mode = Literal["raise", "skip", "collect"]


@dataclass
class LogRead:
    """What :func:`read_logs` found. ``errors``: problems that make the data unusable as it is (``collect`` mode);
    ``warnings``: what loads but deserves a look; ``placed``: how many conversations each split rule placed."""

    splits: dict[str, list[dict]]
    catalogue: list[dict]
    files: list[Path] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)
    warnings: list[DataError] = field(default_factory=list)
    placed: Counter = field(default_factory=Counter)
    records: int = 0

    @property
    def split_rule(self) -> str:
        return " + ".join(f"{RULES[k]} ({n})" for k, n in self.placed.items() if n) or "none"


class _Sink:
    def __init__(self, mode: Mode, report: LoadReport, out: LogRead):
        self.mode, self.report, self.out = mode, report, out

    def reject(self, errors: list[DataError]) -> None:
        """A conversation or catalogue row that cannot be used."""
        if self.mode == "raise":
            raise errors[0]
        if self.mode == "skip":
            self.report.skip(errors[0])
        else:
            self.out.errors.extend(errors)

    def fatal(self, error: DataError) -> None:
        """A file that cannot be read at all."""
        if self.mode != "collect":
            raise error
        self.out.errors.append(error)


def find_files(root: str | Path) -> tuple[Path, list[tuple[Path, str | None]]]:
    """``(catalogue, [(conversations file, its folder's split or None)])``; a :class:`DataError` when there is no
    catalogue or no conversations file."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(root, "no such file or folder: expected a folder of logs or one .jsonl / .parquet / .arrow "
                        "file")
    if root.is_file():
        if root.suffix not in CONVERSATION_SUFFIXES:
            raise DataError(root, "expected a .jsonl, .parquet or .arrow file of conversations, or a folder of them")
        folder, files = root.parent, [(root, None)]
    else:
        folder = root
        files = [(p, None) for p in _conversation_files(root)]
        for name, split in SPLIT_FOLDERS.items():
            if (root / name).is_dir():
                files += [(p, split) for p in _conversation_files(root / name)]
        if not files:
            raise DataError(root, "no conversations: expected *.jsonl, *.parquet or *.arrow files in the folder or in "
                            "its train/, valid/, test/ subfolders")
    catalogues = [folder / n for n in CATALOGUE_NAMES if (folder / n).is_file()]
    if not catalogues:
        raise DataError(folder, f"no catalogue: expected {', '.join(CATALOGUE_NAMES[:-1])} or {CATALOGUE_NAMES[-1]} "
                        "beside the conversations")
    if len(catalogues) > 1:
        raise DataError(folder, f"two catalogues ({', '.join(p.name for p in catalogues)}): keep one")
    return catalogues[0], files


def _conversation_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CONVERSATION_SUFFIXES
                  and p.name not in CATALOGUE_NAMES)


def _records(path: Path):
    """``(line, record)`` per conversation of a file, or ``(line, DataError)`` for a line that is no JSON record
    (``line`` None: the file as a whole). JSONL lines are decoded one by one, so one bad line does not hide the
    others."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    if path.suffix == ".arrow":
        yield from _arrow_rows(path)
        return
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, DataError(path, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                                     f"({e.reason}); save the file as UTF-8", line=line_no)
            continue
        try:
            yield line_no, parse_json(text, path, line_no)
        except DataError as error:
            yield line_no, error


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        yield None, DataError(path, f"not a readable Parquet file ({type(error).__name__}: {error})")


def _arrow_rows(path: Path):
    """Rows of an Arrow file: the streaming format ``datasets`` writes (``save_to_disk``), or the random-access one."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
        yield from enumerate(table.to_pylist(), start=1)
    except Exception as error:  # pyarrow raises several types for a file that is not Arrow
        yield None, DataError(path, f"not a readable Arrow file ({type(error).__name__}: {error})")


def split_by_hash(conversation_id: str) -> str:
    bucket = zlib.crc32(conversation_id.encode()) % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def read_logs(root: str | Path, mode: Mode = "raise", report: LoadReport | None = None) -> LogRead:
    """Reads a logs folder or file into canonical splits and catalogue (see the module docstring)."""
    report = LoadReport() if report is None else report
    catalogue_path, files = find_files(root)
    out = LogRead({"train": [], "valid": [], "test": []}, [], files=[catalogue_path] + [p for p, _ in files])
    sink = _Sink(mode, report, out)
    out.catalogue = read_catalogue(catalogue_path, sink)
    known = {row["item_id"] for row in out.catalogue} if out.catalogue else None
    seen: dict[str, tuple[str, int]] = {}
    for path, folder_split in files:
        found = False
        for line, raw in _records(path):
            found = True
            out.records += 1
            if isinstance(raw, DataError):
                (sink.fatal if line is None else lambda e: sink.reject([e]))(raw)
                continue
            row, errors = convert_conversation(raw, path, line, known)
            if row is not None:
                own = row.pop("split")
                if folder_split is not None and own is not None and own != folder_split:
                    errors = [DataError(path, f"split {own!r} in a file of the {folder_split}/ folder: the folder "
                                        "decides, drop the field or move the conversation", line=line, field="split")]
                else:
                    try:
                        check_ids(path, [(row["dialogue_id"], line)], "conversation_id", seen, what="conversation")
                    except DataError as error:
                        errors = [error]
            if errors:
                sink.reject(errors)
                continue
            rule = "folder" if folder_split else "field" if own else "hash"
            out.placed[rule] += 1
            out.splits[folder_split or own or split_by_hash(row["dialogue_id"])].append(row)
        if not found:
            sink.fatal(DataError(path, "no conversations: expected one JSON object per line"))
    if mode != "collect" and not any(out.splits.values()):
        raise DataError(root, "no conversation could be read" + (f" ({report.bad_rows} skipped)" if report.bad_rows
                                                                 else ""))
    _fill_popularity(out)
    out.warnings = _warnings(Path(root), out)
    return out


def _fill_popularity(out: LogRead) -> None:
    mentions: Counter = Counter()
    for d in out.splits["train"]:
        mentions.update({i for t in d["turns"] for i in t["items"]} | {e["item"] for e in d["events"]})
    for row in out.catalogue:
        if math.isnan(row["popularity"]):
            row["popularity"] = float(mentions[row["item_id"]])


def _warnings(root: Path, out: LogRead) -> list[DataError]:
    warnings = []
    dialogues = [d for split in out.splits.values() for d in split]
    if dialogues and not any(t["time"] == t["time"] for d in dialogues for t in d["turns"]):
        warnings.append(DataError(root, "no turn has a timestamp: timing signals (DwellTimeSignal) are missing (NaN) "
                                  "for every reply"))
    if dialogues and not any(d["events"] or d["rating"] == d["rating"] for d in dialogues):
        warnings.append(DataError(root, "no item events and no ratings: AcceptanceSignal is missing (NaN) for every "
                                  "reply"))
    for split, rows in out.splits.items():
        if dialogues and not rows:
            warnings.append(DataError(root, f"the {split} split is empty (split rule: {out.split_rule})"))
    return warnings


# -- the catalogue ---------------------------------------------------------------------------------------------------
CATALOGUE_FIELDS = ("id", "title", "popularity", "attributes")


def read_catalogue(path: Path, sink: _Sink) -> list[dict]:
    """The catalogue's rows in the canonical form (``popularity`` NaN where the file has none); empty when the file
    cannot be read (``collect`` mode)."""
    rows, seen = [], {}
    for line, record in _catalogue_records(path, sink):
        problem = Problems(path, line)
        row = _catalogue_row(record, problem)
        if row is not None:
            try:
                check_ids(path, [(row["item_id"], line)], "id", seen, what="item")
            except DataError as error:
                problem.errors.append(error)
        if problem.errors:
            sink.reject(problem.errors)
            continue
        rows.append(row)
    if not rows and not sink.out.errors:
        sink.fatal(DataError(path, "no items: expected one item (id, title) per row"))
    return rows


def _catalogue_records(path: Path, sink: _Sink):
    if path.suffix != ".csv":
        for line, record in _records(path):
            if isinstance(record, DataError):
                (sink.fatal if line is None else lambda e: sink.reject([e]))(record)
            else:
                yield line, record
        return
    try:
        text = read_text(path)
    except DataError as error:
        sink.fatal(error)
        return
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    header = [h.strip() for h in next(reader, [])]
    if "id" not in header or "title" not in header:
        sink.fatal(DataError(path, f"expected a header with the columns id and title, got {header!r:.80}", line=1))
        return
    line = reader.line_num
    for values in reader:
        start, line = line + 1, reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            sink.reject([DataError(path, f"expected {len(header)} columns as in the header, got {len(values)}",
                                   line=start)])
            continue
        yield start, {k: v for k, v in zip(header, values, strict=True) if v.strip() or k in ("id", "title")}


def _catalogue_row(record, problem: Problems) -> dict | None:
    if not isinstance(record, dict):
        problem("<record>", f"expected an object {{id, title, ...}}, got {type(record).__name__}")
        return None
    item_id, title = record.get("id"), record.get("title")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
        problem("id", f"expected an item id, got {item_id!r:.60}")
    if not isinstance(title, str) or not title.strip():
        problem("title", f"expected the item's title, got {title!r:.60}")
    popularity = record.get("popularity")
    if popularity is None:
        popularity = math.nan
    else:
        try:
            popularity = float(popularity) if not isinstance(popularity, bool) else math.nan
        except (TypeError, ValueError):
            popularity = math.nan
        if not (math.isfinite(popularity) and popularity >= 0):
            problem("popularity", f"expected a number, 0 or more, got {record.get('popularity')!r:.60}")
    attributes = record.get("attributes") or {}
    if not isinstance(attributes, dict):
        problem("attributes", f"expected an object of attributes, got {attributes!r:.60}")
        attributes = {}
    attributes = {**{k: v for k, v in record.items() if k not in CATALOGUE_FIELDS and v is not None}, **attributes}
    for key, value in attributes.items():
        if isinstance(value, (dict, list)):
            problem(key, f"expected a text or number attribute, got {type(value).__name__}")
    if problem.errors:
        return None
    return {"item_id": str(item_id).strip(), "name": " ".join(title.split()), "popularity": popularity,
            "attributes": "; ".join(f"{k}={v}" for k, v in attributes.items() if str(v).strip())}


def load_splits(root: str | Path, report: LoadReport, skip_bad_rows: bool) -> tuple[dict[str, list[dict]], list[dict],
                                                                                   str]:
    """The three splits, the catalogue, and the split rule that placed the conversations (for ``data stats``)."""
    read = read_logs(root, "skip" if skip_bad_rows else "raise", report)
    return read.splits, read.catalogue, read.split_rule
