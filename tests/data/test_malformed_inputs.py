"""The malformed-input corpus: hand-made ReDial and OpenDialKG folders (no real data), each broken in one way, read
through ``crslight data stats`` as a user would. Every case must end with exit code 2 and one message naming the file
(and the line and field where there is one), with no traceback and nothing left in the corpus cache; the untouched
folders must load. Config and checkpoint cases are in ``tests/test_cli.py``."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from crslight.cli import main

MOVIES = [("101", "Alpha (2001)", "3"), ("102", "Beta (2002)", "2"), ("103", "Gamma (1999)", "1")]


def redial_record(conversation_id: str) -> dict:
    answers = {"101": {"suggested": 0, "seen": 1, "liked": 1}, "102": {"suggested": 1, "seen": 0, "liked": 1}}
    return {
        "conversationId": conversation_id, "initiatorWorkerId": 1, "respondentWorkerId": 2,
        "movieMentions": {"101": "Alpha (2001)", "102": "Beta (2002)"},
        "initiatorQuestions": answers, "respondentQuestions": answers,
        "messages": [
            {"timeOffset": 0, "text": "Hi, I loved @101", "senderWorkerId": 1, "messageId": 1},
            {"timeOffset": 12, "text": "Then try @102", "senderWorkerId": 2, "messageId": 2},
            {"timeOffset": 30, "text": "Thanks, I will!", "senderWorkerId": 1, "messageId": 3},
        ],
    }


def make_redial(root: Path) -> Path:
    root.mkdir()
    with (root / "movies_with_mentions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("movieId", "movieName", "nbMentions"), *MOVIES])
    for name, ids in (("train_data.jsonl", ["1", "2", "3"]), ("test_data.jsonl", ["4", "5"])):
        (root / name).write_text("".join(json.dumps(redial_record(i)) + "\n" for i in ids))
    return root


def okg_actions(n: int) -> list[dict]:
    return [
        {"message": f"Do you know Dune {n}?", "type": "chat", "sender": "user"},
        {"metadata": {"path": [-1, [["Dune", "written_by", "Frank Herbert"]], "Dune : written_by: Frank Herbert"]},
         "type": "action", "sender": "assistant", "action_id": "kgwalk/choose_path"},
        {"message": "Yes, Frank Herbert wrote it. Try Hyperion too.", "type": "chat", "sender": "assistant"},
    ]


def okg_rows(actions: list[list[dict]], user: str = '{"dialog_rating": "4"}', assistant: str = "{}") -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["Messages", "User Rating", "Assistant Rating"])
    writer.writerows([json.dumps(a), user, assistant] for a in actions)
    return out.getvalue()


def make_opendialkg(root: Path) -> Path:
    root.mkdir()
    (root / "opendialkg.csv").write_text(okg_rows([okg_actions(n) for n in range(6)]))
    (root / "opendialkg_entities.txt").write_text("Dune\nFrank Herbert\nHyperion\n")
    (root / "opendialkg_triples.txt").write_text("Dune\twritten_by\tFrank Herbert\n")
    (root / "opendialkg_relations.txt").write_text("written_by\n")
    return root


def set_bytes(name: str, data: bytes):
    return lambda root: (root / name).write_bytes(data)


def edit_bytes(name: str, edit):
    return lambda root: (root / name).write_bytes(edit((root / name).read_bytes()))


def edit_record(field_path: str, value, name: str = "train_data.jsonl", line: int = 2):
    """Sets ``field_path`` (dots and [i] for list indices) of the ``line``-th record to ``value`` (``DELETE``: drop
    it)."""

    def edit(root: Path) -> None:
        lines = (root / name).read_text().splitlines()
        record = json.loads(lines[line - 1])
        *parents, last = field_path.replace("[", ".").replace("]", "").split(".")
        target = record
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        key = int(last) if isinstance(target, list) else last
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
        lines[line - 1] = json.dumps(record)
        (root / name).write_text("\n".join(lines) + "\n")

    return edit


DELETE = object()


def okg_csv(actions=None, **ratings):
    rows = [okg_actions(n) for n in range(6)]
    if actions is not None:
        rows[1] = actions
    return set_bytes("opendialkg.csv", okg_rows(rows, **ratings).encode())


def okg_action(index: int, **fields):
    actions = okg_actions(1)
    actions[index] = {**actions[index], **fields}
    return okg_csv(actions)


REDIAL = {
    "missing-every-file": (lambda root: [p.unlink() for p in root.iterdir()], "<root>", r"missing train_data\.jsonl"),
    "missing-catalogue": (lambda root: (root / "movies_with_mentions.csv").unlink(), "<root>",
                          r"missing movies_with_mentions\.csv"),
    "non-utf8-train": (edit_bytes("train_data.jsonl", lambda b: b.replace(b"\n", b"\n\xff", 1)), "train_data.jsonl",
                       r"line 2: not UTF-8"),
    "non-utf8-test": (edit_bytes("test_data.jsonl", lambda b: b"\xfe" + b), "test_data.jsonl", r"line 1: not UTF-8"),
    "non-utf8-catalogue": (edit_bytes("movies_with_mentions.csv", lambda b: b.replace(b"Beta", b"B\xe9ta")),
                           "movies_with_mentions.csv", r"line \d+: not UTF-8"),
    "deep-json": (edit_bytes("train_data.jsonl", lambda b: b + b"[" * 100_000 + b"\n"), "train_data.jsonl",
                  r"line 4: JSON nested too deeply"),
    "truncated-line": (edit_bytes("train_data.jsonl", lambda b: b[: len(b) // 2]), "train_data.jsonl",
                       r"line 2: not valid JSON"),
    "empty-train": (set_bytes("train_data.jsonl", b""), "train_data.jsonl", r"no dialogues"),
    "blank-lines-only-test": (set_bytes("test_data.jsonl", b"\n\n"), "test_data.jsonl", r"no dialogues"),
    "header-only-catalogue": (set_bytes("movies_with_mentions.csv", b"movieId,movieName,nbMentions\n"),
                              "movies_with_mentions.csv", r"no movies"),
    "wrong-catalogue-header": (set_bytes("movies_with_mentions.csv", b"id,title\n101,Alpha,3\n"),
                               "movies_with_mentions.csv", r"line 1: expected the header"),
    "catalogue-two-columns": (edit_bytes("movies_with_mentions.csv", lambda b: b + b"104,Delta (2004)\n"),
                              "movies_with_mentions.csv", r"line 4: expected 3 columns"),
    "catalogue-text-id": (edit_bytes("movies_with_mentions.csv", lambda b: b + b"abc,Delta (2004),1\n"),
                          "movies_with_mentions.csv", r"line 4, field 'movieId': expected an integer id"),
    "catalogue-text-mentions": (edit_bytes("movies_with_mentions.csv", lambda b: b + b"104,Delta (2004),many\n"),
                                "movies_with_mentions.csv", r"line 4, field 'nbMentions': expected a number"),
    "catalogue-duplicate-id": (edit_bytes("movies_with_mentions.csv", lambda b: b + b"101,Alpha again (2011),1\n"),
                               "movies_with_mentions.csv", r"line 4, field 'movieId': '101' is already"),
    "record-is-a-list": (edit_bytes("train_data.jsonl", lambda b: b + b"[1, 2]\n"), "train_data.jsonl",
                         r"line 4, field '<record>': expected a JSON object"),
    "no-conversation-id": (edit_record("conversationId", DELETE), "train_data.jsonl",
                           r"line 2, field 'conversationId': expected a string id"),
    "worker-id-as-text": (edit_record("initiatorWorkerId", "one"), "train_data.jsonl",
                          r"line 2, field 'initiatorWorkerId': expected an integer worker id"),
    "mentions-a-string": (edit_record("movieMentions", "101"), "train_data.jsonl",
                          r"line 2, field 'movieMentions': expected an object"),
    "messages-an-object": (edit_record("messages", {"text": "hi"}), "train_data.jsonl",
                           r"line 2, field 'messages': expected a list of messages"),
    "message-a-string": (edit_record("messages[1]", "hi"), "train_data.jsonl",
                         r"line 2, field 'messages\[1\]': expected a message object"),
    "text-a-number": (edit_record("messages[0].text", 7), "train_data.jsonl",
                      r"line 2, field 'messages\[0\]\.text': expected a string"),
    "no-sender": (edit_record("messages[2].senderWorkerId", DELETE), "train_data.jsonl",
                  r"line 2, field 'messages\[2\]\.senderWorkerId': expected an integer worker id"),
    "time-as-text": (edit_record("messages[1].timeOffset", "soon"), "train_data.jsonl",
                     r"line 2, field 'messages\[1\]\.timeOffset': expected a number of seconds"),
    "time-nan": (edit_record("messages[1].timeOffset", float("nan")), "train_data.jsonl",
                 r"line 2, field 'messages\[1\]\.timeOffset': expected a finite number of seconds"),
    "time-inf": (edit_record("messages[1].timeOffset", float("inf")), "train_data.jsonl",
                 r"line 2, field 'messages\[1\]\.timeOffset': expected a finite number of seconds"),
    "time-negative": (edit_record("messages[2].timeOffset", -5), "train_data.jsonl",
                      r"line 2, field 'messages\[2\]\.timeOffset': expected a finite number of seconds, 0 or more"),
    "answer-out-of-scale": (edit_record("initiatorQuestions.102.liked", 5), "train_data.jsonl",
                            r"line 2, field 'initiatorQuestions\.102\.liked': expected 0, 1 or 2, got 5"),
    "answer-boolean": (edit_record("respondentQuestions.101.seen", True, name="test_data.jsonl", line=1),
                       "test_data.jsonl", r"line 1, field 'respondentQuestions\.101\.seen': expected 0, 1 or 2"),
    "answers-a-list": (edit_record("initiatorQuestions.101", [0, 1, 1]), "train_data.jsonl",
                       r"line 2, field 'initiatorQuestions\.101': expected an object"),
    "duplicate-dialogue": (edit_record("conversationId", "1", line=3), "train_data.jsonl",
                           r"line 3, field 'conversationId': '1' is already the id of the dialogue at line 1"),
    "test-dialogue-in-train": (edit_record("conversationId", "2", name="test_data.jsonl", line=2), "test_data.jsonl",
                               r"line 2, field 'conversationId': '2' is already the id .* in .*train_data\.jsonl"),
}

OPENDIALKG = {
    "missing-dialogues": (lambda root: (root / "opendialkg.csv").unlink(), "<root>", r"missing opendialkg\.csv"),
    "non-utf8-dialogues": (edit_bytes("opendialkg.csv", lambda b: b.replace(b"Dune 2", b"Dune \xff2")),
                           "opendialkg.csv", r"not UTF-8"),
    "non-utf8-entities": (set_bytes("opendialkg_entities.txt", b"Dune\n\xc3(\n"), "opendialkg_entities.txt",
                          r"line 2: not UTF-8"),
    "empty-entities": (set_bytes("opendialkg_entities.txt", b"\n"), "opendialkg_entities.txt", r"no entities"),
    "wrong-header": (edit_bytes("opendialkg.csv", lambda b: b.replace(b"User Rating", b"Rating", 1)),
                     "opendialkg.csv", r"field 'header': expected the header"),
    "header-only": (set_bytes("opendialkg.csv", b"Messages,User Rating,Assistant Rating\n"), "opendialkg.csv",
                    r"no dialogues"),
    "two-columns": (edit_bytes("opendialkg.csv", lambda b: b + b'"[]",{}\n'), "opendialkg.csv",
                    r"line 7: expected 3 columns"),
    "messages-not-json": (edit_bytes("opendialkg.csv", lambda b: b + b'"[{oops",{},{}\n'), "opendialkg.csv",
                          r"line 7, field 'Messages': not valid JSON"),
    "messages-deep-json": (edit_bytes("opendialkg.csv", lambda b: b + b'"' + b"[" * 100_000 + b'",{},{}\n'),
                           "opendialkg.csv", r"line 7, field 'Messages': JSON nested too deeply"),
    "messages-an-object": (edit_bytes("opendialkg.csv", lambda b: b + b'"{""a"": 1}",{},{}\n'), "opendialkg.csv",
                           r"line 7, field 'Messages': expected a JSON list of actions"),
    "action-a-string": (okg_csv(["hello"]), "opendialkg.csv", r"line 2, field 'Messages\[0\]': expected an action"),
    "unknown-sender": (okg_action(0, sender="bot"), "opendialkg.csv",
                       r"line 2, field 'Messages\[0\]\.sender': expected sender 'user' or 'assistant'"),
    "walk-without-path": (okg_action(1, metadata={"text": "x"}), "opendialkg.csv",
                          r"line 2, field 'Messages\[1\]': expected metadata\.path"),
    "walk-path-a-number": (okg_action(1, metadata={"path": 3}), "opendialkg.csv",
                           r"line 2, field 'Messages\[1\]': expected metadata\.path"),
    "unknown-type": (okg_action(2, type="video"), "opendialkg.csv",
                     r"line 2, field 'Messages\[2\]\.type': expected type 'chat' or 'action'"),
    "message-a-number": (okg_action(0, message=42), "opendialkg.csv",
                         r"line 2, field 'Messages\[0\]\.message': expected a string"),
    "rating-99": (okg_csv(user='{"dialog_rating": "99"}'), "opendialkg.csv",
                  r"line 1, field 'User Rating\.dialog_rating': expected a rating from 1 to 5"),
    "rating-negative": (okg_csv(user='{"dialog_rating": -7}'), "opendialkg.csv", r"expected a rating from 1 to 5"),
    "rating-nan": (okg_csv(user='{"dialog_rating": "NaN"}'), "opendialkg.csv", r"expected a rating from 1 to 5"),
    "rating-a-word": (okg_csv(user='{"dialog_rating": "four"}'), "opendialkg.csv", r"expected a rating from 1 to 5"),
    "rating-a-list": (okg_csv(user="[4]"), "opendialkg.csv", r"line 1, field 'User Rating': expected a JSON object"),
    "assistant-rating-0": (okg_csv(assistant='{"dialog_rating": "0"}'), "opendialkg.csv",
                           r"field 'Assistant Rating\.dialog_rating': expected a rating from 1 to 5"),
    "nothing-recommended": (okg_csv([{"message": "hi", "type": "chat", "sender": "user"}] * 2), "opendialkg.csv",
                            None),  # still loads: the other rows recommend; see the next case
    "no-recommendation-anywhere": (lambda root: (root / "opendialkg.csv").write_text(
        okg_rows([[{"message": f"hi {n}", "type": "chat", "sender": "user"}] for n in range(4)])),
        "opendialkg.csv", r"no item is recommended"),
}


def run_stats(dataset: str, root: Path, capsys) -> tuple[int, str]:
    code = main(["data", "stats", "--dataset", dataset, "--root", str(root)])
    return code, capsys.readouterr().err


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, so that "nothing left behind" is about this case alone."""
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def check_case(dataset, make, case, tmp_path, capsys, cache):
    break_it, name, expected = case
    root = make(tmp_path / dataset)
    break_it(root)
    code, err = run_stats(dataset, root, capsys)
    if expected is None:  # a documented acceptance
        assert code == 0, err
        return
    assert code == 2, f"exit code {code}: {err}"
    assert "Traceback" not in err
    where = str(root) if name == "<root>" else str(root / name)
    assert err.count("\n") == 1 and where in err, err
    assert re.search(expected, err), err
    # nothing converted is left behind: no cache entry, no temporary folder
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert not left, left


def test_the_untouched_folders_load(tmp_path, capsys):
    for dataset, make in (("redial", make_redial), ("opendialkg", make_opendialkg)):
        code, err = run_stats(dataset, make(tmp_path / dataset), capsys)
        assert code == 0, err


@pytest.mark.parametrize("case", list(REDIAL), ids=list(REDIAL))
def test_a_broken_redial_folder_ends_with_a_clear_error(case, tmp_path, capsys, own_cache):
    check_case("redial", make_redial, REDIAL[case], tmp_path, capsys, own_cache)


@pytest.mark.parametrize("case", list(OPENDIALKG), ids=list(OPENDIALKG))
def test_a_broken_opendialkg_folder_ends_with_a_clear_error(case, tmp_path, capsys, own_cache):
    check_case("opendialkg", make_opendialkg, OPENDIALKG[case], tmp_path, capsys, own_cache)
