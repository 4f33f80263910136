import json

import pytest

from crslight.data import DataError, load_corpus
from crslight.data.errors import LoadReport
from crslight.data.redial import convert_dialogue, is_valid


def record(**overrides):
    raw = {
        "conversationId": "1",
        "initiatorWorkerId": 10,
        "respondentWorkerId": 20,
        "movieMentions": {"111": "Heat  (1995)", "222": "Up (2009)"},
        "messages": [
            {"messageId": 1, "text": "hi, I loved @111", "senderWorkerId": 10, "timeOffset": 0},
            {"messageId": 2, "text": "and thrillers", "senderWorkerId": 10, "timeOffset": 5},
            {"messageId": 3, "text": "try @222 or @999", "senderWorkerId": 20, "timeOffset": 30},
            {"messageId": 4, "text": "thanks!", "senderWorkerId": 10, "timeOffset": 70},
        ],
        "initiatorQuestions": [],
        "respondentQuestions": {"222": {"suggested": 1, "seen": 0, "liked": 1}},
    }
    raw.update(overrides)
    return raw


def test_mentions_replaced_and_turns_merged():
    report = LoadReport()
    d = convert_dialogue(record(), {"111": "Heat (1995)", "222": "Up (2009)"}, "f.jsonl", 1, report)
    roles = [t["role"] for t in d["turns"]]
    assert roles == ["seeker", "recommender", "seeker"]
    first = d["turns"][0]
    assert first["text"] == "hi, I loved Heat (1995) and thrillers"  # title from movieMentions, spaces normalised
    assert first["items"] == ["111"]
    assert (first["time"], first["end_time"]) == (0.0, 5.0)
    # @999 is in neither the dialogue nor the catalogue: kept as written, not an item, counted
    assert d["turns"][1]["text"] == "try Up (2009) or @999"
    assert d["turns"][1]["items"] == ["222"]
    assert report.unknown_items == 1
    # initiatorQuestions is [], so the recommender's answers are used
    assert d["labels"] == [{"item": "222", "suggested": 1, "seen": 0, "liked": 1}]


def test_real_test_split(redial_root):
    corpus = load_corpus("redial", redial_root, "test")
    stats = corpus.stats()
    assert stats["dialogues"] == 1342
    assert stats["items"] == 6924
    assert stats["unknown_items"] == 0 and stats["bad_rows"] == 0
    # the CRSLab/UniCRS protocol's sample count for ReDial test is close to 4,900
    assert 4800 < stats["rec_samples"] < 5000
    assert all("@" not in t["text"] or not t["items"] for ts in corpus.dialogues["turns"][:50] for t in ts)
    sample = corpus.rec_samples[0]
    assert corpus.dialogues[sample.dialogue]["turns"][sample.turn]["role"] == "recommender"


def test_valid_split_is_deterministic_and_disjoint(redial_root):
    train = load_corpus("redial", redial_root, "train")
    valid = load_corpus("redial", redial_root, "valid")
    assert set(train.dialogues["dialogue_id"]).isdisjoint(valid.dialogues["dialogue_id"])
    assert all(is_valid(i) for i in valid.dialogues["dialogue_id"])
    assert len(train.dialogues) + len(valid.dialogues) == 3006
    again = load_corpus("redial", redial_root, "valid", cache=False)
    assert again.dialogues["dialogue_id"] == valid.dialogues["dialogue_id"]


def make_layout(dst, edit_line=None, line_no=2):
    """A hand-made ReDial folder: five train dialogues (ids 1-5), four test dialogues (ids 6-9), a three-movie
    catalogue; ``edit_line`` rewrites train line ``line_no``."""
    dst.mkdir()
    movies = "movieId,movieName,nbMentions\n111,Heat (1995),12\n222,Up (2009),7\n333,Alien (1979),3\n"
    (dst / "movies_with_mentions.csv").write_text(movies)
    (dst / "test_data.jsonl").write_text("".join(json.dumps(record(conversationId=str(i))) + "\n" for i in range(6, 10)))
    lines = [json.dumps(record(conversationId=str(i))) for i in range(1, 6)]
    if edit_line is not None:
        lines[line_no - 1] = edit_line(lines[line_no - 1])
    (dst / "train_data.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def test_truncated_line_names_file_and_line(tmp_path):
    root = make_layout(tmp_path / "r", edit_line=lambda s: s[: len(s) // 2])
    with pytest.raises(DataError, match=r"train_data\.jsonl, line 2: not valid JSON"):
        load_corpus("redial", root, "train")
    # nothing was half-written to the cache: the same folder fails again the same way
    with pytest.raises(DataError):
        load_corpus("redial", root, "train")
    # the documented option skips the line and reports it
    corpus = load_corpus("redial", root, "train", skip_bad_rows=True)
    assert corpus.report.bad_rows == 1
    assert len(corpus.dialogues) + len(load_corpus("redial", root, "valid", skip_bad_rows=True).dialogues) == 4


def test_wrong_type_names_the_field(tmp_path):
    def bad(line):
        raw = json.loads(line)
        raw["messages"][1]["timeOffset"] = "soon"
        return json.dumps(raw)

    root = make_layout(tmp_path / "r", edit_line=bad, line_no=3)
    with pytest.raises(DataError, match=r"line 3, field 'messages\[1\]\.timeOffset': expected a number"):
        load_corpus("redial", root, "train")


def test_bad_questionnaire_value(tmp_path):
    def bad(line):
        raw = json.loads(line)
        raw["initiatorQuestions"] = {"1": {"suggested": 1, "seen": 7, "liked": 1}}
        return json.dumps(raw)

    root = make_layout(tmp_path / "r", edit_line=bad, line_no=1)
    with pytest.raises(DataError, match=r"line 1, field 'initiatorQuestions\.1\.seen': expected 0, 1 or 2"):
        load_corpus("redial", root, "train")


def test_missing_file_lists_expected(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "test_data.jsonl").write_text("")
    with pytest.raises(DataError, match="missing train_data.jsonl, movies_with_mentions.csv.*official layout"):
        load_corpus("redial", root, "test")


def _edit_file(root, name, edit):
    path = root / name
    path.write_bytes(edit(path.read_bytes()))


def _second_record_with(**fields):
    def edit(line):
        raw = json.loads(line)
        raw.update(fields)
        return json.dumps(raw)
    return edit


@pytest.mark.parametrize(
    ("name", "edit", "expected"),
    [
        ("train_data.jsonl", lambda b: b.replace(b"\n", b"\n\xff\xfe", 1),
         r"train_data\.jsonl, line 2: not UTF-8 text: byte 0xff at column 1"),
        ("train_data.jsonl", lambda b: b + b"[" * 100_000 + b"\n", r"train_data\.jsonl, line 6: JSON nested too deeply"),
        ("train_data.jsonl", lambda b: b"\n", r"train_data\.jsonl: no dialogues"),
        ("test_data.jsonl", lambda b: b"", r"test_data\.jsonl: no dialogues"),
        ("movies_with_mentions.csv", lambda b: b.split(b"\n")[0] + b"\n", r"movies_with_mentions\.csv: no movies"),
        ("movies_with_mentions.csv", lambda b: b[:40] + b"\xe9" + b[40:], r"movies_with_mentions\.csv, line \d+: not UTF-8"),
    ],
    ids=["non-utf8", "deep-json", "empty-train", "empty-test", "header-only-catalogue", "non-utf8-catalogue"],
)
def test_unreadable_or_empty_files_name_the_file_and_line(tmp_path, name, edit, expected):
    root = make_layout(tmp_path / "r")
    _edit_file(root, name, edit)
    with pytest.raises(DataError, match=expected):
        load_corpus("redial", root, "train")


def test_a_dialogue_twice_or_a_test_dialogue_in_train_is_an_error(tmp_path):
    first = "1"  # train line 1
    root = make_layout(tmp_path / "r", edit_line=_second_record_with(conversationId=first))
    with pytest.raises(DataError, match=rf"train_data\.jsonl, line 2, field 'conversationId': '{first}' is already the "
                                        r"id of the dialogue at line 1 earlier in this file"):
        load_corpus("redial", root, "train")
    test_id = "9"  # test line 4
    root = make_layout(tmp_path / "leak", edit_line=_second_record_with(conversationId=test_id))
    with pytest.raises(DataError, match=rf"test_data\.jsonl, line 4, field 'conversationId': '{test_id}' is already "
                                        r"the id of the dialogue at line 2 in .*train_data\.jsonl"):
        load_corpus("redial", root, "train")


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), -3])
def test_a_time_offset_must_be_finite_and_not_negative(tmp_path, offset):
    def bad(line):
        raw = json.loads(line)
        raw["messages"][1]["timeOffset"] = offset
        return json.dumps(raw)

    root = make_layout(tmp_path / "r", edit_line=bad)
    with pytest.raises(DataError, match=r"line 2, field 'messages\[1\]\.timeOffset': expected a finite number"):
        load_corpus("redial", root, "train")
