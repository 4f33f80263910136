"""One record of crslight's interaction-log format → the canonical schema (the format is in ``docs/logs.md`` and
``crslight/data/logs.schema.json``; :mod:`crslight.data.logs` finds the files and the splits).

A conversation::

    {"conversation_id": "c1", "user_id": "u7", "split": "train", "rating": 4, "rating_scale": [1, 5],
     "turns": [{"role": "user", "text": "...", "timestamp": "2024-05-01T18:02:11Z", "items": []},
               {"role": "assistant", "text": "...", "timestamp": 1714586540.5, "end_timestamp": ..., "items": ["m1"]}],
     "events": [{"type": "shown", "item": "m1", "turn": 1, "timestamp": ...},
                {"type": "rated", "item": "m1", "value": 5, "scale": [1, 5], "timestamp": ...}],
     "persona": {...}, "any_other_field": ...}

Conversion rules:

- Roles: ``user`` / ``seeker`` → seeker, ``assistant`` / ``recommender`` → recommender. Turns are kept as given (no
  merging), so two seeker turns in a row stay two turns.
- Times: a timestamp is ISO 8601 text (no time zone = UTC) or epoch seconds (a number). A turn's ``time`` is its
  ``timestamp`` minus the first timestamped turn's, in seconds; ``end_time`` is its ``end_timestamp`` (default: its
  ``timestamp``) the same way; NaN where a turn has none, so timing signals are missing, not zero.
- Items: a turn's ``items``, plus the item of every ``shown`` event that names the turn (``turn``: its index).
- Labels (one per item that has events, in order of its first event): ``suggested`` 1 when the item was ``shown``,
  else 0; ``seen`` 1 after a ``seen`` event, else 2 (did not say); ``liked`` from the last ``rated`` event (above the
  scale's middle 1, below 0, at it 2), else the last ``accepted`` (1) / ``rejected`` (0), else 1 after a ``clicked``,
  else 2.
- Ratings (``rating`` and ``rated`` values) are rescaled from their scale (default 1-5) onto 1-5, the scale the
  signals read (OpenDialKG's).
- Unknown fields are kept: the conversation's in ``extra`` (JSON), with those of its turns and events under
  ``extra["turns"]`` / ``extra["events"]`` by index. ``persona`` (an object) is stored as the canonical ``persona``.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import datasets

from crslight.data.errors import DataError
from crslight.schema import DIALOGUE_FEATURES, RECOMMENDER, SEEKER, turn

ROLES = {"seeker": SEEKER, "user": SEEKER, "recommender": RECOMMENDER, "assistant": RECOMMENDER}
EVENT_TYPES = ("shown", "clicked", "accepted", "rejected", "rated", "seen")
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
CONVERSATION_FIELDS = ("conversation_id", "turns", "events", "rating", "rating_scale", "user_id", "split", "persona")
TURN_FIELDS = ("role", "text", "timestamp", "end_timestamp", "items")
EVENT_FIELDS = ("type", "item", "timestamp", "turn", "value", "scale")
DEFAULT_SCALE = (1.0, 5.0)
#: epoch seconds reach 1e11 in the year 5138: a larger number is almost surely milliseconds
MAX_EPOCH_SECONDS = 1e11

EVENT_FEATURES = {
    "type": datasets.Value("string"),
    "item": datasets.Value("string"),
    "time": datasets.Value("float32"),
    "turn": datasets.Value("int32"),
    "value": datasets.Value("float32"),
}
#: the canonical dialogue columns, plus what a log has beyond them (other stages read only the canonical ones)
LOG_FEATURES = datasets.Features(
    {**DIALOGUE_FEATURES, "user_id": datasets.Value("string"), "events": datasets.List(EVENT_FEATURES),
     "extra": datasets.Value("string")}
)


class Problems:
    """The problems of one record: each names the file, the line and the field."""

    def __init__(self, path, line: int):
        self.path, self.line, self.errors = path, line, []

    def __call__(self, field: str, message: str) -> None:
        self.errors.append(DataError(self.path, message, line=self.line, field=field))


def _show(value) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def parse_timestamp(value) -> float:
    """Epoch seconds of an ISO 8601 text (no time zone = UTC), a number of epoch seconds or a ``datetime``; raises
    ``ValueError`` with what was expected."""
    if isinstance(value, datetime):
        stamp = value
    elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected ISO 8601 text or epoch seconds (a number), got {_show(value)}")
    elif isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"expected an ISO 8601 date and time such as '2024-05-01T18:02:11Z', got {value!r:.60}"
                             ) from None
    else:
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"expected epoch seconds, a finite number 0 or more, got {value!r}")
        if seconds >= MAX_EPOCH_SECONDS:
            raise ValueError(f"{value!r} is after the year 5000 in epoch seconds: epoch milliseconds? divide by 1000")
        return seconds
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def _timestamp(problem: Problems, value, field: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as error:
        problem(field, str(error))
        return None


def _scale(problem: Problems, value, field: str) -> tuple[float, float] | None:
    if value is None:
        return DEFAULT_SCALE
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or value[0] >= value[1]:
        problem(field, f"expected [low, high] with low < high, got {value!r:.60}")
        return None
    return float(value[0]), float(value[1])


def _rating(problem: Problems, value, scale, field: str, scale_field: str) -> float:
    """A rating rescaled onto 1-5; NaN when absent or wrong (the problem is recorded)."""
    bounds = _scale(problem, scale, scale_field)
    if value is None or bounds is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problem(field, f"expected a rating, a finite number, got {_show(value)}")
        return math.nan
    low, high = bounds
    if not low <= value <= high:
        problem(field, f"expected a rating from {low:g} to {high:g} (the scale, set by {scale_field!r}), got {value!r}")
        return math.nan
    return DEFAULT_SCALE[0] + (DEFAULT_SCALE[1] - DEFAULT_SCALE[0]) * (value - low) / (high - low)


def _item(problem: Problems, value, field: str, catalogue: set[str] | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        problem(field, f"expected an item id (a string), got {_show(value)}")
        return None
    item = str(value)
    if catalogue is not None and item not in catalogue:
        problem(field, f"unknown item id {item!r}: not in the catalogue")
        return None
    return item


def _extra(raw: dict, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in raw.items() if k not in known and v is not None}


def convert_conversation(raw, path, line: int, catalogue: set[str] | None) -> tuple[dict | None, list[DataError]]:
    """One conversation → ``(row of LOG_FEATURES, [])``, or ``(None, problems)`` naming the file, line and field of
    each problem found. ``catalogue``: the known item ids (None: not checked). The row's ``split`` key is the
    record's own split (None when it has none); the caller pops it."""
    problem = Problems(path, line)
    if not isinstance(raw, dict):
        problem("<record>", f"expected a JSON object, one conversation per line, got {type(raw).__name__}")
        return None, problem.errors
    conversation_id = raw.get("conversation_id")
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, (str, int)) or not str(conversation_id):
        problem("conversation_id", f"expected a string id, got {_show(conversation_id)}")
    user_id = raw.get("user_id")
    if user_id is not None and (isinstance(user_id, bool) or not isinstance(user_id, (str, int))):
        problem("user_id", f"expected a string id, got {_show(user_id)}")
    split = raw.get("split")
    if split is not None and split not in SPLIT_NAMES:
        problem("split", f"expected one of {', '.join(SPLIT_NAMES)}, got {split!r:.60}")
    rating = _rating(problem, raw.get("rating"), raw.get("rating_scale"), "rating", "rating_scale")
    persona = raw.get("persona")
    if persona is not None and not isinstance(persona, dict):
        problem("persona", f"expected an object, got {_show(persona)}")
    extra: dict = _extra(raw, CONVERSATION_FIELDS)

    turns_raw = raw.get("turns")
    if not isinstance(turns_raw, list) or not turns_raw:
        problem("turns", f"expected a non-empty list of turns, got {_show(turns_raw)}")
        turns_raw = []
    turns, stamps = [], []
    previous: tuple[int, float] | None = None  # (turn, the last time it covers)
    for t, raw_turn in enumerate(turns_raw):
        field = f"turns[{t}]"
        if not isinstance(raw_turn, dict):
            problem(field, f"expected a turn object {{role, text, ...}}, got {_show(raw_turn)}")
            continue
        role = raw_turn.get("role")
        if role is None:
            problem(f"{field}.role", "missing role: expected 'user' (or 'seeker') or 'assistant' (or 'recommender')")
        elif role not in ROLES:
            problem(f"{field}.role", f"expected 'user' (or 'seeker') or 'assistant' (or 'recommender'), got "
                    f"{role!r:.60}")
        text = raw_turn.get("text")
        if not isinstance(text, str):
            problem(f"{field}.text", f"expected a string, got {_show(text)}")
        elif not text.strip():
            problem(f"{field}.text", "empty text: every turn needs words (drop turns that carry none)")
        items = raw_turn.get("items")
        if items is not None and not isinstance(items, list):
            problem(f"{field}.items", f"expected a list of item ids, got {_show(items)}")
            items = None
        kept = [_item(problem, v, f"{field}.items[{i}]", catalogue) for i, v in enumerate(items or [])]
        start = _timestamp(problem, raw_turn.get("timestamp"), f"{field}.timestamp")
        end = _timestamp(problem, raw_turn.get("end_timestamp"), f"{field}.end_timestamp")
        if end is not None and start is None and raw_turn.get("timestamp") is None:
            problem(f"{field}.end_timestamp", "an end_timestamp needs the turn's timestamp")
        elif end is not None and start is not None and end < start:
            problem(f"{field}.end_timestamp", f"ends {start - end:g} s before the turn's timestamp")
        if start is not None:
            if previous is not None and start < previous[1]:
                problem(f"{field}.timestamp", f"turns out of order: {start - previous[1]:g} s before turn "
                        f"{previous[0]} (turns must be in time order)")
            previous = (t, end if end is not None else start)
        stamps.append((start, end))
        turns.append(turn(ROLES.get(role, SEEKER), text if isinstance(text, str) else "",
                          [i for i in kept if i is not None]))
        if _extra(raw_turn, TURN_FIELDS):
            extra.setdefault("turns", {})[str(t)] = _extra(raw_turn, TURN_FIELDS)

    events_raw = raw.get("events")
    if events_raw is not None and not isinstance(events_raw, list):
        problem("events", f"expected a list of events, got {_show(events_raw)}")
        events_raw = None
    events = []
    for e, event in enumerate(events_raw or []):
        field = f"events[{e}]"
        if not isinstance(event, dict):
            problem(field, f"expected an event object {{type, item, ...}}, got {_show(event)}")
            continue
        kind = event.get("type")
        if kind not in EVENT_TYPES:
            problem(f"{field}.type", f"expected one of {', '.join(EVENT_TYPES)}, got {kind!r:.60}")
        item = _item(problem, event.get("item"), f"{field}.item", catalogue)
        time = _timestamp(problem, event.get("timestamp"), f"{field}.timestamp")
        index = event.get("turn")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                                  or not 0 <= index < len(turns_raw)):
            problem(f"{field}.turn", f"expected the index of a turn, 0 to {len(turns_raw) - 1}, got {_show(index)}")
            index = None
        value = math.nan
        if kind == "rated":
            if event.get("value") is None:
                problem(f"{field}.value", "a rated event needs the rating as value")
            else:
                value = _rating(problem, event.get("value"), event.get("scale"), f"{field}.value", f"{field}.scale")
        events.append({"type": kind, "item": item, "time": time, "turn": -1 if index is None else index,
                       "value": value})
        if _extra(event, EVENT_FIELDS):
            extra.setdefault("events", {})[str(e)] = _extra(event, EVENT_FIELDS)
    if problem.errors:
        return None, problem.errors

    origin = next((start for start, _ in stamps if start is not None), None)
    for tr, (start, end) in zip(turns, stamps, strict=True):
        if start is not None:
            tr["time"] = start - origin
            tr["end_time"] = (end if end is not None else start) - origin
    for event in events:
        event["time"] = math.nan if event["time"] is None or origin is None else event["time"] - origin
        if event["type"] == "shown" and event["turn"] >= 0:
            items = turns[event["turn"]]["items"]
            if event["item"] not in items:
                items.append(event["item"])
    return {
        "dialogue_id": str(conversation_id),
        "turns": turns,
        "labels": labels_from_events(events),
        "rating": rating,
        "persona": json.dumps(persona) if persona is not None else "",
        "user_id": "" if user_id is None else str(user_id),
        "events": events,
        "extra": json.dumps(extra, default=str) if extra else "",
        "split": None if split is None else SPLIT_NAMES[split],
    }, []


def labels_from_events(events: list[dict]) -> list[dict]:
    """The questionnaire form of a conversation's events (the rules are in the module docstring)."""
    state: dict[str, dict] = {}
    for event in events:
        s = state.setdefault(event["item"], {"suggested": 0, "seen": 2, "rated": None, "decided": None,
                                             "clicked": False})
        kind = event["type"]
        if kind == "shown":
            s["suggested"] = 1
        elif kind == "seen":
            s["seen"] = 1
        elif kind == "rated":
            s["rated"] = event["value"]
        elif kind in ("accepted", "rejected"):
            s["decided"] = int(kind == "accepted")
        elif kind == "clicked":
            s["clicked"] = True
    middle = sum(DEFAULT_SCALE) / 2
    labels = []
    for item, s in state.items():
        if s["rated"] is not None:
            liked = 1 if s["rated"] > middle else 0 if s["rated"] < middle else 2
        elif s["decided"] is not None:
            liked = s["decided"]
        else:
            liked = 1 if s["clicked"] else 2
        labels.append({"item": item, "suggested": s["suggested"], "seen": s["seen"], "liked": liked})
    return labels


def json_schema() -> dict:
    """The format's JSON Schema (``crslight/data/logs.schema.json``, shipped in the package)."""
    from importlib.resources import files

    return json.loads(files("crslight.data").joinpath("logs.schema.json").read_text(encoding="utf-8"))
