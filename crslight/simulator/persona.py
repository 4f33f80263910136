"""PersonaSimulator: the synthetic scenario's seeker, driven by the persona stored in each synthetic dialogue.

The synthetic generator (:mod:`crslight.data.synthetic`) already tells the whole story of a user: latent genre
tastes, a favourite era, a current mood that decides which item moods please them (a sad user is lifted by
*uplifting* items and put off by *dark* ones), ``utility(persona, item)``, the acceptance threshold, the reaction
wording and the log-normal dwell times. This simulator replays that story on the policy's replies instead of the
generator's noisy oracle recommender, reusing those functions rather than re-deriving them, so that a policy trained
in simulation is judged by the very rules that produced its training data.

Per reply: the items the linker found are scored with ``utility`` plus N(0, ``noise``) (the generator's 0.3); an
unseen item above ``ACCEPT_THRESHOLD`` is accepted (the best one when several are named); otherwise the seeker reacts
to the first item with the generator's ``reaction_text`` (sentiment follows the utility). A reply without an item
gets the seeker's request again. As in the generator, the seeker leaves after an unsuccessful turn with probability
``leave_step * failures`` (0.15 per failure). Dwell times follow the generator (log-normal, median 25 s after an
accepted suggestion, 9 s otherwise), so simulated and synthetic logs share one distribution.
"""

from __future__ import annotations

import json

import numpy as np

from crslight.data import synthetic
from crslight.schema import NOT_SAID
from crslight.simulator.base import Reaction, UserSimulator, UserState, catalogue_rows


class PersonaSimulator(UserSimulator):
    """A synthetic seeker with the latent tastes and mood of the dialogue's ``persona`` JSON.

    Args:
        catalogue: the synthetic catalogue (``Corpus.catalogue``, a dict of columns or a list of rows), in the
            generator's order (the persona's ``seen`` holds row numbers).
        noise: standard deviation of the utility noise per reaction.
        leave_step: probability of leaving per unsuccessful turn so far.
    """

    def __init__(self, catalogue, noise: float = 0.3, leave_step: float = 0.15):
        self.rows = catalogue_rows(catalogue)
        self.row_of = {row["item_id"]: i for i, row in enumerate(self.rows)}
        pops = np.array([row["popularity"] for row in self.rows])
        self.ranks = pops.argsort().argsort() / max(1, len(pops) - 1)
        self.noise, self.leave_step = noise, leave_step

    def prefix_points(self, dialogue: dict) -> list[int]:
        return super().prefix_points(dialogue) if dialogue.get("persona") else []

    def start(self, dialogue: dict, prefix_len: int, rng: np.random.Generator) -> UserState:
        persona = json.loads(dialogue["persona"])
        seen = {self.rows[i]["item_id"] for i in persona["seen"] if i < len(self.rows)}
        state = UserState(dialogue["dialogue_id"], seen=seen, persona=persona)
        state.suggested = list(dict.fromkeys(i for tr in dialogue["turns"][:prefix_len] for i in tr["items"]))
        return state

    def value(self, persona: dict, item_id: str, noise: float = 0.0) -> float:
        """The persona's utility of an item (``synthetic.utility`` with the catalogue's popularity rank)."""
        row = self.row_of[item_id]
        return synthetic.utility(persona, self.rows[row], float(self.ranks[row]), noise)

    def react(
        self, state: UserState, context: list[dict], reply: str, items: list[str], rng: np.random.Generator
    ) -> Reaction:
        items = [i for i in items if i in self.row_of]
        persona = state.persona
        values = {i: self.value(persona, i, float(rng.normal(0.0, self.noise))) for i in items}
        ok = [i for i in items if i not in state.seen and values[i] > synthetic.ACCEPT_THRESHOLD]
        labels = {
            i: {"suggested": 1, "seen": int(i in state.seen),
                "liked": NOT_SAID if i in state.seen else int(self.value(persona, i) > synthetic.ACCEPT_THRESHOLD)}
            for i in items
        }
        hit = max(ok, key=lambda i: values[i]) if ok else None
        state.suggested.extend(i for i in items if i not in state.suggested)
        if hit is not None:
            state.accepted = hit
            text = synthetic.reaction_text(rng, self.rows[self.row_of[hit]], values[hit], False, True)
            sentiment = float(np.clip(values[hit] - synthetic.ACCEPT_THRESHOLD, 0.2, 1.0))
            kind, mentions = "accept", [hit]
        elif items:
            first = items[0]
            seen = first in state.seen
            text = synthetic.reaction_text(rng, self.rows[self.row_of[first]], values[first], seen, False)
            sentiment = -0.1 if seen else float(np.clip(values[first] - synthetic.ACCEPT_THRESHOLD, -1.0, -0.05))
            kind, mentions = "reject", [first]
        else:
            liked_mood, _, opener = synthetic.USER_MOODS[persona["mood"]]
            genre = synthetic.GENRES[int(np.argmax(persona["taste"]))]
            wish = f" Something {liked_mood} would be nice." if liked_mood else ""
            text = f"{opener}. Can you recommend a {genre} movie?{wish}"
            sentiment, kind, mentions = 0.0, "other", []
        left = False
        if hit is None:
            state.failures += 1
            left = state.left = bool(rng.random() < self.leave_step * state.failures)
            if left:
                text, sentiment, mentions = "Never mind, I'll look for something myself. Bye.", -0.4, []
        return Reaction(text=text, kind=kind, accepted=hit is not None, left=left, sentiment=sentiment,
                        dwell_time=synthetic._dwell(rng, hit is not None), items=items, labels=labels,
                        mentions=mentions)
