"""The synthetic scenario: a seeded generator of catalogue, personas, dialogues and implicit feedback.

It is every stage's embedded default: it needs no download, and because the users' tastes are known, it says whether
a policy learned what the implicit signals reward.

Generative story (all draws from ``numpy.random.default_rng(seed)``):

1. **Catalogue.** ``n_items`` movies, each with a genre (8), a mood (uplifting, calm, thrilling, dark), an era
   (1970s-2020s) and a Zipf-like popularity; the title is built from word lists and the era's year.
2. **Persona.** A seeker has a taste over genres (Dirichlet, alpha 0.5: a few favourite genres), a favourite era,
   and a current mood (sad, stressed, bored, happy). The mood sets which item moods please them: a sad user is
   lifted by *uplifting* items and put off by *dark* ones, a stressed one wants *calm*, a bored one *thrilling*; a
   happy user is indifferent to mood.
3. **Utility** of an item for a persona: ``3 * taste[genre] * n_genres / 8 + mood_bonus + 0.3 * [era == favourite]
   + 0.2 * popularity_rank_score + N(0, 0.3)``; the seeker accepts when utility > 1.0 and it has not seen the item
   (each item seen with probability 0.1, more for popular ones).
4. **Dialogue.** The seeker opens with their mood and a favourite genre. The recommender (a noisy oracle: with
   probability ``skill`` it proposes one of the persona's best unseen items, otherwise a popularity-weighted draw)
   suggests one item per turn. The seeker answers in words whose sentiment follows the utility (enthusiastic,
   lukewarm, negative, "already seen it") and either accepts (dialogue ends with thanks), rejects and asks again,
   or leaves (probability rising with each rejection). At most ``max_rounds`` suggestions.
5. **Implicit feedback.** Time offsets: a turn takes reading time (words / 4 per second) plus a dwell before the
   seeker answers, log-normal with a median of 25 s after an accepted suggestion and 9 s after a rejected one.
   Questionnaire labels as in ReDial (suggested = 1; seen; liked = utility > 1.0), and a 1-5 dialogue rating that
   rises with acceptance and falls with the number of rejections.

The persona is stored as JSON in each dialogue's ``persona`` field, so simulators and tests can recover it.
"""

from __future__ import annotations

import json
import math

import numpy as np

from crslight.schema import RECOMMENDER, SEEKER, turn

GENRES = ["comedy", "drama", "horror", "romance", "sci-fi", "action", "animation", "documentary"]
ITEM_MOODS = ["uplifting", "calm", "thrilling", "dark"]
ERAS = ["1970s", "1980s", "1990s", "2000s", "2010s", "2020s"]
USER_MOODS = {  # user mood -> (liked item mood, disliked item mood, how they say it)
    "sad": ("uplifting", "dark", "I'm feeling a bit down today"),
    "stressed": ("calm", "thrilling", "I've had a stressful week"),
    "bored": ("thrilling", "calm", "I'm so bored tonight"),
    "happy": (None, None, "I'm in a great mood"),
}
ADJECTIVES = ["Silent", "Golden", "Broken", "Hidden", "Last", "Crimson", "Wild", "Quiet", "Electric", "Lonely",
              "Secret", "Endless", "Frozen", "Burning", "Little", "Midnight", "Lost", "Brave", "Distant", "Falling"]
NOUNS = ["River", "Garden", "Kingdom", "Signal", "Harbor", "Engine", "Orchard", "Mirror", "Voyage", "Summer",
         "Lantern", "Forest", "Station", "Promise", "Horizon", "Circus", "Letter", "Island", "Storm", "Machine"]
ACCEPT_THRESHOLD = 1.0
CATALOGUE_SEED_OFFSET = 1_000_003
SPLIT_SEED_OFFSET = {"train": 0, "valid": 1, "test": 2}
#: the recommender's reply after the seeker accepted a suggestion (it closes every accepted dialogue)
CLOSING = "Enjoy the movie! Anything else I can help with?"


def make_catalogue(seed: int, n_items: int = 400) -> list[dict]:
    """The item catalogue (rows of the catalogue schema); ``attributes`` is ``genre=..; mood=..; era=..``."""
    rng = np.random.default_rng(seed + CATALOGUE_SEED_OFFSET)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum() * 1000)
    names: set[str] = set()
    rows = []
    for i in range(n_items):
        genre, mood, era = rng.choice(GENRES), rng.choice(ITEM_MOODS), rng.choice(ERAS)
        year = int(era[:4]) + int(rng.integers(0, 10))
        while True:
            name = f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} ({year})"
            if name not in names:
                break
            year = year + 1 if year % 10 != 9 else year - 9
        names.add(name)
        rows.append(
            {"item_id": f"syn{i}", "name": name, "popularity": float(round(popularity[i], 3)),
             "attributes": f"genre={genre}; mood={mood}; era={era}"}
        )
    return rows


def attributes(item: dict) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in item["attributes"].split("; ") if "=" in kv)


def make_persona(rng: np.random.Generator, n_items: int) -> dict:
    return {
        "taste": [round(float(x), 4) for x in rng.dirichlet([0.5] * len(GENRES))],
        "era": str(rng.choice(ERAS)),
        "mood": str(rng.choice(list(USER_MOODS))),
        "seen": sorted(int(i) for i in np.flatnonzero(rng.random(n_items) < 0.1)),
    }


def utility(persona: dict, item: dict, popularity_rank: float = 0.0, noise: float = 0.0) -> float:
    """How much a persona likes an item (above :data:`ACCEPT_THRESHOLD` = liked). Deterministic when ``noise`` = 0."""
    attrs = attributes(item)
    liked_mood, disliked_mood, _ = USER_MOODS[persona["mood"]]
    mood_bonus = 0.6 if attrs["mood"] == liked_mood else -0.6 if attrs["mood"] == disliked_mood else 0.0
    taste = persona["taste"][GENRES.index(attrs["genre"])] * len(GENRES) / 8
    return 3 * taste + mood_bonus + 0.3 * (attrs["era"] == persona["era"]) + 0.2 * popularity_rank + noise


def reaction_text(rng: np.random.Generator, item: dict, value: float, seen: bool, accepted: bool) -> str:
    """The seeker's words after a suggestion; their sentiment follows the utility."""
    attrs, name = attributes(item), item["name"]
    if seen:
        return str(rng.choice([f"I've already seen {name}.", f"Seen {name} already, something else?"]))
    if accepted:
        return str(rng.choice([
            f"Oh I love that idea, {name} sounds perfect! I'll watch it tonight.",
            f"Great suggestion, thanks! {name} is exactly what I wanted.",
            f"Yes! {name} sounds wonderful, I'm going to watch it.",
        ]))
    if value > ACCEPT_THRESHOLD - 0.5:
        return str(rng.choice([
            f"Hmm, {name} is okay I guess, but not quite it. Anything else?",
            f"Maybe. I'm not sure a {attrs['genre']} movie is what I need. What else do you have?",
        ]))
    return str(rng.choice([
        f"No, I really don't want something {attrs['mood']} right now.",
        f"Ugh, I hate {attrs['genre']} movies. Please suggest something else.",
        "That sounds terrible for my mood, no thanks.",
    ]))


def _dwell(rng: np.random.Generator, accepted: bool) -> float:
    return float(rng.lognormal(math.log(25.0 if accepted else 9.0), 0.5))


def generate_dialogue(
    rng: np.random.Generator, index: int, catalogue: list[dict], ranks: np.ndarray, skill: float, max_rounds: int
) -> dict:
    persona = make_persona(rng, len(catalogue))
    seen = set(persona["seen"])
    liked_mood, _, opener = USER_MOODS[persona["mood"]]
    genre = GENRES[int(np.argmax(persona["taste"]))]
    mood_wish = f" Something {liked_mood} would be nice." if liked_mood else ""
    clock = 0.0
    turns = [turn(SEEKER, f"Hi! {opener}. Can you recommend a {genre} movie?{mood_wish}", time=clock)]
    values = np.array([utility(persona, it, ranks[i]) for i, it in enumerate(catalogue)])
    weights = np.array([it["popularity"] for it in catalogue])
    order = np.argsort(-values)
    proposed: list[int] = []
    labels, accepted = [], False
    for round_no in range(max_rounds):
        if rng.random() < skill:
            candidates = [int(i) for i in order[:20] if i not in proposed and i not in seen]
            pick = candidates[int(rng.integers(0, min(3, len(candidates))))] if candidates else int(order[0])
        else:
            free = np.array([i not in proposed for i in range(len(catalogue))], dtype=float) * weights
            pick = int(rng.choice(len(catalogue), p=free / free.sum()))
        proposed.append(pick)
        item = catalogue[pick]
        attrs = attributes(item)
        reply = str(rng.choice([
            f"How about {item['name']}? It's a {attrs['mood']} {attrs['genre']} movie.",
            f"You might enjoy {item['name']}, a {attrs['genre']} film from the {attrs['era']}.",
            f"I'd suggest {item['name']}. It's {attrs['mood']} and very popular.",
        ]))
        clock += 5.0 + len(reply.split()) / 4.0
        turns.append(turn(RECOMMENDER, reply, [item["item_id"]], time=clock))
        value = values[pick] + float(rng.normal(0, 0.3))
        is_seen = pick in seen
        accepted = not is_seen and value > ACCEPT_THRESHOLD
        labels.append({"item": item["item_id"], "suggested": 1, "seen": int(is_seen),
                       "liked": int(values[pick] > ACCEPT_THRESHOLD) if not is_seen else 2})
        clock += len(reply.split()) / 4.0 + _dwell(rng, accepted)
        turns.append(turn(SEEKER, reaction_text(rng, item, value, is_seen, accepted), [item["item_id"]], time=clock))
        if accepted:
            clock += 6.0
            turns.append(turn(RECOMMENDER, CLOSING, time=clock))
            clock += _dwell(rng, True)
            turns.append(turn(SEEKER, "No, that's all. Thank you!", time=clock))
            break
        if rng.random() < 0.15 * (round_no + 1):  # the user gives up
            clock += 3.0
            turns.append(turn(SEEKER, "Never mind, I'll look for something myself. Bye.", time=clock))
            break
    rejections = len(proposed) - int(accepted)
    rating = float(np.clip(3 + 2 * accepted - 0.7 * rejections + rng.normal(0, 0.4), 1, 5).round())
    return {"dialogue_id": f"syn-{index}", "turns": turns, "labels": labels, "rating": rating,
            "persona": json.dumps(persona)}


def generate(
    seed: int = 0, n_dialogues: int = 1000, n_items: int = 400, skill: float = 0.5, max_rounds: int = 4,
    split: str = "train",
) -> tuple[list[dict], list[dict]]:
    """Generates one split: ``(dialogues, catalogue)``. The same arguments always give the same data."""
    catalogue = make_catalogue(seed, n_items)
    pops = np.array([it["popularity"] for it in catalogue])
    ranks = pops.argsort().argsort() / max(1, len(pops) - 1)
    rng = np.random.default_rng([seed, SPLIT_SEED_OFFSET[split]])
    dialogues = [
        generate_dialogue(rng, i, catalogue, ranks, skill, max_rounds) for i in range(n_dialogues)
    ]
    for i, d in enumerate(dialogues):
        d["dialogue_id"] = f"syn-{split}-{i}"
    return dialogues, catalogue
