"""GroundedSimulator: a user grounded in a real dialogue's seeker (ReDial, OpenDialKG).

Who the user is. ReDial's questionnaire says, for each movie of a dialogue, whether the seeker had seen it and liked
it. The simulated user *accepts* the items the seeker liked without having seen them (``liked = 1, seen != 1``: the
suggestions the real seeker took up), *rejects* what they had seen (``seen = 1``) or did not like (``liked = 0``), and
uses seen-and-liked movies as hints about their taste. OpenDialKG has no questionnaire, so the targets are the items
the real recommender mentioned from the episode's start on (what the real conversation went on to talk about), and
the items already discussed count as seen. All of it is hidden from the policy, which only reads the turns.

How the user answers a reply (items read by the item linker):

1. an item among the targets → accept (the episode ends with a success);
2. an item suggested earlier in the episode → annoyed rejection; an item seen → "seen it"; an item disliked → "not
   for me";
3. other items → feedback built from item attributes, comparing the item with a target (``year=``/``era=``: "older /
   more recent", ``genre=``, ``mood=``), or a plain "not quite" when the catalogue has no attributes; with
   probability ``accept_other`` (default 0) an unplanned suggestion is accepted anyway;
4. no item → the user gives a hint: a movie they liked, or an attribute of a target, or asks for a suggestion.

After any answer that is not an acceptance the user leaves with probability
``min(0.95, leave_base + leave_step * failures)``, rising with every unsuccessful turn. Sentiment is fixed per kind of
answer (accept 0.8, seen 0.1 or -0.2, disliked -0.6, repeated -0.5, unknown -0.3, hint 0.1, leaving -0.5) plus
N(0, 0.05) noise, and the wording carries it: the sign of VADER's compound score on the utterances of each kind
matches the latent value (a test checks it), so a text sentiment signal reads what the simulator meant. The
dwell time comes from :mod:`crslight.simulator.dwell` (fitted on real ReDial gaps) under the answer's condition.

Utterances are composed from a few openers × bodies × closers per kind, in the casual style of ReDial seekers
(``style="redial"``) or the more neutral, multi-domain style of OpenDialKG users (``style="opendialkg"``).
"""

from __future__ import annotations

import numpy as np

from crslight.data.synthetic import attributes
from crslight.schema import NOT_SAID, RECOMMENDER
from crslight.simulator.base import Reaction, UserSimulator, UserState, catalogue_rows
from crslight.simulator.dwell import REDIAL_DWELL, DwellModel

SENTIMENT = {"accept": 0.8, "seen_liked": 0.1, "seen": -0.2, "disliked": -0.6, "repeat": -0.5, "unknown": -0.3,
             "hint": 0.1, "leave": -0.5}

TEMPLATES = {
    "redial": {
        "accept": (["Oh nice!", "Ooh,", "Yes!", "Oh wow,"],
                   ["I haven't seen {title} yet but it sounds great, I'll definitely check it out.",
                    "{title} sounds perfect, that's exactly what I was looking for!",
                    "I've been meaning to watch {title}, great suggestion!",
                    "I love that idea, {title} is going on my list tonight."],
                   ["Thanks so much!", "Thank you!", "Thanks, you've been a great help!"]),
        "seen_liked": (["Oh,", "Haha,", ""], ["I've already seen {title}, I loved it though!",
                                              "I saw {title} already, it was really good."],
                       ["Anything else like it?", "Do you have any others?", "What else would you suggest?"]),
        "seen": (["Hmm,", "Oh no,", ""], ["I've already seen {title}, unfortunately.",
                                          "I saw {title} a while ago, sadly."],
                 ["Any others?", "Can you suggest something else?", "What else do you have?"]),
        "disliked": (["Hmm,", "Honestly,", "Ugh,"], ["I didn't like {title} at all.", "{title} was boring.",
                                                    "I hated {title}, sorry."],
                     ["Anything else?", "Do you have something different?"]),
        "repeat": (["Ugh,", "Come on,"], ["you already suggested {title}.", "we talked about {title} already."],
                   ["That's annoying.", "I'm getting bored."]),
        "unknown": (["Meh,", "Hmm, not sure,", "I don't know,"], ["{feedback}"],
                    ["What else do you have?", "Any others?", ""]),
        "hint": (["Well,", "Let me think,", ""], ["{hint}"], ["Do you have any suggestions?",
                                                              "What would you recommend?", ""]),
        "leave": ([""], ["Never mind, this isn't helping. I'll look for something on my own.",
                         "Forget it, I'm giving up. Bye.", "This is boring, I have to go. Bye."], [""]),
    },
    "opendialkg": {
        "accept": (["Oh,", "Great,", ""], ["{title} sounds really interesting, I'll look into it.",
                                           "I didn't know about {title}, thanks, I'll check it out!",
                                           "That's a great suggestion, I'd like to learn more about {title}."],
                   ["Thank you!", "Thanks for the help."]),
        "seen_liked": ([""], ["I already know {title}, and I like it a lot.", "Yes, I'm a fan of {title} already."],
                       ["What else is there?", "Can you tell me about something similar?"]),
        "seen": ([""], ["I already know {title}, unfortunately.", "Sadly I'm already familiar with {title}."],
                 ["Anything else?", "What else can you tell me about?"]),
        "disliked": ([""], ["I'm not interested in {title} at all.", "I really dislike {title}."],
                     ["Anything else?", "Do you know anything different?"]),
        "repeat": ([""], ["You mentioned {title} already, that's annoying."], ["Anything else?"]),
        "unknown": (["Meh,", "Hmm, not sure,"], ["{feedback}"], ["Do you know anything else?", "Any other ideas?"]),
        "hint": ([""], ["{hint}"], ["Can you recommend something?", "What would you suggest?"]),
        "leave": ([""], ["Never mind, this isn't helping. Bye.", "Forget it, I'm giving up. Goodbye."], [""]),
    },
}


def compose(rng: np.random.Generator, style: str, kind: str, **slots: str) -> str:
    """One utterance of ``kind``: a random opener, body and closer of the style, with ``slots`` filled in."""
    openers, bodies, closers = TEMPLATES[style][kind]
    parts = [str(rng.choice(openers)), str(rng.choice(bodies)).format(**slots), str(rng.choice(closers))]
    text = " ".join(p for p in parts if p)
    return text[0].upper() + text[1:] if text else text


def _year(attrs: dict[str, str]) -> int | None:
    value = attrs.get("year") or attrs.get("era", "")[:4]
    return int(value) if value.isdigit() else None


def attribute_feedback(item: dict, target: dict | None, noun: str = "movie") -> str:
    """Why an item is not quite it, from the first attribute where it differs from the target."""
    name = item["name"]
    a, b = attributes(item), attributes(target) if target is not None else {}
    for key in ("genre", "mood"):
        if key in a and key in b and a[key] != b[key]:
            return f"I'm more in the mood for something {b[key]} than a {a[key]} {noun} like {name}."
    ya, yb = _year(a), _year(b)
    if ya is not None and yb is not None and abs(ya - yb) >= 10:
        if ya < yb:
            return f"{name} seems a bit old for me, I'd prefer something more recent."
        return f"I'm looking for more of an older classic than {name}."
    return f"I'm not sure {name} is really my thing."


def attribute_hint(target: dict | None, noun: str = "movie") -> str:
    """A hint about a target from its attributes (genre, mood, decade)."""
    attrs = attributes(target) if target is not None else {}
    if "genre" in attrs:
        return f"I'd really like a good {attrs['genre']} {noun}."
    year = _year(attrs)
    if year is not None and year >= 2010:
        return "I'd like something recent."
    if year is not None:
        return f"I'm in the mood for something from the {year // 10 * 10}s."
    return f"I'm just looking for a good {noun}."


class GroundedSimulator(UserSimulator):
    """A user grounded in a real seeker's questionnaire answers (or, without them, the real recommender's items).

    Args:
        catalogue: the item catalogue (``Corpus.catalogue``, a dict of columns or a list of rows).
        dwell: the dwell-time model; defaults to the ReDial fit.
        style: ``redial`` (casual movie talk) or ``opendialkg`` (neutral, multi-domain).
        leave_base: probability of leaving after the first unsuccessful turn, before the per-turn increase.
        leave_step: added to the leaving probability per unsuccessful turn.
        accept_other: probability of accepting a suggestion that is neither a target nor seen nor disliked.
        noun: what the items are called in utterances.
    """

    def __init__(
        self,
        catalogue,
        dwell: DwellModel | None = None,
        style: str = "redial",
        leave_base: float = 0.0,
        leave_step: float = 0.1,
        accept_other: float = 0.0,
        noun: str = "movie",
    ):
        if style not in TEMPLATES:
            raise ValueError(f"unknown style {style!r}: expected one of {', '.join(TEMPLATES)}")
        self.items = {row["item_id"]: row for row in catalogue_rows(catalogue)}
        self.dwell = dwell or REDIAL_DWELL
        self.style, self.noun = style, noun
        self.leave_base, self.leave_step, self.accept_other = leave_base, leave_step, accept_other

    def _hidden(self, dialogue: dict, prefix_len: int) -> tuple[list[str], set[str], set[str], list[str]]:
        """``(targets, seen, disliked, liked)`` of the dialogue's seeker for a context of ``prefix_len`` turns."""
        turns = dialogue["turns"]
        context_items = {i for tr in turns[:prefix_len] for i in tr["items"]}
        labels = [a for a in dialogue.get("labels") or [] if a["item"] in self.items]
        seen = {a["item"] for a in labels if a["seen"] == 1}
        disliked = {a["item"] for a in labels if a["liked"] == 0 and a["seen"] != 1}
        liked = [a["item"] for a in labels if a["seen"] == 1 and a["liked"] == 1]
        targets = [a["item"] for a in labels if a["liked"] == 1 and a["seen"] != 1]
        if not labels:  # OpenDialKG: what the real recommender went on to mention
            later = [i for tr in turns[prefix_len:] if tr["role"] == RECOMMENDER for i in tr["items"]]
            seen = context_items
            targets = [i for i in dict.fromkeys(later) if i in self.items]
        targets = [t for t in targets if t not in context_items and t not in seen and t not in disliked]
        return targets, seen, disliked, liked

    def prefix_points(self, dialogue: dict) -> list[int]:
        """Recommender turns before any target was named, where at least one target remains to be found."""
        turns = dialogue["turns"]
        return [t for t in range(1, len(turns)) if turns[t]["role"] == RECOMMENDER and self._hidden(dialogue, t)[0]]

    def start(self, dialogue: dict, prefix_len: int, rng: np.random.Generator) -> UserState:
        targets, seen, disliked, liked = self._hidden(dialogue, prefix_len)
        context_items = {i for tr in dialogue["turns"][:prefix_len] for i in tr["items"]}
        return UserState(dialogue["dialogue_id"], targets=targets, seen=seen, disliked=disliked, liked=liked,
                         hinted=set(context_items))

    def _leaves(self, state: UserState, rng: np.random.Generator) -> bool:
        return bool(rng.random() < min(0.95, self.leave_base + self.leave_step * state.failures))

    def react(
        self, state: UserState, context: list[dict], reply: str, items: list[str], rng: np.random.Generator
    ) -> Reaction:
        items = [i for i in items if i in self.items]
        target = self.items[state.targets[0]] if state.targets else None
        labels = {
            i: {"suggested": 1,
                "seen": 1 if i in state.seen else 0 if i in state.targets else NOT_SAID,
                "liked": 1 if i in state.targets or i in state.liked else 0 if i in state.disliked else NOT_SAID}
            for i in items
        }
        hit = next((i for i in items if i in state.targets), None)
        if hit is None and items and self.accept_other > 0:
            fresh = [i for i in items if i not in state.seen and i not in state.disliked and i not in state.suggested]
            if fresh and rng.random() < self.accept_other:
                hit = fresh[0]
                labels[hit].update(seen=0, liked=1)
        mentions: list[str] = []
        if hit is not None:
            kind, mood, mentions = "accept", "accept", [hit]
            state.accepted = hit
        elif items:
            kind, first, mood = "reject", items[0], "unknown"
            for name, pool in (("repeat", state.suggested), ("seen", state.seen), ("disliked", state.disliked)):
                found = next((i for i in items if i in pool), None)
                if found is not None:
                    first, mood = found, name
                    break
            if mood == "seen" and first in state.liked:
                mood = "seen_liked"
            mentions = [first]
        else:
            kind, mood = "other", "hint"
        state.suggested.extend(i for i in items if i not in state.suggested)
        left = False
        if hit is None:
            state.failures += 1
            left = self._leaves(state, rng)
            state.left = left
        if left:
            text, sentiment_key, mentions = compose(rng, self.style, "leave"), "leave", []
        else:
            slots = {"title": self.items[mentions[0]]["name"] if mentions else ""}
            if mood == "unknown":
                slots["feedback"] = attribute_feedback(self.items[first], target, self.noun)
            if mood == "hint":
                slots["hint"], mentions = self._hint(state, target)
            text, sentiment_key = compose(rng, self.style, mood, **slots), mood
        sentiment = float(np.clip(SENTIMENT[sentiment_key] + rng.normal(0.0, 0.05), -1.0, 1.0))
        return Reaction(text=text, kind=kind, accepted=hit is not None, left=left, sentiment=sentiment,
                        dwell_time=self.dwell.sample(rng, kind), items=items, labels=labels, mentions=mentions)

    def _hint(self, state: UserState, target: dict | None) -> tuple[str, list[str]]:
        """A seen-and-liked item not yet named in the dialogue, else an attribute of a target."""
        for item in state.liked:
            if item not in state.hinted:
                state.hinted.add(item)
                return f"I really liked {self.items[item]['name']}.", [item]
        return attribute_hint(target, self.noun), []
