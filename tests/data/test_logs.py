"""The interaction-log loader (crslight/data/logs.py, logrecord.py): the shipped example, the three split rules,
Parquet, logs without timestamps, ratings, unknown fields, the JSON Schema, and the Logs DataModule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib

from crslight.cli import main
from crslight.data import DataError, load_corpus
from crslight.data.logrecord import (
    CONVERSATION_FIELDS,
    EVENT_FIELDS,
    EVENT_TYPES,
    ROLES,
    SPLIT_NAMES,
    TURN_FIELDS,
    json_schema,
    parse_timestamp,
)
from crslight.data.logs import split_by_hash
from crslight.signals import AcceptanceSignal, DwellTimeSignal, coverage, transitions

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "logs"
CATALOGUE = "id,title,genre\nm1,Alpha,comedy\nm2,Beta,drama\nm3,Gamma,horror\n"


def conversation(i: int, timed: bool = True, **fields) -> dict:
    def at(seconds):
        return {"timestamp": 1714590000 + seconds} if timed else {}

    return {
        "conversation_id": f"c{i}",
        "turns": [
            {"role": "user", "text": f"Something funny, number {i}?", **at(0)},
            {"role": "assistant", "text": "Try Alpha, it is a comedy.", "items": ["m1"], **at(4)},
            {"role": "user", "text": "Great, thanks!", **at(20)},
        ],
        "events": [{"type": "shown", "item": "m1", "turn": 1}, {"type": "accepted", "item": "m1", "turn": 2}],
        **fields,
    }


def write_logs(root: Path, records: list[dict], name: str = "conversations.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "catalogue.csv").write_text(CATALOGUE)
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_the_shipped_example_maps_onto_the_canonical_schema():
    train = load_corpus("logs", EXAMPLE, "train", cache=False)
    assert train.info == {"split_rule": "split field (4)"}
    first, second = train.dialogues[0], train.dialogues[1]
    assert [t["role"] for t in first["turns"]] == ["seeker", "recommender", "seeker", "recommender", "seeker"]
    # ISO 8601 timestamps become seconds from the first turn; the reaction 26 s after the first suggestion
    assert [t["time"] for t in first["turns"]] == [0.0, 3.0, 29.0, 33.0, 80.0]
    # seen (m1: liked not said), clicked then accepted (m2)
    assert first["labels"] == [{"item": "m1", "suggested": 1, "seen": 1, "liked": 2},
                               {"item": "m2", "suggested": 1, "seen": 2, "liked": 1}]
    assert first["user_id"] == "u-17" and json.loads(first["extra"]) == {"channel": "web"}
    # epoch seconds, and a thumbs-up on a [0, 1] scale
    assert second["turns"][1]["time"] == 6.5
    assert second["labels"] == [{"item": "m4", "suggested": 1, "seen": 2, "liked": 1}]
    assert math.isnan(second["rating"]) and first["rating"] == 5.0
    test = load_corpus("logs", EXAMPLE, "test", cache=False)
    assert test.dialogues[0]["turns"][2]["time"] == 30.0  # the +02:00 zone is read as such
    stats = train.stats()
    assert (stats["dialogues"], stats["turns"], stats["rec_samples"], stats["items"]) == (2, 8, 3, 5)
    assert stats["events"] == 7 and stats["timed_turns"] == 8 and stats["users"] == 2
    assert train.catalogue[0] == {"item_id": "m1", "name": "The Grand Budapest Hotel", "popularity": 120.0,
                                  "attributes": "genre=comedy; year=2014"}


def test_the_documented_commands_work_from_the_repository_root(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["data", "validate", "--dataset", "logs", "--root", "docs/examples/logs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "usable" and json.loads(out[-2])["usable_conversations"] == 4
    assert main(["data", "stats", "--dataset", "logs", "--root", "docs/examples/logs", "--split", "valid"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["dialogues"] == 1 and stats["timed_turns"] == 0 and stats["split_rule"] == "split field (4)"


def test_without_a_split_field_a_stable_hash_of_the_id_decides(tmp_path):
    records = [conversation(i) for i in range(40)]
    write_logs(tmp_path / "a", records)
    write_logs(tmp_path / "b", records[::-1])  # another order, the same splits
    for split in ("train", "valid", "test"):
        a = load_corpus("logs", tmp_path / "a", split, cache=False)
        b = load_corpus("logs", tmp_path / "b", split, cache=False)
        ids = a.dialogues["dialogue_id"]
        assert sorted(ids) == sorted(b.dialogues["dialogue_id"]) and ids
        assert all(split_by_hash(i) == split for i in ids)
    assert a.info["split_rule"].startswith("hash of conversation_id") and a.info["split_rule"].endswith("(40)")


def test_split_folders_and_the_split_field_mix(tmp_path):
    root = tmp_path / "logs"
    write_logs(root / "train", [conversation(1), conversation(2)])
    write_logs(root / "test", [conversation(3, split="test")])
    (root / "train" / "catalogue.csv").rename(root / "catalogue.csv")
    (root / "test" / "catalogue.csv").unlink()
    (root / "more.jsonl").write_text(json.dumps(conversation(4, split="valid")) + "\n")
    corpora = {s: load_corpus("logs", root, s, cache=False) for s in ("train", "valid", "test")}
    assert {s: c.dialogues["dialogue_id"] for s, c in corpora.items()} == {
        "train": ["c1", "c2"], "valid": ["c4"], "test": ["c3"]}
    assert corpora["train"].info["split_rule"] == "split field (1) + folder per split (3)"


def test_one_file_as_root_and_parquet_give_the_same_records(tmp_path):
    records = [conversation(i, user_id=f"u{i}", rating=8, rating_scale=[0, 10]) for i in range(30)]
    root = write_logs(tmp_path / "jsonl", records)
    parquet = tmp_path / "pq"
    parquet.mkdir()
    (parquet / "catalogue.csv").write_text(CATALOGUE)
    pq.write_table(pa.Table.from_pylist(records), parquet / "part-0.parquet")
    sizes = []
    for split in ("train", "valid", "test"):
        a = load_corpus("logs", root / "conversations.jsonl", split, cache=False).dialogues
        b = load_corpus("logs", parquet / "part-0.parquet", split, cache=False).dialogues
        assert json.dumps(a.to_list()) == json.dumps(b.to_list())  # NaN != NaN: compare as text
        sizes.append(len(a))
    assert sum(sizes) == 30 and all(sizes)
    row = a[0]
    assert row["rating"] == pytest.approx(1 + 4 * 0.8)  # 8 on 0-10, rescaled onto the signals' 1-5
    assert row["user_id"].startswith("u") and row["extra"] == ""


def test_a_log_without_timestamps_loads_with_timing_missing_not_zero(tmp_path, capsys):
    root = write_logs(tmp_path / "logs", [conversation(i, timed=False) for i in range(30)])
    corpus = load_corpus("logs", root, "train")
    assert all(math.isnan(t["time"]) and math.isnan(t["end_time"]) for ts in corpus.dialogues["turns"] for t in ts)
    batch = transitions(corpus)
    dwell = DwellTimeSignal()(batch)
    assert len(batch) == len(corpus.dialogues) and dwell.isnan().all() and coverage(dwell) == 0.0
    assert (AcceptanceSignal()(batch) == 1).all()  # the accepted events still label every reply
    assert corpus.stats()["timed_turns"] == 0
    assert main(["data", "validate", "--dataset", "logs", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and "no turn has a timestamp: timing signals (DwellTimeSignal) are missing" in out


def test_events_decide_labels_in_the_documented_order(tmp_path):
    events = [
        {"type": "shown", "item": "m1", "turn": 1}, {"type": "rejected", "item": "m1"},
        {"type": "rated", "item": "m1", "value": 4},  # a rating wins over accept / reject, whatever the order
        {"type": "clicked", "item": "m2"},  # a click alone is a weak like; not shown: not suggested
        {"type": "accepted", "item": "m3"}, {"type": "rejected", "item": "m3"},  # the last decision counts
        {"type": "shown", "item": "m2", "turn": 0},  # adds m2 to turn 0's items
    ]
    root = write_logs(tmp_path / "logs", [conversation(1, events=events, split="train", party="x")])
    row = load_corpus("logs", root, "train", cache=False).dialogues[0]
    assert row["labels"] == [{"item": "m1", "suggested": 1, "seen": 2, "liked": 1},
                             {"item": "m2", "suggested": 1, "seen": 2, "liked": 1},
                             {"item": "m3", "suggested": 0, "seen": 2, "liked": 0}]
    assert row["turns"][0]["items"] == ["m2"]
    assert [e["type"] for e in row["events"]] == [e["type"] for e in events]
    assert json.loads(row["extra"]) == {"party": "x"}


def test_unknown_fields_of_turns_and_events_are_kept(tmp_path):
    record = conversation(1, split="train", session={"device": "ios"})
    record["turns"][1]["latency_ms"] = 420
    record["events"][0]["position"] = 3
    root = write_logs(tmp_path / "logs", [record])
    extra = json.loads(load_corpus("logs", root, "train", cache=False).dialogues[0]["extra"])
    assert extra == {"session": {"device": "ios"}, "turns": {"1": {"latency_ms": 420}}, "events": {"0": {"position": 3}}}


@pytest.mark.parametrize(("text", "seconds"), [
    ("2024-05-01T18:02:11Z", 1714586531.0), ("2024-05-01T18:02:11", 1714586531.0),
    ("2024-05-01T20:02:11.5+02:00", 1714586531.5), ("2024-05-01 18:02:11+00:00", 1714586531.0),
    (1714586531, 1714586531.0), (0.25, 0.25)])
def test_timestamps_iso_8601_or_epoch_seconds(text, seconds):
    assert parse_timestamp(text) == seconds


def test_the_json_schema_says_what_the_loader_reads():
    schema = json_schema()
    assert set(schema["properties"]) == set(CONVERSATION_FIELDS)
    assert schema["required"] == ["conversation_id", "turns"] and schema["additionalProperties"] is True
    turn, event = schema["$defs"]["turn"], schema["$defs"]["event"]
    assert set(turn["properties"]) == set(TURN_FIELDS) and set(turn["properties"]["role"]["enum"]) == set(ROLES)
    assert set(event["properties"]) == set(EVENT_FIELDS) and event["properties"]["type"]["enum"] == list(EVENT_TYPES)
    assert set(schema["properties"]["split"]["enum"]) == set(SPLIT_NAMES)
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "logs.schema.json" in package_data["crslight.data"]


def test_the_logs_datamodule_reads_a_folder(tiny_tokenizer):
    from crslight.data.datamodules import Logs, SFTBatch

    dm = Logs(root=str(EXAMPLE), batch_size=2)
    dm._tokenizer = tiny_tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, SFTBatch) and batch.input_ids.shape[0] == 2
    dm.setup("test")
    test = next(iter(dm.test_dataloader()))
    assert test.rec_target.tolist() == [dm.corpus("test").item_index["m5"]]


def test_a_config_names_the_logs_datamodule(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/synthetic/sft.yaml", "--data", "Logs", "--data.root", "docs/examples/logs",
              "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: crslight.data.datamodules.Logs" in printed and "root: docs/examples/logs" in printed


def test_a_hugging_face_dataset_folder_saved_to_disk_reads_like_the_jsonl(tmp_path):
    """``DatasetDict.save_to_disk`` writes a folder per split of Arrow files: the loader reads it as it is (the
    ``validation`` folder as the valid split), the same records as the JSONL they came from."""
    import datasets as hf

    records = [conversation(i, user_id=f"u{i}") for i in range(30)]
    by_split = {"train": records[:20], "validation": records[20:25], "test": records[25:]}
    jsonl = tmp_path / "jsonl"
    for folder, rows in by_split.items():
        write_logs(jsonl / folder, rows)
        (jsonl / folder / "catalogue.csv").unlink()
    (jsonl / "catalogue.csv").write_text(CATALOGUE)
    saved = tmp_path / "saved"
    hf.DatasetDict({k: hf.Dataset.from_list(v) for k, v in by_split.items()}).save_to_disk(str(saved))
    (saved / "catalogue.csv").write_text(CATALOGUE)
    assert sorted(p.suffix for p in (saved / "train").iterdir()) == [".arrow", ".json", ".json"]
    for split, folder in [("train", "train"), ("valid", "validation"), ("test", "test")]:
        a = load_corpus("logs", jsonl, split, cache=False).dialogues
        b = load_corpus("logs", saved, split, cache=False).dialogues
        assert json.dumps(a.to_list()) == json.dumps(b.to_list()) and len(b) == len(by_split[folder])
    with pytest.raises(DataError, match="not a readable Arrow file"):
        (saved / "train" / "broken.arrow").write_bytes(b"not arrow at all")
        load_corpus("logs", saved, "train", cache=False)
