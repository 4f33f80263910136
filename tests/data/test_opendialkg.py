import json
import math
import os
import subprocess
import sys
import zlib
from collections import Counter

import pytest

from crslight.data import DataError, load_corpus
from crslight.data.errors import LoadReport
from crslight.data.opendialkg import convert_row, recommended_only, split_of
from crslight.schema import turn


def test_row_conversion_rules():
    actions = [
        {"type": "chat", "sender": "user", "message": "Do you like The Namesake?"},
        {"type": "action", "sender": "assistant", "action_id": "kgwalk/choose_path",
         "metadata": {"path": [-1, [["The Namesake", "Next in series", "Unaccustomed Earth"],
                                    ["Unaccustomed Earth", "written_by", "Jhumpa Lahiri"]], "..."]}},
        {"type": "action", "sender": "user", "action_id": "meta_thread/send_meta_message",
         "metadata": {"text": "you there?"}},
        {"type": "chat", "sender": "assistant", "message": "Yes! Try Unaccustomed Earth."},
        {"type": "chat", "sender": "assistant", "message": "It is lovely."},
    ]
    entities = {"The Namesake", "Unaccustomed Earth", "Jhumpa Lahiri"}
    d = convert_row([json.dumps(actions), '{"dialog_rating": "4"}', "{}"], "x.csv", 7, entities, LoadReport())
    assert [t["role"] for t in d["turns"]] == ["seeker", "recommender"]  # meta skipped, assistant merged
    assert d["turns"][0]["items"] == ["The Namesake"]  # the walk's start, named by the seeker
    assert d["turns"][1]["items"] == ["Unaccustomed Earth"]  # reached and named; Jhumpa Lahiri is not named
    assert d["turns"][1]["text"] == "Yes! Try Unaccustomed Earth. It is lovely."
    assert d["rating"] == 4.0 and d["dialogue_id"] == "odkg-7"
    assert math.isnan(d["turns"][0]["time"])


def test_all_real_dialogues_load_without_errors(opendialkg_root):
    counts = {s: load_corpus("opendialkg", opendialkg_root, s, catalogue="entities").stats()
              for s in ("train", "valid", "test")}
    assert sum(c["dialogues"] for c in counts.values()) == 3711
    assert all(c["bad_rows"] == 0 for c in counts.values())
    assert counts["test"]["rec_samples"] > 400 and counts["test"]["items"] > 100_000


def test_recommended_catalogue_keeps_the_entities_recommender_turns_mention():
    splits = {"train": [{"turns": [turn("seeker", "I loved Dune", ["Dune"]),
                                   turn("recommender", "Try Hyperion by Dan Simmons", ["Hyperion", "Dan Simmons"])]}],
              "valid": [], "test": [{"turns": [turn("seeker", "Any Herbert?", ["Frank Herbert"]),
                                               turn("recommender", "Dune", ["Dune"])]}]}
    catalogue = [{"item_id": n} for n in ("Frank Herbert", "Hyperion", "Dune", "Dan Simmons", "Ilium")]
    splits, kept = recommended_only(splits, catalogue)
    assert [row["item_id"] for row in kept] == ["Hyperion", "Dune", "Dan Simmons"]  # entity-list order
    assert splits["train"][0]["turns"][0]["items"] == ["Dune"]  # recommended in the test split
    assert splits["test"][0]["turns"][0]["items"] == []  # Frank Herbert is never recommended


def test_published_catalogue_is_the_default_on_the_real_data(opendialkg_root):
    train = load_corpus("opendialkg", opendialkg_root, "train")
    test = load_corpus("opendialkg", opendialkg_root, "test")
    assert 1_000 < len(train.catalogue) < 20_000
    recommended = {i for ts in test.dialogues["turns"] for t in ts if t["role"] == "recommender" for i in t["items"]}
    assert recommended <= set(test.item_index)
    assert all(i in test.item_index for ts in test.dialogues["turns"] for t in ts for i in t["items"])
    with pytest.raises(ValueError, match="unknown OpenDialKG catalogue 'all'"):
        load_corpus("opendialkg", opendialkg_root, "test", catalogue="all")


def test_split_is_a_hash_of_the_content():
    """``split_of`` is the CRC-32 of the cell modulo 10 (0: test, 1: valid): fixed values for known cells, the same in
    processes with different string-hash seeds, 10 / 10 / 80 % over many cells."""
    # zlib.crc32: b"hello" 907060870 -> 0, b"b" 1908338681 -> 1, b"3" 1842515611 -> 1, b"abc" 891568578 -> 8
    assert [split_of(c) for c in ("hello", "b", "3", "abc", "[]")] == ["test", "valid", "valid", "train", "train"]
    cells = [json.dumps([{"type": "chat", "sender": "user", "message": f"Do you know Dune {i}?"}]) for i in range(4000)]
    expected = ["test" if zlib.crc32(c.encode()) % 10 == 0 else "valid" if zlib.crc32(c.encode()) % 10 == 1
                else "train" for c in cells]
    assert [split_of(c) for c in cells] == expected
    code = "import sys; from crslight.data.opendialkg import split_of; print(' '.join(map(split_of, sys.argv[1:])))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, *cells[:50]], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()
        assert out == expected[:50]
    counts = Counter(expected)
    assert abs(counts["test"] / 4000 - 0.1) < 0.02 and abs(counts["valid"] / 4000 - 0.1) < 0.02


def kg_files(root, entities: str = "Dune\nFrank Herbert\nHyperion\n"):
    """A hand-made OpenDialKG folder without its dialogues: the entity, relation and triple files."""
    root.mkdir()
    (root / "opendialkg_entities.txt").write_text(entities)
    (root / "opendialkg_relations.txt").write_text("written_by\n")
    (root / "opendialkg_triples.txt").write_text("Dune\twritten_by\tFrank Herbert\n")
    return root


def test_bad_json_names_row_and_field(tmp_path):
    root = kg_files(tmp_path / "o")
    (root / "opendialkg.csv").write_text(
        'Messages,User Rating,Assistant Rating\n"[]",{},{}\n"[{""type"": ""chat""",{},{}\n'
    )
    with pytest.raises(DataError, match=r"opendialkg\.csv, line 2, field 'Messages': not valid JSON"):
        load_corpus("opendialkg", root, "train")
    # skipped, one empty dialogue is left: no recommendation, so only the catalogue of every entity can be ranked
    assert load_corpus("opendialkg", root, "train", skip_bad_rows=True, catalogue="entities").report.bad_rows == 1


@pytest.mark.parametrize("rating", ['"99"', '"-7"', '"NaN"', '"four"'])
def test_a_rating_outside_1_to_5_names_row_and_field(tmp_path, rating):
    root = kg_files(tmp_path / "o")
    cell = '"{""dialog_rating"": ' + rating.replace('"', '""') + '}"'
    (root / "opendialkg.csv").write_text(f'Messages,User Rating,Assistant Rating\n"[]",{{}},{{}}\n"[]",{cell},{{}}\n')
    with pytest.raises(DataError, match=r"line 2, field 'User Rating\.dialog_rating': expected a rating from 1 to 5"):
        load_corpus("opendialkg", root, "train")


def test_empty_or_non_utf8_files_name_the_file(tmp_path):
    root = kg_files(tmp_path / "o")
    (root / "opendialkg_entities.txt").write_bytes(b"Heat\nAmerican Beauty \xff\n")
    (root / "opendialkg.csv").write_text("Messages,User Rating,Assistant Rating\n")
    with pytest.raises(DataError, match=r"opendialkg_entities\.txt, line 2: not UTF-8 text: byte 0xff at column 17"):
        load_corpus("opendialkg", root, "train")
    (root / "opendialkg_entities.txt").write_text("Heat\n")
    with pytest.raises(DataError, match=r"opendialkg\.csv: no dialogues"):
        load_corpus("opendialkg", root, "train")
