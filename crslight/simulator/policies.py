"""Policies for the environment: baselines and a transformers-backed recommender.

A policy is any callable ``policy(contexts: list[list[dict]]) -> list[str]``: a batch of dialogue contexts (schema
turns: ``role``, ``text``, ``items``, ``time``, ``end_time``) in, one recommender reply per context out. Baselines,
a trained checkpoint and a PPO policy during rollout all fit that one signature, so the environment never needs to
know which it runs.

- :class:`RandomPolicy` names a uniformly random catalogue item not yet mentioned in the context: the floor.
- :class:`PopularityPolicy` names the most popular item not yet mentioned: the classic strong-but-blind baseline.
  Popularity is the catalogue's column, or (what ``crslight simulate --policy popularity`` uses) how often users of
  the train split accepted the item (:func:`interaction_counts`): the catalogue column is weak evidence in the
  synthetic scenario (a 0.2 · rank utility bonus) and, in ReDial, counts test dialogues too.
- :class:`AttributeOraclePolicy` (synthetic scenario only) reads the genre and mood the seeker *said* they want and
  names the most popular matching item: the reference a policy that understood the request should reach.
- :class:`LMPolicy` asks a causal LM (chat template, seeker → ``user``, recommender → ``assistant``).

:func:`make_policy` builds one by name (:data:`POLICIES`), or from a model name or folder (an exported crslight policy
through the decoding engine, :func:`engine_policy`): what ``crslight simulate`` and the pipeline's reference policies
run.

The baselines phrase their pick as a sentence with the title (so the item linker, not a side channel, reads it).
:class:`RandomPolicy` draws from a generator seeded by ``(seed, crc32 of the context)``: the same context always gets
the same reply whatever the batch it arrives in, which keeps episodes independent of the batch size.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from crslight.data import synthetic
from crslight.models.tokenize import DEFAULT_SYSTEM_PROMPT
from crslight.schema import RECOMMENDER, SEEKER
from crslight.simulator.base import catalogue_rows
from crslight.simulator.env import Policy
from crslight.simulator.lm import chat_engine, generate_chat

PHRASES = [
    "Have you seen {name}? It's a great {noun}.",
    "How about {name}?",
    "I'd recommend {name}, a lot of people love it.",
    "You might enjoy {name}.",
]


def mentioned(context: list[dict]) -> set[str]:
    """Items mentioned anywhere in the context."""
    return {i for turn in context for i in turn["items"]}


def phrase(name: str, context: list[dict], noun: str = "movie") -> str:
    """A recommendation sentence for ``name``, varied deterministically with the number of recommender turns."""
    k = sum(turn["role"] == RECOMMENDER for turn in context)
    return PHRASES[k % len(PHRASES)].format(name=name, noun=noun)


class RandomPolicy:
    """Recommends a uniformly random catalogue item not mentioned in the context.

    Args:
        catalogue: the item catalogue (``Corpus.catalogue``, a dict of columns or a list of rows).
        seed: seed; combined with a hash of each context.
        noun: what the items are called.
    """

    def __init__(self, catalogue, seed: int = 0, noun: str = "movie"):
        rows = catalogue_rows(catalogue)
        self.ids = [r["item_id"] for r in rows]
        self.names = [r["name"] for r in rows]
        self.seed, self.noun = seed, noun

    def __call__(self, contexts: list[list[dict]]) -> list[str]:
        replies = []
        for context in contexts:
            key = zlib.crc32("\n".join(f"{t['role']}:{t['text']}" for t in context).encode())
            rng = np.random.default_rng([self.seed, key])
            taken = mentioned(context)
            while True:
                row = int(rng.integers(len(self.ids)))
                if self.ids[row] not in taken or len(taken) >= len(self.ids):
                    break
            replies.append(phrase(self.names[row], context, self.noun))
        return replies


def interaction_counts(dialogues) -> dict[str, float]:
    """Item popularity measured on a (training) split: in how many dialogues the seeker accepted the item (liked it,
    had not seen it); for a source without questionnaire answers (OpenDialKG), in how many the recommender named it.

    This is CRSLab's popularity baseline (item frequency among the training split's recommendation targets), narrowed
    to the items users took up where the split says so. Unlike ReDial's catalogue ``nbMentions``, which counts the
    test dialogues too, it does not leak the evaluation split.
    """
    counts: dict[str, float] = {}
    for turns, labels in zip(dialogues["turns"], dialogues["labels"], strict=True):
        if labels:
            items = {a["item"] for a in labels if a["liked"] == 1 and a["seen"] != 1}
        else:
            items = {i for t in turns if t["role"] == RECOMMENDER for i in t["items"]}
        for item in items:
            counts[item] = counts.get(item, 0.0) + 1.0
    return counts


class PopularityPolicy:
    """Recommends the most popular item not mentioned in the context.

    Args:
        catalogue: the item catalogue (``Corpus.catalogue``, a dict of columns or a list of rows).
        popularity: item → popularity (e.g. :func:`interaction_counts` of the train split); items absent count 0.
            Ties, and everything when None, are ranked by the catalogue's ``popularity`` column, then catalogue order.
        noun: what the items are called.
    """

    def __init__(self, catalogue, popularity: dict[str, float] | None = None, noun: str = "movie"):
        rows = catalogue_rows(catalogue)
        first = popularity or {}
        order = sorted(range(len(rows)), key=lambda i: (-first.get(rows[i]["item_id"], 0.0), -rows[i]["popularity"]))
        self.ranked = [(rows[i]["item_id"], rows[i]["name"]) for i in order]
        self.noun = noun

    def __call__(self, contexts: list[list[dict]]) -> list[str]:
        replies = []
        for context in contexts:
            taken = mentioned(context)
            name = next((n for i, n in self.ranked if i not in taken), self.ranked[0][1])
            replies.append(phrase(name, context, self.noun))
        return replies


_GENRE = re.compile(r"recommend an? (" + "|".join(map(re.escape, synthetic.GENRES)) + r") movie", re.IGNORECASE)
_MOOD = re.compile(r"something (" + "|".join(synthetic.ITEM_MOODS) + r") would be nice", re.IGNORECASE)


def stated_wishes(context: list[dict]) -> tuple[str | None, str | None]:
    """``(genre, mood)`` the synthetic seeker asked for in the context's seeker turns (the latest statement of each),
    ``None`` for what they did not say (a happy seeker states no mood).

    >>> stated_wishes([{"role": "seeker", "text": "Hi! I'm so bored tonight. Can you recommend a sci-fi movie? "
    ...                 "Something thrilling would be nice.", "items": []}])
    ('sci-fi', 'thrilling')
    """
    genre = mood = None
    for t in context:
        if t["role"] != SEEKER:
            continue
        genres, moods = _GENRE.findall(t["text"]), _MOOD.findall(t["text"])
        genre = genres[-1].lower() if genres else genre
        mood = moods[-1].lower() if moods else mood
    return genre, mood


class AttributeOraclePolicy:
    """The synthetic scenario's reference policy: it acts on what the seeker has *said*, and nothing else.

    From the seeker turns it reads the genre asked for (``Can you recommend a comedy movie?``) and the mood wished
    (``Something uplifting would be nice.``), as :func:`stated_wishes`, and names the most popular item (catalogue
    ``popularity`` column) of that genre and mood not yet mentioned; with none left, of that genre; then the most
    popular unmentioned item. It never reads the hidden persona (other liked genres, favourite era, seen items), so
    it is what a policy that fully understood the request reaches, not the best possible policy.

    Args:
        catalogue: the synthetic catalogue (``attributes`` as ``genre=..; mood=..; era=..``).
        noun: what the items are called.
    """

    def __init__(self, catalogue, noun: str = "movie"):
        rows = catalogue_rows(catalogue)
        order = sorted(range(len(rows)), key=lambda i: -rows[i]["popularity"])  # stable: ties in catalogue order
        self.ranked = []
        for i in order:
            attrs = dict(kv.split("=", 1) for kv in (rows[i]["attributes"] or "").split("; ") if "=" in kv)
            self.ranked.append((rows[i]["item_id"], rows[i]["name"], attrs.get("genre"), attrs.get("mood")))
        self.noun = noun

    def pick(self, context: list[dict]) -> tuple[str, str]:
        """``(item_id, name)`` of the recommendation for one context."""
        genre, mood = stated_wishes(context)
        taken = mentioned(context)
        free = [r for r in self.ranked if r[0] not in taken] or self.ranked
        for want_genre, want_mood in ((genre, mood), (genre, None)):
            match = next((r for r in free if want_genre in (None, r[2]) and want_mood in (None, r[3])), None)
            if match is not None:
                return match[0], match[1]
        return free[0][0], free[0][1]

    def __call__(self, contexts: list[list[dict]]) -> list[str]:
        return [phrase(self.pick(context)[1], context, self.noun) for context in contexts]


#: The same system prompt the DataModules train with, so a policy is prompted as it was trained.
RECOMMENDER_PROMPT = DEFAULT_SYSTEM_PROMPT


class LMPolicy:
    """A causal LM as the recommender: chat template, batched left-padded ``generate`` with the KV cache.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (with a chat template and a pad token).
        system_prompt: the recommender's instructions (None: no system message).
        max_new_tokens: longest reply, in tokens.
        do_sample: sample (True) or decode greedily.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        top_k: top-k sampling (0: off).
        max_context_tokens: longest prompt; the oldest turns are dropped to fit.
        seed: seeds each call's sampling (``seed + call number``); None leaves torch's global generator alone.
    """

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str | None = RECOMMENDER_PROMPT,
        max_new_tokens: int = 64,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 0,
        max_context_tokens: int = 768,
        seed: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_context_tokens = system_prompt, max_context_tokens
        self.engine = chat_engine(model, tokenizer, max_new_tokens, do_sample, temperature, top_p, top_k)
        self.seed, self.calls = seed, 0

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> LMPolicy:
        """Loads model and tokenizer with :mod:`crslight.models.loading` (aliases such as ``"smollm2"``, local
        folders, ``.gguf`` files; nothing is downloaded by crslight itself)."""
        from crslight.models.loading import load_causal_lm, load_tokenizer

        model = load_causal_lm(name_or_path)
        model.eval()
        return cls(model, load_tokenizer(name_or_path, padding_side="left"), **kwargs)

    def __call__(self, contexts: list[list[dict]]) -> list[str]:
        seed = None if self.seed is None else self.seed + self.calls
        self.calls += 1
        return generate_chat(self.engine, contexts, self.system_prompt, max_context_tokens=self.max_context_tokens,
                             seed=seed)


#: Built-in policy names: ``random`` (uniform over unmentioned items), ``popularity`` (most accepted in the train
#: split, :func:`interaction_counts`), ``popularity-catalogue`` (the catalogue's ``popularity`` column), ``oracle``
#: (synthetic only: the most popular item of the genre and mood the seeker stated, :class:`AttributeOraclePolicy`).
POLICIES = ("random", "popularity", "popularity-catalogue", "oracle")
#: What the baselines call an item, per dataset.
NOUNS = {"redial": "movie", "synthetic": "movie", "opendialkg": "one"}


def make_policy(name: str, corpus, seed: int = 0, root: str | None = None, train=None) -> Policy:
    """A policy by name (see :data:`POLICIES`), else a model name / folder run as an :class:`LMPolicy` (an exported
    crslight policy, which carries its item scores, through the decoding engine).

    Args:
        name: a built-in name or a model name / folder.
        corpus: the split the episodes come from (its catalogue is the policy's).
        seed: seeds ``random`` and an LM's sampling.
        root: the dataset's folder (for loading the train split).
        train: the train split whose acceptances rank ``popularity`` (default: loaded from ``root`` with the
            default options; pass the DataModule's when it has its own, e.g. a smaller synthetic scenario).

    Raises:
        ValueError: for ``oracle`` on a dataset other than ``synthetic``, or a path that is not a model folder.
    """
    noun = NOUNS.get(corpus.name, "movie")
    if name == "random":
        return RandomPolicy(corpus.catalogue, seed=seed, noun=noun)
    if name == "popularity":
        from crslight.data import load_corpus

        if train is None:
            train = corpus if corpus.split == "train" else load_corpus(corpus.name, root, "train")
        return PopularityPolicy(corpus.catalogue, interaction_counts(train.dialogues), noun=noun)
    if name == "popularity-catalogue":
        return PopularityPolicy(corpus.catalogue, noun=noun)
    if name == "oracle":
        if corpus.name != "synthetic":
            raise ValueError(f"the oracle policy reads the genre and mood that synthetic seekers state; it needs "
                             f"--dataset synthetic, not {corpus.name!r}")
        return AttributeOraclePolicy(corpus.catalogue, noun=noun)
    path = Path(name).expanduser()
    if (path.is_absolute() or name.startswith(".")) and not path.exists():
        raise ValueError(f"unknown policy {name!r}: not one of {', '.join(POLICIES)}, and no such model folder")
    from crslight.models.retrieval import load_item_scores

    item_scores = load_item_scores(path) if path.is_dir() else None
    if item_scores is not None:  # an exported crslight policy: recommend through its item scores, as in training
        return engine_policy(name, item_scores, seed)
    return LMPolicy.from_pretrained(name, seed=seed)


def engine_policy(folder: str, item_scores: tuple, seed: int = 0) -> Policy:
    """An exported policy folder with its item scores (``crslight export``) as an environment policy: replies decoded
    by the engine (temperature 0.8, top-k 50), the best item not yet mentioned drawn at each recommendation slot."""
    from crslight.models.engine import Engine, EnginePolicy
    from crslight.models.loading import load_causal_lm, load_tokenizer
    from crslight.models.tokenize import encode_prompt

    head, item_ids, names = item_scores
    model, tokenizer = load_causal_lm(folder).eval(), load_tokenizer(folder, padding_side="left", item_token=True)
    engine = Engine(model, tokenizer, head, names, max_new_tokens=64, temperature=0.8, top_k=50, greedy_items=True)
    slot_names = dict(zip(item_ids, names, strict=True))
    return EnginePolicy(engine, lambda turns: encode_prompt(tokenizer, turns, RECOMMENDER_PROMPT, 768, slot_names),
                        item_ids, seed=seed)
