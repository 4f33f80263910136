import json

import numpy as np
import pytest

from crslight.data import synthetic
from crslight.schema import turn
from crslight.simulator.persona import PersonaSimulator


@pytest.fixture(scope="module")
def catalogue():
    return synthetic.make_catalogue(0, 200)


def find(catalogue, **attrs) -> list[int]:
    return [i for i, it in enumerate(catalogue) if all(synthetic.attributes(it)[k] == v for k, v in attrs.items())]


def dialogue(persona: dict) -> dict:
    return {"dialogue_id": "syn-x", "turns": [turn("seeker", "Hi! I'm feeling a bit down today."),
                                              turn("recommender", "How about a movie?")],
            "labels": [], "persona": json.dumps(persona)}


def sad_comedy_fan(seen: list[int]) -> dict:
    taste = [0.0] * len(synthetic.GENRES)
    taste[synthetic.GENRES.index("comedy")] = 1.0
    return {"taste": taste, "era": "1990s", "mood": "sad", "seen": seen}


def test_sad_user_accepts_an_uplifting_favourite_and_rejects_a_dark_one(catalogue):
    sim = PersonaSimulator(catalogue, noise=0.0, leave_step=0.0)
    good = find(catalogue, genre="comedy", mood="uplifting")[0]
    dark = find(catalogue, genre="horror", mood="dark")[0]
    state = sim.start(dialogue(sad_comedy_fan([])), 1, np.random.default_rng(0))
    r = sim.react(state, [], "x", [catalogue[dark]["item_id"]], np.random.default_rng(0))
    assert not r.accepted and r.sentiment < 0 and r.labels[catalogue[dark]["item_id"]]["liked"] == 0
    r = sim.react(state, [], "x", [catalogue[good]["item_id"]], np.random.default_rng(0))
    assert r.accepted and r.sentiment > 0 and catalogue[good]["name"] in r.text
    assert sim.value(state.persona, catalogue[good]["item_id"]) > synthetic.ACCEPT_THRESHOLD


def test_seen_item_is_rejected_whatever_its_utility(catalogue):
    sim = PersonaSimulator(catalogue, noise=0.0, leave_step=0.0)
    good = find(catalogue, genre="comedy", mood="uplifting")[0]
    state = sim.start(dialogue(sad_comedy_fan([good])), 1, np.random.default_rng(0))
    r = sim.react(state, [], "x", [catalogue[good]["item_id"]], np.random.default_rng(0))
    assert not r.accepted and "seen" in r.text.lower()
    assert r.labels[catalogue[good]["item_id"]] == {"suggested": 1, "seen": 1, "liked": 2}


def test_no_item_repeats_the_request_and_leaving_follows_the_generator(catalogue):
    sim = PersonaSimulator(catalogue, leave_step=1.0)
    state = sim.start(dialogue(sad_comedy_fan([])), 1, np.random.default_rng(0))
    r = sim.react(state, [], "Hello there", [], np.random.default_rng(0))
    assert r.kind == "other" and r.left and "Bye" in r.text  # p = 1.0 * 1 failure


def test_prefix_points_need_a_persona(catalogue):
    sim = PersonaSimulator(catalogue)
    assert sim.prefix_points(dialogue(sad_comedy_fan([]))) == [1]
    assert sim.prefix_points({**dialogue(sad_comedy_fan([])), "persona": ""}) == []
