import json

from crslight.data import load_corpus
from crslight.data.synthetic import ACCEPT_THRESHOLD, generate, make_catalogue, utility


def test_same_seed_same_data_other_seed_other_data():
    a, cat_a = generate(seed=3, n_dialogues=20, n_items=60)
    b, cat_b = generate(seed=3, n_dialogues=20, n_items=60)
    c, _ = generate(seed=4, n_dialogues=20, n_items=60)
    assert a == b and cat_a == cat_b
    assert a != c


def test_feedback_follows_the_persona():
    dialogues, catalogue = generate(seed=0, n_dialogues=200, n_items=100)
    by_id = {it["item_id"]: it for it in catalogue}
    liked_dwell, disliked_dwell = [], []
    for d in dialogues:
        persona = json.loads(d["persona"])
        turns = d["turns"]
        for t, tr in enumerate(turns[:-1]):
            if tr["role"] == "recommender" and tr["items"]:
                item = by_id[tr["items"][0]]
                gap = turns[t + 1]["time"] - tr["end_time"]
                (liked_dwell if utility(persona, item) > ACCEPT_THRESHOLD + 0.5 else disliked_dwell).append(gap)
    # users dwell longer after items they like (the generative story's implicit feedback)
    assert sum(liked_dwell) / len(liked_dwell) > 1.3 * sum(disliked_dwell) / len(disliked_dwell)


def test_sad_users_prefer_uplifting_items():
    item = {"attributes": "genre=comedy; mood=uplifting; era=1990s"}
    dark = {"attributes": "genre=comedy; mood=dark; era=1990s"}
    persona = {"taste": [0.125] * 8, "era": "2000s", "mood": "sad"}
    assert utility(persona, item) > utility(persona, dark)


def test_corpus_splits_differ_and_share_the_catalogue():
    train = load_corpus("synthetic", None, "train", n_dialogues=50, n_items=80)
    test = load_corpus("synthetic", None, "test", n_dialogues=50, n_items=80)
    assert len(train.dialogues) == 50 and len(test.dialogues) == 10
    assert train.catalogue["item_id"] == test.catalogue["item_id"] == [r["item_id"] for r in make_catalogue(0, 80)]
    assert train.dialogues[0]["turns"] != test.dialogues[0]["turns"]
    assert train.stats()["rec_samples"] > 0
