"""The synthetic scenario exported as interaction logs (``crslight data export-logs``) and read back through the
``logs`` loader gives what the synthetic loader gives: the same dialogues, counts and signal values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crslight.cli import main
from crslight.data import load_corpus
from crslight.signals import (
    AcceptanceSignal,
    DwellTimeSignal,
    EngagementSignal,
    SentimentShiftSignal,
    transitions,
)

SIZES = {"n_dialogues": 60, "n_items": 80, "n_eval_dialogues": 20}
COUNTS = ("dialogues", "turns", "recommender_turns", "rec_samples", "rec_samples_new", "items", "items_mentioned",
          "labelled_items", "rated_dialogues")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "logs"
    assert main(["data", "export-logs", "--dataset", "synthetic", "--out", str(out), "--n-dialogues", "60",
                 "--n-items", "80", "--n-eval-dialogues", "20"]) == 0
    return out


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_exported_logs_read_back_as_the_synthetic_corpus(exported, split):
    synthetic = load_corpus("synthetic", split=split, **SIZES)
    logs = load_corpus("logs", exported, split)
    a, b = synthetic.stats(), logs.stats()
    assert {k: a[k] for k in COUNTS} == {k: b[k] for k in COUNTS}
    assert a["dialogues"] == (60 if split == "train" else 20) and b["split_rule"] == f"folder per split ({100})"
    assert logs.catalogue.to_list() == synthetic.catalogue.to_list()
    for x, y in zip(synthetic.dialogues, logs.dialogues, strict=True):
        assert (x["dialogue_id"], x["turns"], x["persona"], x["rating"]) == (
            y["dialogue_id"], y["turns"], y["persona"], y["rating"])
        # the questionnaire: suggested and liked exactly; "seen" only where the seeker said so (2 = did not say)
        assert [(lab["item"], lab["suggested"], lab["liked"], lab["seen"] == 1) for lab in x["labels"]] == [
            (lab["item"], lab["suggested"], lab["liked"], lab["seen"] == 1) for lab in y["labels"]]
    # the events say what the seeker did: every suggestion shown, then seen, accepted or rejected
    events = [e["type"] for es in logs.dialogues["events"] for e in es]
    assert events.count("shown") == b["rec_samples"]
    assert events.count("accepted") + events.count("rejected") + events.count("seen") == events.count("shown")
    accepted_dialogues = sum(any(t["text"] == "Enjoy the movie! Anything else I can help with?" for t in ts)
                             for ts in synthetic.dialogues["turns"])
    assert events.count("accepted") == accepted_dialogues > 0


@pytest.mark.parametrize("split", ["train", "test"])
def test_exported_logs_give_the_same_signal_values(exported, split):
    synthetic = transitions(load_corpus("synthetic", split=split, **SIZES))
    logs = transitions(load_corpus("logs", exported, split))
    assert len(synthetic) == len(logs) > 50
    for signal in (DwellTimeSignal(), EngagementSignal(), AcceptanceSignal(), AcceptanceSignal(seen_weight=0.5),
                   SentimentShiftSignal()):
        x, y = signal(synthetic), signal(logs)
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()), signal.name
        assert not x.isnan().all(), signal.name  # the comparison is about real values


def test_the_export_is_the_documented_format(exported):
    first = json.loads((exported / "train" / "conversations.jsonl").read_text().splitlines()[0])
    assert first["conversation_id"] == "syn-train-0" and first["turns"][0]["timestamp"] == 1_700_000_000
    assert {e["type"] for e in first["events"]} <= {"shown", "accepted", "rejected", "seen", "rated"}
    rated = [e for e in first["events"] if e["type"] == "rated"]
    assert all(e["scale"] == [0, 1] and e["source"] == "questionnaire" for e in rated)
    header = (exported / "catalogue.csv").read_text().splitlines()[0]
    assert header == "id,title,popularity,genre,mood,era"
    assert not math.isnan(first["rating"])


def test_export_never_overwrites(exported, capsys):
    before = sorted(p.name for p in exported.rglob("*"))
    assert main(["data", "export-logs", "--dataset", "synthetic", "--out", str(exported)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in exported.rglob("*")) == before


def test_simulate_meets_the_users_of_a_logs_folder(exported, capsys):
    """``crslight simulate --dataset logs``: the logs' test conversations as grounded users (what each one took up,
    had seen or disliked, from the events); without ``--root`` the command names what is missing."""
    assert main(["simulate", "--dataset", "logs", "--root", str(exported), "--policy", "popularity",
                 "--episodes", "20", "--max-turns", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dataset"] == "logs" and summary["episodes"] == 20
    assert sum(summary["endings"].values()) == 20 and 0 <= summary["acceptance_rate"] <= 1
    assert main(["simulate", "--dataset", "logs", "--policy", "popularity"]) == 2  # no --root: named, exit 2
    assert "--root is required for logs" in capsys.readouterr().err
