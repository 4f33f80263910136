"""A dataset loader: chat logs kept as two CSV files, read into crslight's canonical schema.

The format (what a team's export might look like)::

    messages.csv   conversation_id,role,text,items      one row per message, in order; role "user" or "agent";
                                                         items: catalogue ids the message names, ";"-separated
    items.csv      item_id,title[,genre]                 the catalogue

Registered under the name ``chat_csv`` in the ``crslight.datasets`` entry-point group (``pyproject.toml``), so
``crslight data stats --dataset chat_csv --root DIR`` and ``load_corpus("chat_csv", DIR)`` read it, and the DataModule
:class:`ChatCSV` trains on it (``data: {class_path: crslight_example.ChatCSV, init_args: {root: DIR}}``).

The protocol a loader follows (crslight's ``docs/plugins.md``): a module or object with ``load_splits(root, report,
skip_bad_rows)`` returning ``({"train": [...], "valid": [...], "test": [...]}, catalogue rows)`` in the schema of
``crslight.schema``, and optionally ``FILES`` (the files under ``root`` the cache key hashes) and ``VERSION``.
"""

from __future__ import annotations

import csv
import math
import zlib
from pathlib import Path

from crslight.data.datamodules import CRSDataModule
from crslight.data.errors import DataError
from crslight.schema import RECOMMENDER, SEEKER, turn

FILES = ("messages.csv", "items.csv")
VERSION = "1"
ROLES = {"user": SEEKER, "agent": RECOMMENDER}


def split_of(conversation_id: str) -> str:
    """A stable split from the conversation id: 10% test, 10% valid, the rest train."""
    bucket = zlib.crc32(conversation_id.encode()) % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def load_splits(root, report, skip_bad_rows: bool = False):
    """``({split: dialogues}, catalogue)`` from ``root``'s two CSV files; a bad row raises a ``DataError`` naming the
    file, line and field (or, with ``skip_bad_rows``, is counted in ``report`` and skipped)."""
    root = Path(root)
    catalogue = []
    with open(root / "items.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            genre = (row.get("genre") or "").strip()
            catalogue.append({"item_id": row["item_id"], "name": row["title"], "popularity": 0.0,
                              "attributes": f"genre={genre}" if genre else ""})
    known = {item["item_id"] for item in catalogue}
    conversations: dict[str, list[dict]] = {}
    with open(root / "messages.csv", newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=1):  # rows, the header excluded
            try:
                role = ROLES.get(row["role"])
                if role is None:
                    raise DataError(root / "messages.csv", f"role must be 'user' or 'agent', got {row['role']!r}",
                                    line=line, field="role")
                items = [i for i in (row.get("items") or "").split(";") if i]
                report.unknown_items += sum(i not in known for i in items)
                conversations.setdefault(row["conversation_id"], []).append(
                    turn(role, row["text"], [i for i in items if i in known]))
            except DataError as error:
                if not skip_bad_rows:
                    raise
                report.skip(error)
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for conversation_id, turns in conversations.items():
        splits[split_of(conversation_id)].append(
            {"dialogue_id": conversation_id, "turns": turns, "labels": [], "rating": math.nan, "persona": ""})
    return splits, catalogue


class ChatCSV(CRSDataModule):
    """The DataModule over a ``chat_csv`` folder (every ``CRSDataModule`` option applies)."""

    source = "chat_csv"
