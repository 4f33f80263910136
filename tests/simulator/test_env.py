import functools
import math

import pytest

from crslight.schema import turn
from crslight.simulator.base import catalogue_rows
from crslight.simulator.env import ConversationEnv, signal_fields, summarise, to_signal_batch
from crslight.simulator.grounded import GroundedSimulator
from crslight.simulator.policies import PopularityPolicy, RandomPolicy


def dialogues() -> list[dict]:
    """Three seekers; each wants one unseen movie (the target) and has seen one."""
    out = []
    for k, (target, seen) in enumerate([("10", "5"), ("7", "2"), ("1", "10")]):
        out.append({
            "dialogue_id": f"d{k}",
            "turns": [turn("seeker", f"Hi, I am user {k} and I need a movie for tonight.", time=0.0),
                      turn("recommender", "Sure! What do you like?", time=6.0, end_time=8.0),
                      turn("seeker", "Anything fun.", time=20.0)],
            "labels": [{"item": target, "suggested": 1, "seen": 0, "liked": 1},
                       {"item": seen, "suggested": 1, "seen": 1, "liked": 1}],
            "rating": math.nan, "persona": "",
        })
    return out


def make_env(catalogue, max_turns=4, seed=0, **sim_kwargs) -> ConversationEnv:
    return ConversationEnv(dialogues(), catalogue, GroundedSimulator(catalogue, **sim_kwargs), max_turns=max_turns,
                           seed=seed)


def fingerprint(episodes) -> list:
    return [(e.dialogue_id, e.ending, [(t["role"], t["text"], round(t["time"], 6)) for t in e.turns])
            for e in episodes]


def test_same_seed_same_episodes_for_any_batch_size(catalogue):
    policy = RandomPolicy(catalogue, seed=3)
    reference = fingerprint(make_env(catalogue).rollout(policy, 12, batch_size=32))
    assert fingerprint(make_env(catalogue).rollout(policy, 12, batch_size=1)) == reference
    assert fingerprint(make_env(catalogue).rollout(policy, 12, batch_size=5)) == reference
    assert fingerprint(make_env(catalogue).rollout(policy, [7], batch_size=5))[0] == reference[7]
    assert fingerprint(make_env(catalogue, seed=1).rollout(policy, 12)) != reference


def test_episode_ends_on_acceptance(catalogue):
    env = make_env(catalogue)
    wanted = ["Get Out", "Spider-Man: Homecoming", "Police Academy"]  # user k's target, from the context alone
    episodes = env.rollout(lambda ctxs: [f"Watch {wanted[int(c[0]['text'].split()[4])]}!" for c in ctxs], 6)
    assert all(e.ending == "accept" and e.steps == 1 and e.accepted for e in episodes)
    assert all(e.satisfaction == 5.0 for e in episodes)


def test_episode_ends_when_the_user_leaves(catalogue):
    env = make_env(catalogue, leave_base=1.0)
    episodes = env.rollout(lambda ctxs: ["Tell me more about yourself."] * len(ctxs), 5)
    assert all(e.ending == "leave" and e.steps == 1 for e in episodes)
    assert all(not t.reaction.continues for e in episodes for t in e.transitions)


def test_episode_ends_at_the_turn_limit(catalogue):
    env = make_env(catalogue, max_turns=3, leave_step=0.0)
    episodes = env.rollout(lambda ctxs: ["Hmm, let me think."] * len(ctxs), 4)
    assert all(e.ending == "turn_limit" and e.steps == 3 for e in episodes)
    assert summarise(episodes)["endings"] == {"accept": 0, "leave": 0, "turn_limit": 4}


def test_transitions_carry_signals_and_times(catalogue):
    env = make_env(catalogue, max_turns=2, leave_step=0.0)
    episodes = env.rollout(PopularityPolicy(catalogue), 3)
    for e in episodes:
        assert len(e.turns) == e.prefix_len + 2 * e.steps
        for k, t in enumerate(e.transitions):
            reply, answer = e.turns[e.prefix_len + 2 * k], e.turns[e.prefix_len + 2 * k + 1]
            assert reply["text"] == t.reply and reply["items"] == t.items and t.items
            assert answer["time"] - reply["end_time"] == pytest.approx(t.reaction.dwell_time, abs=1e-3)
            assert reply["time"] >= e.turns[e.prefix_len - 1]["end_time"]
            assert t.rating == e.satisfaction
    # popularity names Get Out (50) first, then Frozen (40): d0 accepts at once, d2 has seen Get Out
    fields = signal_fields([t for e in episodes for t in e.transitions])
    assert set(fields) == {"context", "reply", "items", "item_names", "reaction", "dwell_time", "labels", "rating",
                           "accepted", "continues"}
    assert len({len(v) for v in fields.values()}) == 1
    assert fields["item_names"][0] == ["Get Out (2017)"]
    batch = to_signal_batch([t for e in episodes for t in e.transitions])
    assert len(batch) == len(fields["reply"]) and batch.accepted == fields["accepted"]


def test_policy_must_answer_every_context(catalogue):
    with pytest.raises(ValueError, match="replies"):
        make_env(catalogue).rollout(lambda ctxs: ["hi"], 3)


def test_no_startable_dialogue_is_an_error(catalogue):
    with pytest.raises(ValueError, match="prefix"):
        ConversationEnv([{**dialogues()[0], "labels": []}], catalogue, GroundedSimulator(catalogue))


def test_item_groups_show_each_alternative_to_the_same_user_without_changing_the_episode(catalogue):
    from crslight.models.engine import Reply

    names = {row["item_id"]: row["name"] for row in catalogue_rows(catalogue)}
    wanted = ["10", "7", "1"]  # user k's target

    def policy(contexts, alternatives=True):
        replies = []
        for c in contexts:
            k = int(c[0]["text"].split()[4])
            options = [Reply(f"Watch {names[i]}!", [i]) for i in (wanted[k], "3", "5")]
            replies.append(Reply(f"Watch {names['4']}!", ["4"], [options] if alternatives else None))
        return replies

    env = make_env(catalogue, max_turns=2, leave_step=0.0)
    episodes = env.rollout(policy, 6)
    plain = make_env(catalogue, max_turns=2, leave_step=0.0).rollout(lambda c: policy(c, False), 6)
    assert fingerprint(episodes) == fingerprint(plain)  # the groups draw from copies: the episode is the same
    for episode in episodes:
        for t in episode.transitions:
            (group,) = t.alternatives
            assert [g.reply for g in group] == [t.reply, *policy([t.context])[0].alternatives[0]]
            assert group[0].reaction == t.reaction  # the reply itself: the same reaction as in the episode
            assert group[1].reaction.accepted  # the user's target: taken up, rated as the episode would end
            assert group[1].rating == pytest.approx(5.0 - 0.7 * t.step)
            assert all(g.items == [g.reply.items[0]] and g.step == t.step for g in group)


def test_build_environment_picks_the_dataset_default_or_a_named_simulator():
    from crslight.data import load_corpus
    from crslight.simulator.env import build_environment, linker_for
    from crslight.simulator.persona import PersonaSimulator

    corpus = load_corpus("synthetic", None, "test", n_dialogues=10, n_items=40)
    auto = build_environment(corpus, max_turns=2, seed=3)
    assert isinstance(auto.simulator, PersonaSimulator)
    assert (auto.max_turns, auto.seed) == (2, 3) and auto.linker is linker_for(corpus)  # one linker per catalogue
    named = build_environment(corpus, "GroundedSimulator", max_turns=1)  # a registered name, its defaults
    assert isinstance(named.simulator, GroundedSimulator) and named.simulator.leave_step == 0.1
    # a factory taking the catalogue: what a config's class_path + init_args become
    built = build_environment(corpus, functools.partial(GroundedSimulator, leave_step=0.5), max_turns=1)
    assert isinstance(built.simulator, GroundedSimulator) and built.simulator.leave_step == 0.5
    assert built.simulator.items.keys() == set(corpus.catalogue["item_id"])
    with pytest.raises(TypeError, match="not a UserSimulator"):
        build_environment(corpus, lambda catalogue: object())
    with pytest.raises(ValueError, match="crslight.simulators"):
        build_environment(corpus, "NoSuchSimulator")


def test_simulate_and_the_test_episodes_run_in_the_factory_environment(monkeypatch):
    """``crslight simulate`` and ``run_episodes`` (``crslight test``, the pipeline) build their environment through
    ``build_environment`` (PPO's ``setup`` too: tests/modules/test_ppo.py), so all three meet the same users."""
    import crslight.simulator.cli as cli
    import crslight.simulator.env as env
    from crslight.data import load_corpus
    from crslight.modules.evaluation import run_episodes

    calls = []
    build = env.build_environment

    def spy(corpus, *args, **kwargs):
        calls.append((corpus.split, args, kwargs))
        return build(corpus, *args, **kwargs)

    monkeypatch.setattr(env, "build_environment", spy)
    monkeypatch.setattr(cli, "build_environment", spy)
    summary = cli.simulate("synthetic", None, "random", 4, 2, 7, "test")
    corpus = load_corpus("synthetic", None, "test")
    episodes = run_episodes(RandomPolicy(corpus.catalogue, seed=7), corpus, 4, 2, 7)
    assert calls == [("test", ("auto",), {"root": None, "max_turns": 2, "seed": 7})] * 2
    assert summary["episodes"] == len(episodes) == 4
    assert [e.dialogue_id for e in episodes] == [e.dialogue_id for e in build(corpus, max_turns=2, seed=7).rollout(
        RandomPolicy(corpus.catalogue, seed=7), 4)]


def test_simulator_class_resolves_names_through_the_plugin_registry_only(tmp_path, monkeypatch):
    """The built-ins are entry points like any plugin's; a third-party simulator resolves the same way, and an unknown
    name is refused with the known ones listed."""
    from importlib.metadata import EntryPoint

    from crslight import plugins
    from crslight.simulator import LMSimulator, PersonaSimulator, UserSimulator, simulator_class

    assert simulator_class("GroundedSimulator") is GroundedSimulator
    assert simulator_class("LMSimulator") is LMSimulator and simulator_class("PersonaSimulator") is PersonaSimulator
    with pytest.raises(ValueError, match=r"unknown simulator 'NoSuchSimulator': the crslight.simulators entry points "
                                         r"are GroundedSimulator, LMSimulator, PersonaSimulator; .* auto"):
        simulator_class("NoSuchSimulator")

    (tmp_path / "fake_simulator_plugin.py").write_text(
        "from crslight.simulator.grounded import GroundedSimulator\n\n"
        "class ShyUserSimulator(GroundedSimulator):\n    pass\n\n"
        "class NotASimulator:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = "crslight.simulators"
    declared = {"crslight.simulators": [EntryPoint("ShyUserSimulator", "fake_simulator_plugin:ShyUserSimulator", group),
                                        EntryPoint("NotASimulator", "fake_simulator_plugin:NotASimulator", group),
                                        EntryPoint("BrokenSimulator", "no_such_module_here:BrokenSimulator", group)]}
    monkeypatch.setattr(plugins, "entry_points", lambda group: declared.get(group, []))
    monkeypatch.setattr(plugins, "_registry", None)
    assert issubclass(simulator_class("ShyUserSimulator"), UserSimulator)
    with pytest.raises(TypeError, match="not a UserSimulator"):
        simulator_class("NotASimulator")
    with pytest.raises(ValueError, match="BrokenSimulator.*failed to import: ModuleNotFoundError"):
        simulator_class("BrokenSimulator")
    with pytest.raises(ValueError, match="entry points are NotASimulator, ShyUserSimulator;"):
        simulator_class("GroundedSimulator")  # no built-in shortcut beside the registry
