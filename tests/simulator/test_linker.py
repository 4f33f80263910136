import pytest

from crslight.simulator.linker import ItemLinker, normalise, split_name


@pytest.fixture
def linker(catalogue):
    return ItemLinker.from_catalogue({k: [r[k] for r in catalogue] for k in catalogue[0]})


def test_normalise_folds_case_punctuation_accents_and_ampersand():
    assert normalise("Schindler's List") == "schindlers list"
    assert normalise("Mission: Impossible") == "mission impossible"
    assert normalise("Amélie") == "amelie"
    assert normalise("Fast & Furious") == "fast and furious"


def test_split_name_reads_year_and_qualifier():
    assert split_name("Police Academy (1984)") == ("Police Academy", 1984, None)
    assert split_name("Dark Matter (Drama Film)") == ("Dark Matter", None, "Drama Film")
    assert split_name("Perth") == ("Perth", None, None)


def test_year_is_optional(linker):
    assert linker.link("Have you seen Police Academy?") == ["1"]
    assert linker.link("Have you seen Police Academy (1984)?") == ["1"]


def test_case_and_punctuation_insensitive(linker):
    assert linker.link("try schindlers list tonight") == ["6"]
    assert linker.link("SPIDER MAN HOMECOMING is fun") == ["7"]
    assert linker.link("mission impossible, any of them") == ["12"]
    assert linker.link("I loved Amelie (2001)") == ["9"]


def test_ambiguous_title_prefers_written_year_else_most_popular(linker):
    assert linker.link("The Mummy (2017) was weak") == ["3"]
    assert linker.link("The Mummy (1999) is a classic") == ["2"]
    assert linker.link("I watched The Mummy yesterday") == ["2"]  # 1999 is the more popular one
    assert linker.link("The Mummy (1950) then") == ["2"]  # a year that matches none: most popular, year not consumed


def test_fuzzy_misspelling_and_missing_stopword(linker):
    links = linker.link_spans("I loved Polise Academy as a kid")
    assert [link.item for link in links] == ["1"]
    assert 0.85 < links[0].score < 1.0
    assert linker.link("Silence of Lambs scared me") == ["8"]
    assert linker.link("Spider-Man Homecomming (2017)") == ["7"]


def test_fuzzy_ignores_near_miss_phrases_and_can_be_turned_off(catalogue):
    linker = ItemLinker.from_catalogue({k: [r[k] for r in catalogue] for k in catalogue[0]}, fuzzy_threshold=None)
    assert linker.link("I loved Polise Academy") == []
    fuzzy = ItemLinker([r["item_id"] for r in catalogue], [r["name"] for r in catalogue])
    assert fuzzy.link("Thanks, good bye!") == []  # one letter from "Good Boy!" but a short title: never fuzzy


def test_short_titles_need_year_or_capitalised_mention(linker):
    assert linker.link("I loved it, really") == []
    assert linker.link("It (2017) is scary") == ["4"]
    assert linker.link("frozen peas") == []
    assert linker.link("Frozen is great") == []  # sentence start is no evidence
    assert linker.link("My kids love Frozen") == ["5"]
    assert linker.link("My kids love FROZEN") == []  # shouting, not a title


def test_spans_point_into_the_original_text(linker):
    text = "Amélie (2001) and Get Out"
    spans = linker.link_spans(text)
    assert [text[s.start : s.end] for s in spans] == ["Amélie (2001", "Get Out"]
    assert [s.item for s in spans] == ["9", "10"]


def test_longest_and_dated_titles_win_overlaps():
    linker = ItemLinker(["a", "b", "c"], ["The Star (2017)", "Star Wars (1977)", "Wars (2000)"], [5, 1, 1])
    assert linker.link("Do you like the Star Wars movies?") == ["b"]


def test_real_redial_test_split_precision_recall(redial_root):
    """Every recommender turn of the real ReDial test split, linked against its catalogue (the time it takes is
    measured by ``benchmarks/simulator_stats.py``)."""
    from crslight.data import load_corpus

    corpus = load_corpus("redial", redial_root, "test")
    linker = ItemLinker.from_catalogue(corpus.catalogue)
    turns = [t for ts in corpus.dialogues["turns"] for t in ts if t["role"] == "recommender"]
    predicted = linker.link_batch([t["text"] for t in turns])
    tp = sum(len(set(p) & set(t["items"])) for p, t in zip(predicted, turns, strict=True))
    precision = tp / sum(len(set(p)) for p in predicted)
    recall = tp / sum(len(set(t["items"])) for t in turns)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
