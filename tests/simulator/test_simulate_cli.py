import json

import pytest

from crslight.simulator.cli import simulate

KEYS = {"dataset", "split", "policy", "seed", "max_turns", "episodes", "acceptance_rate", "mean_satisfaction",
        "mean_turns", "endings", "mean_dwell_time", "mean_sentiment"}


def test_simulate_synthetic_popularity_beats_random():
    random = simulate("synthetic", None, "random", 300, 5, 0, "test")
    popular = simulate("synthetic", None, "popularity", 300, 5, 0, "test")
    assert set(random) == KEYS and json.dumps(random)
    assert sum(random["endings"].values()) == random["episodes"] == 300
    assert random["acceptance_rate"] == random["endings"]["accept"] / 300
    assert 1.0 <= random["mean_satisfaction"] <= 5.0 and 1.0 <= random["mean_turns"] <= 5.0
    assert popular["acceptance_rate"] > random["acceptance_rate"] + 0.05
    assert simulate("synthetic", None, "random", 300, 5, 0, "test") == random  # seeded


def test_simulate_redial_popularity_beats_random(redial_root):
    random = simulate("redial", str(redial_root), "random", 200, 5, 0, "test")
    popular = simulate("redial", str(redial_root), "popularity", 200, 5, 0, "test")
    assert popular["acceptance_rate"] > random["acceptance_rate"]
    assert 5 < random["mean_dwell_time"] < 60  # seconds, from the real-gap fit


def test_unknown_policy_folder_fails_loudly(tmp_path):
    with pytest.raises(ValueError, match="no such model folder"):
        simulate("synthetic", None, str(tmp_path / "no-such-model"), 2, 2, 0, "test")
