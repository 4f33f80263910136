import json

import numpy as np
import pytest

from crslight.models.engine import Engine
from crslight.models.tokenize import encode_prompt
from crslight.schema import turn
from crslight.simulator import lm
from crslight.simulator.grounded import GroundedSimulator
from crslight.simulator.linker import ItemLinker
from crslight.simulator.lm import LMSimulator, chat_engine, generate_chat, stop_token_ids
from crslight.simulator.policies import (
    AttributeOraclePolicy,
    LMPolicy,
    PopularityPolicy,
    RandomPolicy,
    interaction_counts,
    stated_wishes,
)

CONTEXT = [turn("recommender", "Hi!"), turn("seeker", "I loved Get Out (2017).", ["10"]),
           turn("seeker", "Anything similar?")]


def test_popularity_names_the_most_popular_unmentioned_item(catalogue):
    policy = PopularityPolicy(catalogue)
    linker = ItemLinker.from_catalogue(catalogue)
    reply = policy([CONTEXT])[0]
    assert linker.link(reply) == ["5"]  # Get Out (50) was mentioned; Frozen (40) is next
    assert "Frozen (2013)" in reply
    counted = PopularityPolicy(catalogue, popularity={"1": 3.0, "6": 3.0})
    assert linker.link(counted([CONTEXT])[0]) == ["6"]  # tie on counts: catalogue popularity decides


def test_interaction_counts_prefer_accepted_items_and_fall_back_to_mentions():
    dialogues = {
        "turns": [[turn("recommender", "A", ["a"])], [turn("recommender", "B", ["b"])]],
        "labels": [[{"item": "a", "suggested": 1, "seen": 0, "liked": 1},
                    {"item": "z", "suggested": 1, "seen": 1, "liked": 1}], []],
    }
    assert interaction_counts(dialogues) == {"a": 1.0, "b": 1.0}


def test_random_policy_is_a_function_of_seed_and_context(catalogue):
    policy = RandomPolicy(catalogue, seed=0)
    other = [turn("seeker", "Hello, something else")]
    alone = policy([CONTEXT])[0]
    assert policy([other, CONTEXT])[1] == alone  # batch composition does not matter
    linker = ItemLinker.from_catalogue(catalogue)
    picks = {linker.link(RandomPolicy(catalogue, seed=s)([CONTEXT])[0])[0] for s in range(30)}
    assert "10" not in picks and len(picks) > 5  # never a mentioned item; spread over the catalogue


def test_lm_policy_and_lm_simulator_prompt_through_encode_prompt(catalogue, tiny_chat, monkeypatch):
    """One prompt builder: the recommender LM and the seeker LM get exactly ``encode_prompt``'s tokens (the builder of
    training, rollouts, evaluation and chat), with the oldest turns dropped to fit and the system prompt kept."""
    model, tokenizer = tiny_chat
    prompts = []
    generate = Engine.generate

    def record(self, batch, *args, **kwargs):
        prompts.append([list(p) for p in batch])
        return generate(self, batch, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", record)
    LMPolicy(model, tokenizer, system_prompt="sys", max_new_tokens=2, do_sample=False)([CONTEXT])
    assert prompts[-1] == [encode_prompt(tokenizer, CONTEXT, "sys", 768)]
    long = [turn("seeker", "word " * 200), turn("recommender", "ok"), turn("seeker", "Get Out?")]
    LMPolicy(model, tokenizer, system_prompt="sys", max_new_tokens=2, do_sample=False, max_context_tokens=60)([long])
    text = tokenizer.decode(prompts[-1][0])
    assert len(prompts[-1][0]) <= 60 and "sys" in text and "Get Out?" in text and "word word" not in text
    assert prompts[-1][0] == encode_prompt(tokenizer, long[1:], "sys")

    sim = LMSimulator(GroundedSimulator(catalogue, leave_step=0.0), model, tokenizer, system_prompt="seek",
                      max_new_tokens=2)
    dialogue = {"dialogue_id": "d", "turns": CONTEXT, "labels": [{"item": "5", "suggested": 1, "seen": 0, "liked": 1}]}
    reaction = sim.react(sim.start(dialogue, 3, np.random.default_rng(0)), CONTEXT, "Try Frozen", ["5"],
                         np.random.default_rng(0))
    assert reaction.accepted
    turns = [*CONTEXT, turn("recommender", "Try Frozen")]
    intent = sim.system_prompt + " What you want to say, in your own words: "
    text = tokenizer.decode(prompts[-1][0])
    said = text[text.index(intent) + len(intent):].split('"')[1]  # the rule simulator's words, quoted
    assert prompts[-1][0] == encode_prompt(tokenizer, turns, f'{intent}"{said}"', 768, assistant="seeker")
    assert text.rstrip().endswith("assistant") and "Try Frozen" in text  # the seeker answers the recommender's reply


def test_lm_policy_batched_left_padded_generation_matches_one_by_one(tiny_chat):
    model, tokenizer = tiny_chat
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)
    policy = LMPolicy(model, tokenizer, max_new_tokens=6, do_sample=False)
    contexts = [CONTEXT, [turn("seeker", "Hi")]]
    batched = policy(contexts)
    assert len(batched) == 2 and all(isinstance(r, str) for r in batched)
    assert [policy([c])[0] for c in contexts] == batched


def test_lm_policy_sampling_is_seeded(tiny_chat):
    model, tokenizer = tiny_chat
    a = LMPolicy(model, tokenizer, max_new_tokens=8, seed=1)([CONTEXT] * 3)
    b = LMPolicy(model, tokenizer, max_new_tokens=8, seed=1)([CONTEXT] * 3)
    assert a == b


def test_lm_simulator_words_come_from_the_model_and_decisions_from_the_rules(catalogue, tiny_chat, monkeypatch):
    model, tokenizer = tiny_chat
    rules = GroundedSimulator(catalogue, leave_step=0.0)
    sim = LMSimulator(rules, model, tokenizer, max_new_tokens=6)
    dialogue = {"dialogue_id": "d", "turns": [turn("seeker", "Hi"), turn("recommender", "Hello")],
                "labels": [{"item": "10", "suggested": 1, "seen": 0, "liked": 1}]}
    state = sim.start(dialogue, 1, np.random.default_rng(0))
    seen_prompts = []

    def fake_generate(engine, contexts, system_prompt, assistant, *args, **kwargs):
        seen_prompts.extend((turns, assistant) for turns in contexts)
        return ["Oh cool, I will watch it!"] * len(contexts)

    monkeypatch.setattr(lm, "generate_chat", fake_generate)
    reaction = sim.react(state, dialogue["turns"][:1], "Try Get Out", ["10"], np.random.default_rng(0))
    assert reaction.accepted and reaction.text == "Oh cool, I will watch it!"
    turns, side = seen_prompts[0]
    assert side == "seeker" and turns[-1]["role"] == "recommender" and turns[-1]["text"] == "Try Get Out"
    monkeypatch.undo()
    real = sim.react_batch([sim.start(dialogue, 1, np.random.default_rng(1))], [dialogue["turns"][:1]],
                           ["Try Police Academy"], [["1"]], [np.random.default_rng(1)])[0]
    assert not real.accepted and isinstance(real.text, str) and real.text


def test_generate_chat_handles_an_empty_batch(tiny_chat):
    assert generate_chat(chat_engine(*tiny_chat), [], None) == []


def test_stated_wishes_reads_the_latest_genre_and_mood_the_seeker_said():
    opener = "Hi! I'm feeling a bit down today. Can you recommend a comedy movie? Something uplifting would be nice."
    context = [turn("seeker", opener), turn("recommender", "Can you recommend a horror movie? Something dark would be "
                                                              "nice."),  # the recommender's words do not count
               turn("seeker", "No, I really don't want something dark right now.")]
    assert stated_wishes(context) == ("comedy", "uplifting")
    asked_again = context + [turn("seeker", "I'm in a great mood. Can you recommend a sci-fi movie?")]
    assert stated_wishes(asked_again) == ("sci-fi", "uplifting")  # a happy seeker states no mood: the last one holds
    assert stated_wishes([turn("seeker", "Hello")]) == (None, None)


def test_oracle_prefers_genre_and_mood_then_genre_then_popularity():
    rows = [{"item_id": "a", "name": "Alpha (2001)", "popularity": 9.0, "attributes": "genre=drama; mood=dark"},
            {"item_id": "b", "name": "Beta (2002)", "popularity": 5.0, "attributes": "genre=comedy; mood=dark"},
            {"item_id": "c", "name": "Gamma (2003)", "popularity": 3.0, "attributes": "genre=comedy; mood=calm"},
            {"item_id": "d", "name": "Delta (2004)", "popularity": 1.0, "attributes": "genre=comedy; mood=calm"}]
    oracle = AttributeOraclePolicy(rows)
    ask = turn("seeker", "I've had a stressful week. Can you recommend a comedy movie? Something calm would be nice.")
    assert oracle.pick([ask]) == ("c", "Gamma (2003)")  # the most popular calm comedy, not the more popular dark one
    assert oracle.pick([ask, turn("recommender", "Gamma?", ["c"])])[0] == "d"  # mentioned items are skipped
    assert oracle.pick([ask, turn("recommender", "Gamma? Delta?", ["c", "d"])])[0] == "b"  # genre only
    assert oracle.pick([ask, turn("recommender", "?", ["b", "c", "d"])])[0] == "a"  # then popularity
    assert oracle.pick([turn("seeker", "Hello")])[0] == "a"  # nothing stated: the most popular item
    assert "Gamma (2003)" in oracle([[ask]])[0]  # phrased with the title, for the linker


def test_oracle_beats_popularity_on_the_same_synthetic_episodes():
    from crslight.data import load_corpus, synthetic
    from crslight.simulator.env import ConversationEnv, default_simulator
    from crslight.simulator.policies import make_policy

    corpus = load_corpus("synthetic", None, "test")
    rates, runs = {}, {}
    for name in ("popularity", "oracle"):
        env = ConversationEnv.from_corpus(corpus, default_simulator(corpus), max_turns=2, seed=0)
        runs[name] = env.rollout(make_policy(name, corpus), 200)
        rates[name] = sum(e.accepted for e in runs[name]) / 200
    assert [e.dialogue_id for e in runs["oracle"]] == [e.dialogue_id for e in runs["popularity"]]  # same users
    assert rates["oracle"] > rates["popularity"] + 0.25  # measured: 0.955 against 0.45
    genre_of = {row["item_id"]: synthetic.attributes(row)["genre"] for row in corpus.catalogue.to_list()}
    personas = {d["dialogue_id"]: json.loads(d["persona"]) for d in corpus.dialogues.to_list()}
    for episode in runs["oracle"]:
        stated = synthetic.GENRES[int(np.argmax(personas[episode.dialogue_id]["taste"]))]  # what the opener said
        for t in episode.transitions:
            assert [genre_of[i] for i in t.items] == [stated], (episode.index, t.reply)


def test_oracle_is_only_for_the_synthetic_scenario(catalogue):
    from types import SimpleNamespace

    from crslight.simulator.policies import make_policy

    with pytest.raises(ValueError, match="needs --dataset synthetic, not 'redial'"):
        make_policy("oracle", SimpleNamespace(name="redial", catalogue=catalogue, split="test"))
