import numpy as np
import pytest

from crslight.schema import turn
from crslight.simulator.grounded import SENTIMENT, TEMPLATES, GroundedSimulator, attribute_feedback, compose


def redial_like() -> dict:
    """Seeker liked Get Out (10) unseen: the target; saw Frozen (5) and liked it; did not like It (4)."""
    return {
        "dialogue_id": "d1",
        "turns": [
            turn("seeker", "Hi! I want something scary.", time=0),
            turn("recommender", "Sure, what did you like lately?", time=10),
            turn("seeker", "I liked Frozen (2013).", ["5"], time=20),
            turn("recommender", "Then try Get Out (2017)!", ["10"], time=30),
            turn("seeker", "Sounds great, thanks!", ["10"], time=45),
        ],
        "labels": [
            {"item": "10", "suggested": 1, "seen": 0, "liked": 1},
            {"item": "5", "suggested": 0, "seen": 1, "liked": 1},
            {"item": "4", "suggested": 1, "seen": 0, "liked": 0},
        ],
    }


@pytest.fixture
def sim(catalogue):
    return GroundedSimulator(catalogue, leave_step=0.0)


def react(sim, state, text, items, seed=0):
    return sim.react(state, [], text, items, np.random.default_rng(seed))


def test_hidden_state_from_questionnaire(sim):
    state = sim.start(redial_like(), 3, np.random.default_rng(0))
    assert state.targets == ["10"] and state.seen == {"5"} and state.disliked == {"4"} and state.liked == ["5"]


def test_prefix_points_stop_before_the_target_is_named(sim):
    assert sim.prefix_points(redial_like()) == [1, 3]
    dialogue = redial_like()
    dialogue["labels"] = dialogue["labels"][1:]  # no target: no episode can start here
    assert sim.prefix_points(dialogue) == []


def test_accepts_a_liked_target(sim):
    state = sim.start(redial_like(), 3, np.random.default_rng(0))
    r = react(sim, state, "How about Get Out?", ["10"])
    assert r.accepted and r.kind == "accept" and not r.left and r.continues
    assert "Get Out (2017)" in r.text and r.mentions == ["10"]
    assert r.sentiment > 0.5 and r.dwell_time >= 0
    assert r.labels == {"10": {"suggested": 1, "seen": 0, "liked": 1}}
    assert state.accepted == "10" and sim.satisfaction(state) == 5.0


def test_rejects_a_seen_item_even_if_liked(sim):
    state = sim.start(redial_like(), 3, np.random.default_rng(0))
    r = react(sim, state, "Have you seen Frozen?", ["5"])
    assert not r.accepted and r.kind == "reject"
    assert "seen" in r.text or "saw" in r.text
    assert r.labels["5"]["seen"] == 1 and state.failures == 1


def test_rejects_a_disliked_item_with_negative_sentiment(sim):
    state = sim.start(redial_like(), 3, np.random.default_rng(0))
    r = react(sim, state, "It is great", ["4"])
    assert not r.accepted and r.sentiment < -0.4 and r.labels["4"]["liked"] == 0


def test_target_wins_over_a_seen_item_in_the_same_reply(sim):
    state = sim.start(redial_like(), 3, np.random.default_rng(0))
    assert react(sim, state, "Frozen or Get Out?", ["5", "10"]).accepted


def test_unknown_item_gets_attribute_feedback_and_repeat_annoys(sim):
    state = sim.start(redial_like(), 3, np.random.default_rng(0))
    r = react(sim, state, "Police Academy?", ["1"])
    assert r.kind == "reject" and "old" in r.text  # 1984 vs the 2017 target
    assert r.labels["1"] == {"suggested": 1, "seen": 2, "liked": 2}
    again = react(sim, state, "Police Academy?", ["1"], seed=1)
    assert "already" in again.text and again.sentiment < r.sentiment


def test_reply_without_items_gets_a_hint(sim):
    state = sim.start(redial_like(), 1, np.random.default_rng(0))  # Frozen not yet mentioned
    r = react(sim, state, "What do you like?", [])
    assert r.kind == "other" and "Frozen (2013)" in r.text and r.mentions == ["5"]
    assert "recent" in react(sim, state, "And else?", [], seed=2).text  # hints exhausted: the target's attributes


def test_leaving_probability_rises_with_failures(catalogue):
    sim = GroundedSimulator(catalogue, leave_base=0.0, leave_step=0.5)
    state = sim.start(redial_like(), 3, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    left = [sim.react(state, [], "hm", [], rng).left for _ in range(3)]
    assert left[-1] and state.left  # p = 0.5, 1.0 (capped at 0.95), ...
    assert sim.satisfaction(state) < 3


def test_opendialkg_targets_are_the_items_the_recommender_named_later(catalogue):
    sim = GroundedSimulator(catalogue, style="opendialkg", noun="one")
    dialogue = {
        "dialogue_id": "o1",
        "turns": [turn("seeker", "Do you like Frozen?", ["5"]), turn("recommender", "Yes! Also Get Out.", ["10"]),
                  turn("seeker", "Cool"), turn("recommender", "And It (2017)", ["4"])],
        "labels": [],
    }
    assert sim.prefix_points(dialogue) == [1, 3]
    state = sim.start(dialogue, 1, np.random.default_rng(0))
    assert state.targets == ["10", "4"] and state.seen == {"5"}
    assert sim.react(state, [], "Frozen?", ["5"], np.random.default_rng(0)).kind == "reject"


def test_attribute_feedback_uses_genre_before_year():
    item = {"name": "A", "attributes": "genre=horror; era=1980s"}
    target = {"name": "B", "attributes": "genre=comedy; era=2010s"}
    assert "comedy" in attribute_feedback(item, target)
    assert "more recent" in attribute_feedback({"name": "A", "attributes": "year=1970"}, {"attributes": "year=2015"})
    assert "not sure" in attribute_feedback({"name": "A", "attributes": ""}, None)


def test_unknown_style_is_rejected(catalogue):
    with pytest.raises(ValueError, match="style"):
        GroundedSimulator(catalogue, style="shakespeare")


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_wording_carries_the_latent_sentiment(style):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader, rng = SentimentIntensityAnalyzer(), np.random.default_rng(0)
    feedback = attribute_feedback({"name": "X (1980)", "attributes": "year=1980"}, {"attributes": "year=2017"})
    for kind in TEMPLATES[style]:
        texts = [compose(rng, style, kind, title="Get Out (2017)", feedback=feedback, hint="I really liked Up.")
                 for _ in range(50)]
        mean = np.mean([vader.polarity_scores(t)["compound"] for t in texts])
        assert np.sign(mean) == np.sign(SENTIMENT[kind]), (kind, mean)
