"""ReDial (Li et al., NeurIPS 2018) from its official files, unchanged.

Files: ``train_data.jsonl``, ``test_data.jsonl``, ``movies_with_mentions.csv``.

Conversion rules:

- ``@<movieId>`` in a message is replaced by the movie's title (from the dialogue's ``movieMentions``, else the
  catalogue), whitespace normalised; the id is kept in the turn's ``items``. Ids found in neither are left as written,
  dropped from ``items`` and counted as unknown items.
- Roles come from the worker ids: ``senderWorkerId == initiatorWorkerId`` is the seeker, anyone else the recommender.
- Consecutive messages of one speaker are merged into one turn (texts joined by a space, items in order without
  repeats); ``time`` is the first message's ``timeOffset`` and ``end_time`` the last one's.
- Questionnaire labels: the seeker's own answers (``initiatorQuestions``) where given, else the recommender's
  (``respondentQuestions``); an empty list means none.
- Splits: ``test`` is ``test_data.jsonl``. ``valid`` is carved from ``train_data.jsonl`` deterministically: a dialogue
  is in valid when ``crc32(conversationId) % 10 == 0`` (about 10 %), independent of file order and of the subset held.
"""

from __future__ import annotations

import csv
import io
import math
import re
import zlib
from pathlib import Path

from crslight.data.errors import DataError, LoadReport, check_ids, parse_json, read_text
from crslight.schema import RECOMMENDER, SEEKER, turn

FILES = ["train_data.jsonl", "test_data.jsonl", "movies_with_mentions.csv"]
MENTION = re.compile(r"@(\d+)")
YEAR = re.compile(r"\((\d{4})\)\s*$")
VALID_MODULUS = 10


def clean_title(title: str) -> str:
    return " ".join(title.split())


def read_catalogue(path: Path, report: LoadReport, skip_bad_rows: bool) -> list[dict]:
    rows, ids = [], {}
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["movieId", "movieName", "nbMentions"]:
            raise DataError(path, f"expected the header 'movieId,movieName,nbMentions', got {header!r}", line=1)
        for row_no, row in enumerate(reader, start=1):
            try:
                if len(row) < 3:
                    raise DataError(path, f"expected 3 columns, got {len(row)}", line=row_no)
                movie_id, name, mentions = row[0].strip(), clean_title(row[1]), row[2].strip()
                if not movie_id.isdigit():
                    raise DataError(path, f"expected an integer id, got {movie_id!r}", line=row_no, field="movieId")
                try:
                    popularity = float(mentions)
                except ValueError:
                    raise DataError(
                        path, f"expected a number, got {mentions!r}", line=row_no, field="nbMentions"
                    ) from None
                check_ids(path, [(movie_id, row_no)], "movieId", ids, what="movie")
            except DataError as e:
                if not skip_bad_rows:
                    raise
                report.skip(e)
                continue
            year = YEAR.search(name)
            rows.append(
                {"item_id": movie_id, "name": name, "popularity": popularity,
                 "attributes": f"year={year.group(1)}" if year else ""}
            )
    if not rows:
        raise DataError(path, "no movies: expected one 'movieId,movieName,nbMentions' row per movie after the header")
    return rows


def _expect(value, kind, path: Path, line: int, field: str, what: str):
    if not isinstance(value, kind):
        raise DataError(path, f"expected {what}, got {type(value).__name__} {value!r:.60}", line=line, field=field)
    return value


def _questions(raw, path: Path, line: int, field: str) -> dict:
    if raw == [] or raw is None:
        return {}
    _expect(raw, dict, path, line, field, "an object {movieId: {suggested, seen, liked}} or []")
    for movie_id, answers in raw.items():
        _expect(answers, dict, path, line, f"{field}.{movie_id}", "an object {suggested, seen, liked}")
        for key in ("suggested", "seen", "liked"):
            v = answers.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v not in (0, 1, 2):
                raise DataError(path, f"expected 0, 1 or 2, got {v!r}", line=line, field=f"{field}.{movie_id}.{key}")
    return raw


def convert_dialogue(raw: dict, titles: dict[str, str], path: Path, line: int, report: LoadReport) -> dict:
    """One official ReDial record → the canonical schema (see the module docstring for the rules)."""
    _expect(raw, dict, path, line, "<record>", "a JSON object")
    conv_id = str(_expect(raw.get("conversationId"), (str, int), path, line, "conversationId", "a string id"))
    seeker = _expect(raw.get("initiatorWorkerId"), int, path, line, "initiatorWorkerId", "an integer worker id")
    mentions = raw.get("movieMentions") or {}
    _expect(mentions, dict, path, line, "movieMentions", "an object {movieId: title} or []")
    messages = _expect(raw.get("messages"), list, path, line, "messages", "a list of messages")

    def title(movie_id: str) -> str | None:
        name = mentions.get(movie_id)
        return clean_title(name) if isinstance(name, str) and name.strip() else titles.get(movie_id)

    turns: list[dict] = []
    for m_no, msg in enumerate(messages):
        field = f"messages[{m_no}]"
        _expect(msg, dict, path, line, field, "a message object")
        text = _expect(msg.get("text"), str, path, line, f"{field}.text", "a string")
        sender = _expect(msg.get("senderWorkerId"), int, path, line, f"{field}.senderWorkerId", "an integer worker id")
        offset = _expect(msg.get("timeOffset"), (int, float), path, line, f"{field}.timeOffset", "a number of seconds")
        if not (math.isfinite(offset) and offset >= 0):
            raise DataError(path, f"expected a finite number of seconds, 0 or more, got {offset!r}", line=line,
                            field=f"{field}.timeOffset")
        items: list[str] = []

        def substitute(match: re.Match, items: list[str] = items) -> str:
            movie_id = match.group(1)
            name = title(movie_id)
            if name is None:
                report.unknown_items += 1
                return match.group(0)
            if movie_id in titles:
                items.append(movie_id)
            else:  # named in the dialogue, but absent from the catalogue: cannot be ranked
                report.unknown_items += 1
            return name

        text = " ".join(MENTION.sub(substitute, text).split())
        role = SEEKER if sender == seeker else RECOMMENDER
        if turns and turns[-1]["role"] == role:
            last = turns[-1]
            last["text"] = f"{last['text']} {text}".strip()
            last["items"] = list(dict.fromkeys(last["items"] + items))
            last["end_time"] = float(offset)
        else:
            turns.append(turn(role, text, list(dict.fromkeys(items)), time=float(offset)))

    seeker_answers = _questions(raw.get("initiatorQuestions"), path, line, "initiatorQuestions")
    answers = _questions(raw.get("respondentQuestions"), path, line, "respondentQuestions")  # both checked
    answers = seeker_answers or answers
    labels = [{"item": str(k), **{f: int(v[f]) for f in ("suggested", "seen", "liked")}} for k, v in answers.items()]
    return {"dialogue_id": conv_id, "turns": turns, "labels": labels, "rating": float("nan"), "persona": ""}


def read_dialogues(path: Path, titles: dict[str, str], report: LoadReport, skip_bad_rows: bool,
                   seen: dict[str, tuple[str, int]] | None = None) -> list[dict]:
    """Canonical dialogues from one official JSONL file; errors name the file, line and field. ``seen``: the dialogue
    ids read so far (from other files too), since no dialogue may come twice. An empty file is an error."""
    dialogues = []
    seen = {} if seen is None else seen
    for line_no, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            dialogue = convert_dialogue(parse_json(line, path, line_no), titles, path, line_no, report)
            check_ids(path, [(dialogue["dialogue_id"], line_no)], "conversationId", seen)
            dialogues.append(dialogue)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.skip(e)
    if not dialogues:
        raise DataError(path, "no dialogues: expected one JSON record per line")
    return dialogues


def is_valid(dialogue_id: str) -> bool:
    return zlib.crc32(dialogue_id.encode()) % VALID_MODULUS == 0


def load_splits(root: Path, report: LoadReport, skip_bad_rows: bool) -> tuple[dict[str, list[dict]], list[dict]]:
    catalogue = read_catalogue(root / "movies_with_mentions.csv", report, skip_bad_rows)
    titles = {row["item_id"]: row["name"] for row in catalogue}
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    seen: dict[str, tuple[str, int]] = {}
    for d in read_dialogues(root / "train_data.jsonl", titles, report, skip_bad_rows, seen):
        splits["valid" if is_valid(d["dialogue_id"]) else "train"].append(d)
    splits["test"] = read_dialogues(root / "test_data.jsonl", titles, report, skip_bad_rows, seen)
    return splits, catalogue
