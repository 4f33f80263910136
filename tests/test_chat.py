import io

import pytest

from crslight.chat import PROMPT, ChatSession, chat
from crslight.simulator.linker import ItemLinker

CATALOGUE = {
    "item_id": ["m1", "m2", "m3"],
    "name": ["Up (2009)", "Heat (1995)", "The Lord of the Rings (2001)"],
    "popularity": [3.0, 2.0, 1.0],
    "attributes": ["", "", ""],
}


@pytest.fixture(scope="module")
def policy_dir(tiny_lm, tiny_tokenizer, tmp_path_factory):
    """The tiny random Llama and the SmolLM2 tokenizer saved as a transformers folder (what `crslight export` writes)."""
    folder = tmp_path_factory.mktemp("policy")
    tiny_lm.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


class Script:
    """An ``input_fn`` that returns the given lines, then raises EOFError (Ctrl-D); records the prompts."""

    def __init__(self, *lines: str):
        self.lines, self.prompts = list(lines), []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


@pytest.fixture
def canned(monkeypatch):
    """Replaces generation with a fixed reply that names two titles; records the turns each reply was asked for."""
    asked = []

    def generate(self, turns):
        asked.append([t["text"] for t in turns])
        return "Try Up (2009) or maybe Heat tonight."

    monkeypatch.setattr(ChatSession, "generate", generate)
    return asked


def run_chat(policy, *lines, **kwargs) -> tuple[int, str, Script]:
    script, out = Script(*lines), io.StringIO()
    kwargs = {"catalogue": CATALOGUE, "max_new_tokens": 4, "temperature": 0.0, **kwargs}
    code = chat(str(policy), input_fn=script, output=out, **kwargs)
    return code, out.getvalue(), script


def replies(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("recommender> ")]


def test_replies_until_end_of_input(policy_dir):
    code, text, script = run_chat(policy_dir, "hi, something funny?", "", "and something darker?")
    assert code == 0
    assert len(replies(text)) == 2  # the empty line is skipped, not answered
    assert all(len(r) > len("recommender> ") for r in replies(text))
    assert script.prompts == [PROMPT] * 4  # three lines, then EOF


def test_quit_stops_before_reading_more(policy_dir, canned):
    code, text, script = run_chat(policy_dir, "hello", "/quit", "never read")
    assert code == 0
    assert len(replies(text)) == 1
    assert script.lines == ["never read"]


def test_reset_forgets_the_conversation(policy_dir, canned):
    code, text, _ = run_chat(policy_dir, "first", "second", "/reset", "third")
    assert code == 0
    assert "(new conversation)" in text
    assert canned == [["first"], ["first", "Try Up (2009) or maybe Heat tonight.", "second"], ["third"]]


def test_seeded_sampled_replies_are_reproducible(tiny_lm, tiny_tokenizer):
    def first_reply(seed):
        session = ChatSession(tiny_lm, tiny_tokenizer, ItemLinker.from_catalogue(CATALOGUE), max_new_tokens=2,
                              temperature=1.0, top_p=1.0, seed=seed)
        return session.send("hello")["text"]

    assert first_reply(3) == first_reply(3) != first_reply(4)


def test_linked_titles_are_printed_with_their_ids(policy_dir, canned):
    code, text, _ = run_chat(policy_dir, "what should I watch?")
    assert code == 0
    assert "recommender> Try Up (2009) or maybe Heat tonight." in text
    lines = [line.strip() for line in text.splitlines() if "linked" in line]
    assert lines == ["→ linked: Up (2009) [id m1]", "→ linked: Heat (1995) [id m2]"]


def test_session_keeps_schema_turns_with_linked_items(tiny_lm, tiny_tokenizer):
    session = ChatSession(tiny_lm, tiny_tokenizer, ItemLinker.from_catalogue(CATALOGUE), max_new_tokens=4, seed=0)
    session.generate = lambda turns: "Have you seen The Lord of the Rings?"
    reply = session.send("I loved Heat (1995)")
    assert [t["role"] for t in session.turns] == ["seeker", "recommender"]
    assert session.turns[0]["items"] == ["m2"]
    assert reply["items"] == ["m3"] and session.turns[1] is reply
    session.reset()
    assert session.turns == []


def test_missing_policy_folder_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code, text, script = run_chat(missing, "hello")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert script.prompts == [] and text == ""
    from crslight.cli import main

    assert main(["chat", "--policy", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_folder_without_a_model_is_exit_2(tmp_path, capsys):
    code, _, _ = run_chat(tmp_path, "hello")
    assert code == 2
    assert "no config.json" in capsys.readouterr().err


def test_links_against_the_dataset_catalogue(policy_dir, tmp_path, monkeypatch):
    import crslight.data

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    real, asked = crslight.data.load_corpus, []

    def few_dialogues(name, root=None, split="train", **kwargs):  # the catalogue does not depend on the dialogues
        asked.append((name, root))
        return real(name, root, split, **{**kwargs, "n_dialogues": 10})

    monkeypatch.setattr(crslight.data, "load_corpus", few_dialogues)
    catalogue = real("synthetic", None, "test", n_dialogues=10).catalogue
    title, item = catalogue["name"][7], catalogue["item_id"][7]
    monkeypatch.setattr(ChatSession, "generate", lambda self, turns: f"You should watch {title}.")
    code, text, _ = run_chat(policy_dir, "hi", catalogue=None, dataset="synthetic")
    assert code == 0
    assert f"→ linked: {title} [id {item}]" in text
    assert asked == [("synthetic", None)]


def test_unreadable_dataset_is_exit_2(policy_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    code, _, _ = run_chat(policy_dir, "hi", catalogue=None, dataset="redial", root=str(tmp_path))
    assert code == 2
    assert "redial" in capsys.readouterr().err


def test_exported_item_scores_make_chat_recommend_through_them(tiny_recommender, tiny_tokenizer, tmp_path):
    """A policy folder with item scores beside it (what `crslight export` writes): chat draws each recommended item from
    those scores, writes its title, and the reply's items are exactly the drawn ones, never one already mentioned."""
    import torch
    from transformers import AutoModelForCausalLM

    from crslight.models.retrieval import ItemHead, load_item_scores, save_item_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_recommender).eval()
    head = ItemHead.for_catalogue(model, tiny_tokenizer, CATALOGUE["name"])
    with torch.no_grad():
        head.bias.copy_(torch.tensor([4.0, 2.0, 0.0]))  # Up first, then Heat
    save_item_scores(tmp_path, head, CATALOGUE["item_id"], CATALOGUE["name"])
    scores = load_item_scores(tmp_path)
    assert scores is not None and scores[1] == CATALOGUE["item_id"] and torch.equal(scores[0].bias, head.bias)
    assert load_item_scores(tmp_path / "elsewhere") is None
    session = ChatSession(model, tiny_tokenizer, ItemLinker.from_catalogue(CATALOGUE), max_new_tokens=12, seed=0,
                          item_scores=scores)
    recommended = []
    for text in ("Any comedy?", "Something else?", "And another?", "One more?", "Any other?"):
        reply = session.send(text)
        for item in reply["items"]:
            assert CATALOGUE["name"][CATALOGUE["item_id"].index(item)] in reply["text"]
            recommended.append(item)
    # best first, never one the conversation has mentioned (until every item has been)
    assert len(recommended) >= 2 and recommended[:3] == ["m1", "m2", "m3"][: len(recommended[:3])]


def test_simulate_runs_an_exported_policy_through_its_item_scores(tiny_recommender, tiny_tokenizer, tmp_path):
    """`crslight simulate --policy FOLDER` on an exported policy: its replies carry the items its scores drew."""
    import shutil

    from transformers import AutoModelForCausalLM

    from crslight.data.datamodules import Synthetic
    from crslight.models.retrieval import ItemHead, save_item_scores
    from crslight.simulator.policies import make_policy

    shutil.copytree(tiny_recommender, tmp_path / "policy")
    corpus = Synthetic(n_dialogues=20, n_items=30).corpus("test")
    model = AutoModelForCausalLM.from_pretrained(tiny_recommender)
    head = ItemHead.for_catalogue(model, tiny_tokenizer, corpus.catalogue["name"], corpus.catalogue["attributes"])
    save_item_scores(tmp_path / "policy", head, corpus.catalogue["item_id"], corpus.catalogue["name"])
    policy = make_policy(str(tmp_path / "policy"), corpus, seed=0)
    replies = policy([turns[:1] for turns in corpus.dialogues["turns"][:6]])
    recommending = [r for r in replies if r.items]
    assert recommending
    names = dict(zip(corpus.catalogue["item_id"], corpus.catalogue["name"], strict=True))
    assert all(names[item] in reply for reply in recommending for item in reply.items)
