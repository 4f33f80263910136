"""OpenDialKG (Moon et al., ACL 2019) from its official ``data/`` folder, unchanged.

Files: ``opendialkg.csv`` (columns ``Messages,User Rating,Assistant Rating``), ``opendialkg_entities.txt``,
``opendialkg_relations.txt``, ``opendialkg_triples.txt``.

Conversion rules:

- ``Messages`` is parsed as JSON; ``chat`` actions become turns (``user`` → seeker, ``assistant`` → recommender,
  consecutive messages of one speaker merged); annotator chatter (``meta_thread/send_meta_message``) is skipped.
- Items: a speaker's ``kgwalk/choose_path`` action names the entities it reached (the object of each triple of the
  path). Its next chat message mentions the reached entities whose name occurs in the text (case-insensitive); when
  none does, the walk's final entity, the one the speaker chose to talk about. The first entity of a recommender's walk
  (where it started) is credited to the seeker's turn before it when that turn names it. Entities absent from
  ``opendialkg_entities.txt`` are dropped and counted as unknown items.
- ``rating`` is the user's ``dialog_rating`` (1..5) from ``User Rating``; NaN when the cell is ``{}``.
- There is no split column. The split is a hash of the dialogue's ``Messages`` text: ``crc32 % 10 == 0`` → test,
  ``== 1`` → valid, otherwise train (about 80/10/10). It does not depend on row order or on the subset held.
- ``dialogue_id`` is ``odkg-<row>`` (1-based CSV record number, header excluded).
- The catalogue (``catalogue``): ``recommended`` (the default) is the convention of the published OpenDialKG results
  (UniCRS, iEvaLM): the entities that recommender turns mention, in any split, a few thousand; the other entities
  leave the turns' items (the text still names them). ``entities`` is the whole entity list (100,812 names). An
  entity's ``popularity`` is its degree in the triples file.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import zlib
from collections import Counter
from pathlib import Path

from crslight.data.errors import DataError, LoadReport, parse_json, read_text
from crslight.schema import RECOMMENDER, SEEKER, turn

FILES = ["opendialkg.csv", "opendialkg_entities.txt", "opendialkg_relations.txt", "opendialkg_triples.txt"]
ROLES = {"user": SEEKER, "assistant": RECOMMENDER}
META = "meta_thread/send_meta_message"
WALK = "kgwalk/choose_path"
#: ``recommended``: entities that recommender turns mention (the published convention); ``entities``: all of them.
CATALOGUES = ("recommended", "entities")


def read_catalogue(root: Path) -> list[dict]:
    degree: Counter[str] = Counter()
    for line in read_text(root / "opendialkg_triples.txt").split("\n"):
        if line:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                degree[parts[0]] += 1
                degree[parts[2]] += 1
    path = root / "opendialkg_entities.txt"
    names = list(dict.fromkeys(n.strip() for n in read_text(path).split("\n") if n.strip()))
    if not names:
        raise DataError(path, "no entities: expected one entity name per line")
    return [{"item_id": n, "name": n, "popularity": float(degree[n]), "attributes": ""} for n in names]


def _rating(cell: str, path: Path, row: int, field: str) -> float:
    value = parse_json(cell, path, row, field) if cell.strip() else {}
    if not isinstance(value, dict):
        raise DataError(path, f"expected a JSON object such as {{\"dialog_rating\": \"4\"}}, got {cell!r:.60}", row, field)
    if "dialog_rating" not in value:
        return math.nan
    try:
        rating = float(value["dialog_rating"])
    except (TypeError, ValueError):
        rating = math.nan
    if not 1 <= rating <= 5:  # NaN fails too
        raise DataError(path, f"expected a rating from 1 to 5, got {value['dialog_rating']!r}", row,
                        f"{field}.dialog_rating")
    return rating


def convert_row(row: list[str], path: Path, row_no: int, entities: set[str], report: LoadReport) -> dict:
    """One official CSV record → the canonical schema (see the module docstring for the rules)."""
    if len(row) != 3:
        raise DataError(path, f"expected 3 columns (Messages, User Rating, Assistant Rating), got {len(row)}", row_no)
    actions = parse_json(row[0], path, row_no, "Messages")
    if not isinstance(actions, list):
        raise DataError(path, f"expected a JSON list of actions, got {type(actions).__name__}", row_no, "Messages")
    rating = _rating(row[1], path, row_no, "User Rating")
    _rating(row[2], path, row_no, "Assistant Rating")

    def known(entity) -> bool:
        ok = isinstance(entity, str) and entity in entities
        report.unknown_items += not ok
        return ok

    turns: list[dict] = []
    walk: tuple[str, list[str]] | None = None  # (sender, entities reached) waiting for the sender's next chat
    for a_no, action in enumerate(actions):
        field = f"Messages[{a_no}]"
        if not isinstance(action, dict):
            raise DataError(path, "expected an action object", row_no, field)
        sender = action.get("sender")
        if sender not in ROLES:
            raise DataError(path, f"expected sender 'user' or 'assistant', got {sender!r}", row_no, f"{field}.sender")
        kind, action_id = action.get("type"), action.get("action_id")
        if kind == "action" and action_id == WALK:
            try:
                triples = action["metadata"]["path"][1]
                reached = [t[2] for t in triples]
                start = triples[0][0] if triples else None
            except (KeyError, IndexError, TypeError):
                raise DataError(path, "expected metadata.path = [score, [[s, r, o], ...], text]", row_no, field) from None
            walk = (sender, reached)
            if ROLES[sender] == RECOMMENDER and start and turns and turns[-1]["role"] == SEEKER:
                if start.lower() in turns[-1]["text"].lower() and known(start):
                    turns[-1]["items"] = list(dict.fromkeys(turns[-1]["items"] + [start]))
            continue
        if kind == "action":  # annotator chatter and other actions carry no dialogue turn
            continue
        if kind != "chat":
            raise DataError(path, f"expected type 'chat' or 'action', got {kind!r}", row_no, f"{field}.type")
        text = action.get("message")
        if not isinstance(text, str):
            raise DataError(path, f"expected a string, got {type(text).__name__}", row_no, f"{field}.message")
        items: list[str] = []
        if walk is not None and walk[0] == sender:
            lowered = text.lower()
            named = [e for e in walk[1] if isinstance(e, str) and e.lower() in lowered]
            items = [e for e in (named or walk[1][-1:]) if known(e)]
            walk = None
        role = ROLES[sender]
        text = " ".join(text.split())
        if turns and turns[-1]["role"] == role:
            turns[-1]["text"] = f"{turns[-1]['text']} {text}".strip()
            turns[-1]["items"] = list(dict.fromkeys(turns[-1]["items"] + items))
        else:
            turns.append(turn(role, text, items))
    return {"dialogue_id": f"odkg-{row_no}", "turns": turns, "labels": [], "rating": rating, "persona": ""}


def split_of(messages_cell: str) -> str:
    """The split of a dialogue from its ``Messages`` cell: the CRC-32 of the cell's UTF-8 bytes modulo 10 is 0 for
    ``test``, 1 for ``valid``, anything else for ``train`` (10 / 10 / 80 %). OpenDialKG ships no split; this one is the
    same on every machine and in every process (unlike ``hash``) and keeps a dialogue where it is when rows move."""
    bucket = zlib.crc32(messages_cell.encode()) % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def load_splits(root: Path, report: LoadReport, skip_bad_rows: bool,
                catalogue_of: str = "recommended") -> tuple[dict[str, list[dict]], list[dict]]:
    """The three splits and the catalogue; ``catalogue_of`` is one of :data:`CATALOGUES` (``load_corpus`` checks)."""
    catalogue = read_catalogue(root)
    entities = {row["item_id"] for row in catalogue}
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    path = root / "opendialkg.csv"
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["Messages", "User Rating", "Assistant Rating"]:
            raise DataError(path, f"expected the header 'Messages,User Rating,Assistant Rating', got {header!r}", field="header")
        for row_no, row in enumerate(reader, start=1):
            try:
                dialogue = convert_row(row, path, row_no, entities, report)
            except DataError as e:
                if not skip_bad_rows:
                    raise
                report.skip(e)
                continue
            splits[split_of(row[0])].append(dialogue)
    if not any(splits.values()):
        raise DataError(path, "no dialogues: expected one record per row after the header")
    if catalogue_of == "recommended":
        splits, catalogue = recommended_only(splits, catalogue)
        if not catalogue:
            raise DataError(path, "no item is recommended: no recommender turn names an entity of "
                            "opendialkg_entities.txt through a kgwalk/choose_path action, so the published catalogue "
                            "is empty (--catalogue entities ranks every entity instead)")
    return splits, catalogue


def recommended_only(splits: dict[str, list[dict]], catalogue: list[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """The catalogue cut to the entities that recommender turns mention (any split), in entity-list order; every
    turn keeps only those items."""
    keep = {i for dialogues in splits.values() for d in dialogues for t in d["turns"] if t["role"] == RECOMMENDER
            for i in t["items"]}
    for dialogues in splits.values():
        for d in dialogues:
            for t in d["turns"]:
                t["items"] = [i for i in t["items"] if i in keep]
    return splits, [row for row in catalogue if row["item_id"] in keep]
