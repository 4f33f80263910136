"""Tests of the template plugin: hand-computed values, and that crslight finds it once installed."""

import math

import pytest
import torch
from crslight.signals import SignalBatch

from crslight_example import MeanReplyLength, QuestionRateSignal


def batch_of(replies: list[str]) -> SignalBatch:
    b = len(replies)
    return SignalBatch(context=[[] for _ in replies], reply=replies, items=[[] for _ in replies],
                       item_names=[[] for _ in replies], reaction=[None] * b, dwell_time=[math.nan] * b,
                       labels=[{} for _ in replies], rating=[math.nan] * b, accepted=[math.nan] * b,
                       continues=[False] * b)


def test_question_rate_hand_values():
    values = QuestionRateSignal()(batch_of(["Have you seen Alien? It is great.", "Try Heat!", ""]))
    # 1 question of 2 sentences; 0 of 1; an empty reply has no sentence → NaN
    assert values[:2].tolist() == [0.5, 0.0]
    assert math.isnan(values[2])


def test_question_rate_min_words_skips_short_sentences():
    values = QuestionRateSignal(min_words=2)(batch_of(["Hi! What genre do you like?"]))
    assert values.tolist() == [1.0]  # "Hi!" is ignored


def test_mean_reply_length_merges_like_ddp():
    whole, a, b = MeanReplyLength(), MeanReplyLength(), MeanReplyLength()
    whole.update(["one two", "three four five", "six"])
    a.update(["one two", "three four five"])
    b.update(["six"])
    a.merge_state(b)
    assert whole.compute() == pytest.approx(2.0) and a.compute() == pytest.approx(2.0)


def test_registered_with_crslight():
    from crslight.plugins import get, load_plugins

    load_plugins(reload=True)
    assert get("signals", "QuestionRateSignal") is QuestionRateSignal
    assert get("metrics", "MeanReplyLength") is MeanReplyLength
    assert isinstance(QuestionRateSignal()(batch_of(["Why?"])), torch.Tensor)


def _chat_csv(root):
    (root / "items.csv").write_text("item_id,title,genre\nm1,Heat (1995),crime\nm2,Up (2009),animation\n")
    rows = ["conversation_id,role,text,items"]
    for c in range(40):
        rows += [f"c{c},user,I want something like Heat,m1", f"c{c},agent,Try Up (2009),m2", f"c{c},user,thanks,"]
    (root / "messages.csv").write_text("\n".join(rows) + "\n")
    return root


def test_chat_csv_loads_through_crslight_by_its_entry_point_name(tmp_path, monkeypatch):
    from crslight.data import load_corpus

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    root = _chat_csv(tmp_path)
    corpora = {s: load_corpus("chat_csv", root, s) for s in ("train", "valid", "test")}
    assert sum(len(c.dialogues) for c in corpora.values()) == 40 and all(len(c.dialogues) for c in corpora.values())
    train = corpora["train"]
    assert train.dialogues[0]["turns"][1] | {"time": 0, "end_time": 0} == {
        "role": "recommender", "text": "Try Up (2009)", "items": ["m2"], "time": 0, "end_time": 0}
    assert train.catalogue["attributes"] == ["genre=crime", "genre=animation"]
    assert {s.item for s in train.rec_samples} == {"m2"}


def test_chat_csv_names_the_file_row_and_field_of_a_bad_role(tmp_path, monkeypatch):
    from crslight.data import DataError, load_corpus

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    root = _chat_csv(tmp_path)
    with open(root / "messages.csv", "a") as f:
        f.write("c1,robot,hello,\n")
    with pytest.raises(DataError, match=r"messages.csv, line 121, field 'role': role must be 'user' or 'agent'"):
        load_corpus("chat_csv", root, "train")
    assert len(load_corpus("chat_csv", root, "train", skip_bad_rows=True).dialogues) > 0
