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
- :class:`LMPolicy` asks a causal LM (chat template, seeker → ``user``, recommender → ``assistant``).

The baselines phrase their pick as a sentence with the title (so the item linker, not a side channel, reads it).
:class:`RandomPolicy` draws from a generator seeded by ``(seed, crc32 of the context)``: the same context always gets
the same reply whatever the batch it arrives in, which keeps episodes independent of the batch size.
"""

from __future__ import annotations

import zlib

import numpy as np

from crslight.data.schema import RECOMMENDER
from crslight.data.tokenize import DEFAULT_SYSTEM_PROMPT
from crslight.simulator.base import catalogue_rows
from crslight.simulator.lm import generate_chat, to_chat

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
        self.system_prompt, self.max_new_tokens = system_prompt, max_new_tokens
        self.max_context_tokens = max_context_tokens
        self.do_sample, self.temperature, self.top_p, self.top_k = do_sample, temperature, top_p, top_k
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
        conversations = [to_chat(context, self.system_prompt) for context in contexts]
        return generate_chat(
            self.model, self.tokenizer, conversations, self.max_new_tokens, self.do_sample, self.temperature,
            self.top_p, self.top_k, self.max_context_tokens, seed,
        )
