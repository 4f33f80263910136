"""Canonical corpora → crslight's interaction-log format (``crslight data export-logs``).

The synthetic scenario exported this way is the format's reproducible example, and reading it back through the
``logs`` loader gives the synthetic loader's dialogues, counts and signal values (``tests/data/test_export_logs.py``).

What is written, per conversation (``OUT/<split>/conversations.jsonl``, the catalogue in ``OUT/catalogue.csv``):

- turns with their text, items and timestamps in epoch seconds: conversation ``k`` (over all splits) starts at
  :data:`EPOCH` + ``k`` hours, and a turn's timestamp is that start plus its time offset (``end_timestamp`` where
  the turn's end differs). Offsets that are NaN are left out: such turns have no timestamp.
- events: ``shown`` for each item a recommender turn suggests (questionnaire ``suggested`` = 1), at that turn;
  then at the seeker's next turn ``seen`` when the seeker had seen it, otherwise (synthetic scenario) ``accepted``
  when the recommender's next reply is the closing of an accepted dialogue (:data:`~crslight.data.synthetic.CLOSING`)
  and ``rejected`` when not. The questionnaire's ``liked`` (the seeker's taste, which the acceptance signal reads)
  becomes a thumbs rating at the conversation's end, ``{"type": "rated", "value": 0 or 1, "scale": [0, 1],
  "source": "questionnaire"}`` (``source`` is a field of crslight's own, kept by the loader as any unknown field).
- ``rating`` (1-5), and ``persona`` (the synthetic seeker's latent persona).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from crslight.data import synthetic
from crslight.data.errors import DataError
from crslight.schema import RECOMMENDER, SEEKER

#: 2023-11-14T22:13:20Z, the start of the first exported conversation
EPOCH = 1_700_000_000
SPACING_SECONDS = 3600


def conversation_record(dialogue: dict, start: float, closing: str | None = None) -> dict:
    """One canonical dialogue as a log record starting at epoch second ``start``; ``closing``: the recommender text
    that follows an accepted suggestion (None: acceptance is not known, no accepted/rejected events)."""
    turns = dialogue["turns"]

    def stamp(offset) -> float | None:
        return None if offset is None or math.isnan(offset) else start + float(offset)

    out_turns = []
    for t in turns:
        record = {"role": "user" if t["role"] == SEEKER else "assistant", "text": t["text"]}
        begin, end = stamp(t["time"]), stamp(t["end_time"])
        if begin is not None:
            record["timestamp"] = begin
            if end is not None and end != begin:
                record["end_timestamp"] = end
        if t["items"]:
            record["items"] = list(t["items"])
        out_turns.append(record)

    labels = {label["item"]: label for label in dialogue["labels"]}
    events: list[dict] = []

    def event(kind: str, item: str, index: int | None, **more) -> None:
        e = {"type": kind, "item": item}
        if index is not None:
            e["turn"] = index
            if "timestamp" in out_turns[index]:
                e["timestamp"] = out_turns[index]["timestamp"]
        events.append({**e, **more})

    for i, t in enumerate(turns):
        if t["role"] != RECOMMENDER:
            continue
        reaction = next((j for j in range(i + 1, len(turns)) if turns[j]["role"] == SEEKER), None)
        for item in t["items"]:
            label = labels.get(item)
            if label is None or label["suggested"] != 1:
                continue
            event("shown", item, i)
            if reaction is None:
                continue
            if label["seen"] == 1:
                event("seen", item, reaction)
            elif closing is not None:
                after = turns[reaction + 1] if reaction + 1 < len(turns) else None
                accepted = after is not None and after["role"] == RECOMMENDER and after["text"] == closing
                event("accepted" if accepted else "rejected", item, reaction)
    shown = {e["item"] for e in events}
    end = next((t["timestamp"] for t in reversed(out_turns) if "timestamp" in t), None)
    for item, label in labels.items():  # questionnaire answers about items no recommender turn suggested
        if label["suggested"] == 1 and item not in shown:
            event("shown", item, None)
        if label["seen"] == 1 and item not in shown:
            event("seen", item, None)
    for label in dialogue["labels"]:
        if label["liked"] in (0, 1):
            rated = {"type": "rated", "item": label["item"], "value": int(label["liked"]), "scale": [0, 1]}
            events.append({**rated, **({"timestamp": end} if end is not None else {}), "source": "questionnaire"})

    record = {"conversation_id": dialogue["dialogue_id"], "turns": out_turns}
    if events:
        record["events"] = events
    if dialogue["rating"] is not None and not math.isnan(dialogue["rating"]):
        record["rating"] = float(dialogue["rating"])
    if dialogue.get("persona"):
        record["persona"] = json.loads(dialogue["persona"])
    return record


def _float32_text(value: float) -> str:
    """The shortest text that reads back as the same float32 (what the canonical catalogue stores)."""
    return str(np.float32(value))


def write_catalogue(catalogue, path: Path) -> None:
    """``id,title,popularity`` and one column per attribute key (``key=value; ...`` in the canonical catalogue)."""
    rows = []
    for item_id, name, popularity, attributes in zip(catalogue["item_id"], catalogue["name"], catalogue["popularity"],
                                                     catalogue["attributes"], strict=True):
        pairs = dict(kv.split("=", 1) for kv in attributes.split("; ") if "=" in kv)
        rows.append(({"id": item_id, "title": name, "popularity": _float32_text(popularity)}, pairs))
    keys = list(dict.fromkeys(k for _, pairs in rows for k in pairs))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["id", "title", "popularity", *keys])
        writer.writeheader()
        for row, pairs in rows:
            writer.writerow({**row, **pairs})


def export_corpora(corpora: dict, out: str | Path, closing: str | None = None) -> dict:
    """Writes ``{split: Corpus}`` (one catalogue) into ``out`` in the log format; returns the counts written.

    Raises:
        DataError: ``out`` exists and is not empty (nothing is overwritten).
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(out, "exists and is not empty: export into a new folder (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:  # written beside, renamed when complete: a failed export leaves no half-written folder
        counts = _write(corpora, tmp, closing)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), **counts}


def _write(corpora: dict, out: Path, closing: str | None) -> dict:
    counts = {}
    k = 0
    for split, corpus in corpora.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "conversations.jsonl").open("w", encoding="utf-8") as f:
            for dialogue in corpus.dialogues:
                record = conversation_record(dialogue, EPOCH + SPACING_SECONDS * k, closing)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                k += 1
        counts[split] = len(corpus.dialogues)
    first = next(iter(corpora.values()))
    write_catalogue(first.catalogue, out / "catalogue.csv")
    counts["items"] = len(first.catalogue)
    return counts


def export_synthetic(out: str | Path, seed: int = 0, n_dialogues: int = 1000, n_items: int = 400,
                     n_eval_dialogues: int | None = None) -> dict:
    """The synthetic scenario (the same arguments as ``load_corpus("synthetic", ...)``) as interaction logs."""
    from crslight.data.corpus import SPLITS, load_corpus

    corpora = {s: load_corpus("synthetic", split=s, seed=seed, n_dialogues=n_dialogues, n_items=n_items,
                              n_eval_dialogues=n_eval_dialogues) for s in SPLITS}
    return export_corpora(corpora, out, closing=synthetic.CLOSING)
