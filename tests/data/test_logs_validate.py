"""Malformed interaction logs: a small good folder, broken in one way per case, read by ``crslight data validate``
(every problem listed with file, line and field; exit code 2) and by ``crslight data stats`` (the first problem, one
line, exit code 2), as a user would. Neither leaves anything in the corpus cache. The helpers are those of the ReDial
and OpenDialKG cases (tests/data/test_malformed_inputs.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_malformed_inputs import DELETE, check_case, edit_bytes, edit_record, make_redial, set_bytes

from crslight.cli import main

CATALOGUE = "id,title,popularity,genre\nm1,Alpha (2001),3,comedy\nm2,Beta (2002),2,drama\nm3,Gamma (1999),1,horror\n"
LOG = "conversations.jsonl"


def record(i: int) -> dict:
    return {
        "conversation_id": f"c{i}", "user_id": "u1", "rating": 4,
        "turns": [
            {"role": "user", "text": "Something funny?", "timestamp": "2024-05-01T18:00:00Z"},
            {"role": "assistant", "text": "Try Alpha.", "timestamp": "2024-05-01T18:00:05Z", "items": ["m1"]},
            {"role": "user", "text": "Great, thanks!", "timestamp": "2024-05-01T18:00:30Z"},
        ],
        "events": [{"type": "shown", "item": "m1", "turn": 1, "timestamp": "2024-05-01T18:00:05Z"},
                   {"type": "rated", "item": "m1", "value": 5, "timestamp": "2024-05-01T19:00:00Z"}],
    }


def make_logs(root: Path) -> Path:
    root.mkdir()
    (root / "catalogue.csv").write_text(CATALOGUE)
    (root / LOG).write_text("".join(json.dumps(record(i)) + "\n" for i in (1, 2, 3)))
    return root


def edit(field_path: str, value, line: int = 2):
    return edit_record(field_path, value, name=LOG, line=line)


def into_train_folder(then):
    def move(root: Path) -> None:
        (root / "train").mkdir()
        (root / LOG).rename(root / "train" / LOG)
        then(root / "train")
    return move


# case: (break it, the file at fault, the message expected (file and line are checked apart), line or None)
CASES = {
    "bad-json": (edit_bytes(LOG, lambda b: b + b'{"conversation_id": "c9",\n'), LOG, r"not valid JSON", 4),
    "truncated-line": (edit_bytes(LOG, lambda b: b[: len(b) // 2]), LOG, r"not valid JSON", 2),
    "deep-json": (edit_bytes(LOG, lambda b: b + b"[" * 100_000 + b"\n"), LOG, r"JSON nested too deeply", 4),
    "non-utf8": (edit_bytes(LOG, lambda b: b.replace(b"\n", b"\n\xff", 1)), LOG, r"not UTF-8 text: byte 0xff", 2),
    "record-a-list": (edit_bytes(LOG, lambda b: b + b"[1, 2]\n"), LOG, r"field '<record>': expected a JSON object", 4),
    "no-conversation-id": (edit("conversation_id", DELETE), LOG, r"field 'conversation_id': expected a string id", 2),
    "duplicate-conversation": (edit("conversation_id", "c1", line=3), LOG,
                               r"field 'conversation_id': 'c1' is already the id of the conversation at line 1", 3),
    "user-id-a-list": (edit("user_id", ["u1"]), LOG, r"field 'user_id': expected a string id", 2),
    "no-turns": (edit("turns", DELETE), LOG, r"field 'turns': expected a non-empty list of turns", 2),
    "empty-turns": (edit("turns", []), LOG, r"field 'turns': expected a non-empty list", 2),
    "turn-a-string": (edit("turns[1]", "Try Alpha."), LOG, r"field 'turns\[1\]': expected a turn object", 2),
    "missing-role": (edit("turns[0].role", DELETE), LOG, r"field 'turns\[0\]\.role': missing role", 2),
    "unknown-role": (edit("turns[1].role", "system"), LOG, r"field 'turns\[1\]\.role': expected 'user'.*'system'", 2),
    "empty-text": (edit("turns[1].text", "  "), LOG, r"field 'turns\[1\]\.text': empty text", 2),
    "text-a-number": (edit("turns[0].text", 42), LOG, r"field 'turns\[0\]\.text': expected a string", 2),
    "bad-timestamp": (edit("turns[1].timestamp", "yesterday"), LOG,
                      r"field 'turns\[1\]\.timestamp': expected an ISO 8601 date and time", 2),
    "timestamp-a-boolean": (edit("turns[1].timestamp", True), LOG,
                            r"field 'turns\[1\]\.timestamp': expected ISO 8601 text or epoch seconds", 2),
    "timestamp-in-milliseconds": (edit("turns[2].timestamp", 1714586430000), LOG,
                                  r"field 'turns\[2\]\.timestamp': .* epoch milliseconds\? divide by 1000", 2),
    "timestamp-negative": (edit("turns[0].timestamp", -5), LOG,
                           r"field 'turns\[0\]\.timestamp': expected epoch seconds, a finite number 0 or more", 2),
    "turns-out-of-order": (edit("turns[2].timestamp", "2024-05-01T17:59:00Z"), LOG,
                           r"field 'turns\[2\]\.timestamp': turns out of order: -65 s before turn 1", 2),
    "end-before-start": (edit("turns[1].end_timestamp", "2024-05-01T18:00:01Z"), LOG,
                         r"field 'turns\[1\]\.end_timestamp': ends 4 s before the turn's timestamp", 2),
    "unknown-item-in-a-turn": (edit("turns[1].items", ["m1", "m404"]), LOG,
                               r"field 'turns\[1\]\.items\[1\]': unknown item id 'm404': not in the catalogue", 2),
    "items-a-string": (edit("turns[1].items", "m1"), LOG, r"field 'turns\[1\]\.items': expected a list", 2),
    "events-an-object": (edit("events", {"type": "shown"}), LOG, r"field 'events': expected a list of events", 2),
    "unknown-item-in-an-event": (edit("events[0].item", "m404"), LOG,
                                 r"field 'events\[0\]\.item': unknown item id 'm404'", 2),
    "event-without-item": (edit("events[1].item", DELETE), LOG, r"field 'events\[1\]\.item': expected an item id", 2),
    "unknown-event-type": (edit("events[0].type", "purchased"), LOG,
                           r"field 'events\[0\]\.type': expected one of shown, clicked, .*'purchased'", 2),
    "event-turn-out-of-range": (edit("events[0].turn", 7), LOG,
                                r"field 'events\[0\]\.turn': expected the index of a turn, 0 to 2, got int 7", 2),
    "bad-event-timestamp": (edit("events[1].timestamp", "2024-13-45"), LOG,
                            r"field 'events\[1\]\.timestamp': expected an ISO 8601", 2),
    "rated-without-value": (edit("events[1].value", DELETE), LOG,
                            r"field 'events\[1\]\.value': a rated event needs the rating as value", 2),
    "rated-out-of-scale": (edit("events[1].value", 7), LOG,
                           r"field 'events\[1\]\.value': expected a rating from 1 to 5 .* got 7", 2),
    "rated-a-word": (edit("events[1].value", "great"), LOG, r"field 'events\[1\]\.value': expected a rating", 2),
    "rating-out-of-scale": (edit("rating", 9), LOG, r"field 'rating': expected a rating from 1 to 5", 2),
    "rating-nan": (edit("rating", float("nan")), LOG, r"field 'rating': expected a rating, a finite number", 2),
    "rating-a-boolean": (edit("rating", True), LOG, r"field 'rating': expected a rating, a finite number", 2),
    "scale-upside-down": (edit("rating_scale", [5, 1]), LOG,
                          r"field 'rating_scale': expected \[low, high\] with low < high", 2),
    "unknown-split": (edit("split", "dev"), LOG, r"field 'split': expected one of train, valid, validation, test", 2),
    "persona-a-string": (edit("persona", "likes comedies"), LOG, r"field 'persona': expected an object", 2),
    "split-field-against-its-folder": (into_train_folder(edit_record("split", "test", name=LOG, line=2)),
                                       f"train/{LOG}", r"field 'split': split 'test' in a file of the train/ folder", 2),
    "catalogue-without-title-column": (set_bytes("catalogue.csv", b"id,name\nm1,Alpha\n"), "catalogue.csv",
                                       r"expected a header with the columns id and title", 1),
    "catalogue-duplicate-id": (edit_bytes("catalogue.csv", lambda b: b + b"m2,Beta again,1,drama\n"), "catalogue.csv",
                               r"field 'id': 'm2' is already the id of the item at line 3", 5),
    "catalogue-empty-title": (edit_bytes("catalogue.csv", lambda b: b + b"m4,,1,drama\n"), "catalogue.csv",
                              r"field 'title': expected the item's title", 5),
    "catalogue-bad-popularity": (edit_bytes("catalogue.csv", lambda b: b.replace(b",2,", b",lots,")), "catalogue.csv",
                                 r"field 'popularity': expected a number, 0 or more, got 'lots'", 3),
    "catalogue-short-row": (edit_bytes("catalogue.csv", lambda b: b + b"m4,Delta\n"), "catalogue.csv",
                            r"expected 4 columns as in the header, got 2", 5),
    "catalogue-non-utf8": (edit_bytes("catalogue.csv", lambda b: b.replace(b"Beta", b"B\xe9ta")), "catalogue.csv",
                           r"not UTF-8 text", 3),
    # a whole file at fault: no line to name
    "no-catalogue": (lambda root: (root / "catalogue.csv").unlink(), "<root>", r"no catalogue: expected catalogue\.csv",
                     None),
    "two-catalogues": (lambda root: (root / "catalogue.jsonl").write_text('{"id": "m1", "title": "A"}\n'), "<root>",
                       r"two catalogues", None),
    "no-conversations-file": (lambda root: (root / LOG).unlink(), "<root>", r"no conversations: expected \*\.jsonl",
                              None),
    "empty-conversations-file": (set_bytes(LOG, b"\n\n"), LOG, r"no conversations", None),
    "header-only-catalogue": (set_bytes("catalogue.csv", b"id,title\n"), "catalogue.csv", r"no items", None),
    "not-parquet": (lambda root: (root / "more.parquet").write_bytes(b"PAR1 not really"), "more.parquet",
                    r"not a readable Parquet file", None),
}


def run_validate(root: Path, capsys) -> tuple[int, str]:
    code = main(["data", "validate", "--dataset", "logs", "--root", str(root)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_there_are_at_least_20_cases_that_name_a_line():
    assert sum(case[3] is not None for case in CASES.values()) >= 20


def test_the_untouched_folder_is_usable(tmp_path, capsys, own_cache):
    code, out = run_validate(make_logs(tmp_path / "logs"), capsys)
    assert code == 0 and out.splitlines()[-1].startswith("usable"), out
    assert json.loads(out.splitlines()[-2])["usable_conversations"] == 3
    assert not own_cache.exists()  # validate converts nothing into the cache


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_broken_log_is_refused_naming_file_and_line(case, tmp_path, capsys, own_cache):
    break_it, name, expected, line = CASES[case]
    root = make_logs(tmp_path / "logs")
    break_it(root)
    code, out = run_validate(root, capsys)
    assert code == 2, out
    assert "Traceback" not in out and out.splitlines()[-1].startswith("not usable: ")
    where = re.escape(str(root) if name == "<root>" else str(root / name))
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    at = f", line {line}" if line is not None else r"(?!, line)"
    assert any(re.match(f"error: {where}{at}.*{expected}", x) for x in errors), out
    assert not own_cache.exists() or not [p for p in own_cache.rglob("*") if p.is_file()]
    # data stats (and so fit / test) stops at the first problem, with one line and exit code 2, caching nothing
    check_case("logs", lambda folder: root, (lambda _: None, name, expected), tmp_path, capsys, own_cache)


def test_validate_lists_every_problem_of_every_line(tmp_path, capsys):
    root = make_logs(tmp_path / "logs")
    edit("turns[1].timestamp", "soon", line=1)(root)
    edit("turns[0].role", "bot", line=3)(root)
    edit("events[0].item", "m404", line=3)(root)
    edit_bytes(LOG, lambda b: b + b"{oops\n")(root)
    code, out = run_validate(root, capsys)
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    assert code == 2 and len(errors) == 4, out
    assert [re.search(r"line (\d+)", x).group(1) for x in errors] == ["1", "3", "3", "4"]
    counts = json.loads(out.splitlines()[-2])
    assert counts["conversations"] == 4 and counts["usable_conversations"] == 1 and counts["errors"] == 4


def test_skip_bad_rows_loads_the_rest(tmp_path, capsys):
    root = make_logs(tmp_path / "logs")
    edit("turns[1].text", "", line=2)(root)
    assert main(["data", "stats", "--dataset", "logs", "--root", str(root), "--skip-bad-rows"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["bad_rows"] == 1


def test_validate_checks_an_official_download_too(tmp_path, capsys, own_cache):
    root = make_redial(tmp_path / "redial")
    assert main(["data", "validate", "--dataset", "redial", "--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "usable"
    edit_record("messages[1].timeOffset", "soon")(root)
    assert main(["data", "validate", "--dataset", "redial", "--root", str(root)]) == 2
    out = capsys.readouterr().out
    assert f"error: {root / 'train_data.jsonl'}, line 2, field 'messages[1].timeOffset'" in out
    assert json.loads(out.splitlines()[-2])["bad_rows"] == 1 and not own_cache.exists()


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
