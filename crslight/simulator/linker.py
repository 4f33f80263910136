"""Item linker: generated text → catalogue item ids (the simulator reads replies with it; the evaluation reuses it).

Why a dictionary scanner and not an embedding search: a reply names items by title, and the reward hinges on which
title it named. An exact index of normalised titles, walked like a trie over the text's tokens, is fast (every
recommender turn of the ReDial test split in under two seconds), explainable, and works unchanged on a 100k-entity
catalogue (OpenDialKG).

Rules, in the order they apply:

1. **Normalisation.** Unicode folded to ASCII where it decomposes (``Amélie`` = ``amelie``), case folded, ``&``
   read as ``and``, apostrophes dropped (``Schindler's`` = ``schindlers``), every other non-alphanumeric character a
   token boundary (``Mission: Impossible`` = ``mission impossible``). Matching is case- and punctuation-insensitive.
2. **Keys.** Each catalogue name is indexed under its normalised title. A trailing ``(1984)`` is the item's *year*
   and is optional in the text: ``Police Academy`` and ``Police Academy (1984)`` both link to
   ``Police Academy (1984)``. Any other trailing parenthetical (OpenDialKG's ``Dark Matter (Drama Film)``) is indexed
   with and without it; a hyphenated title also without its hyphens (``Spiderman``); a leading article is optional
   when two words remain (``Dark Knight``).
3. **Exact scan.** The longest key starting at each token is a candidate; a year right after it is read with it.
   Overlapping candidates are resolved by preferring those whose year matched, then titles with two or more content
   words, then longer ones (``the Star Wars`` is *Star Wars*, not *The Star*).
4. **Short titles need evidence.** A title with at most one content word (``It``, ``Her``, ``Frozen``,
   ``The Score``, OpenDialKG's ``Perth``) would fire on ordinary words, so without its year it links only when its
   content word is written capitalised, not at the start of a sentence, and not glued to another capitalised word
   (``Jack Black`` is an actor, not *Jack* and *Black*). Titles made only of stopwords need the year. This is the one
   place where case matters, and only to *reject* a candidate.
5. **Fuzzy pass** over the tokens no exact match consumed, for titles with at least two content words and eight
   characters. Titles are compared on their content words (stopwords removed): at most one content word may differ,
   and then only as a misspelling (both words of four letters or more, :class:`difflib.SequenceMatcher` ratio at
   least ``fuzzy_threshold``, 0.8), and the stopwords between the content words may differ by one edit
   (``Polise Academy``, ``Lord of Rings``, ``Silence of Lambs``). A candidate title is found through a shared content
   word (an inverted index), so the pass costs a few dictionary look-ups per word, not a scan of the catalogue.
6. **Ambiguity** (one key, several items: ``The Mummy (1932)`` / ``(1999)`` / ``(2017)``): the item whose year is
   written after the title; otherwise the most popular (catalogue ``popularity``); ties by catalogue order.

Deliberately left out: pronoun and "that one" resolution, abbreviations (``LOTR``), and fuzzy matching of short
titles (too many false positives: ``good bye`` is one letter away from *Good Boy!*).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from difflib import SequenceMatcher
from functools import lru_cache
from typing import NamedTuple

YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")
QUALIFIER_SUFFIX = re.compile(r"\s*\(([^()]*)\)\s*$")
TOKEN = re.compile(r"[^\W_]+(?:['’`][^\W_]+)*|&")
APOSTROPHES = re.compile(r"['’`]")
WORD = re.compile(r"[^\W_]+")
YEAR_TOKEN = re.compile(r"^(1[89]|20)\d\d$")
ARTICLES = {"the", "a", "an"}
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours out over own same she should so some such than that the their theirs them then there
    these they this those through to too under until up us very was we were what when where which while who whom why
    will with you your yours yes oh ok okay one movie movies film films""".split()
)


class Link(NamedTuple):
    """One mention: the item id, the character span ``text[start:end]`` it came from, and the match score (1.0 when
    exact, the difflib ratio of the title when fuzzy)."""

    item: str
    start: int
    end: int
    score: float


def tokens(text: str) -> list[tuple[str, int, int]]:
    """``(normalised token, start, end)`` for each token of ``text``; offsets index ``text`` itself."""
    folded, origin = text, None
    if not text.isascii():  # NFKD may change the length: keep a map back to the original characters
        parts, origin = [], []
        for i, ch in enumerate(text):
            rep = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
            parts.append(rep)
            origin.extend([i] * len(rep))
        folded = "".join(parts)
    out = []
    for m in TOKEN.finditer(folded):
        a, b = m.span()
        tok = "and" if m.group() == "&" else APOSTROPHES.sub("", m.group()).casefold()
        out.append((tok, a, b) if origin is None else (tok, origin[a], origin[b - 1] + 1))
    return out


def normalise(text: str) -> str:
    """The normalised form used as a key: folded, case folded, apostrophes dropped, tokens joined by single spaces."""
    if text.isascii():  # fast path, same result as the general one (catalogues are mostly ASCII)
        return " ".join(WORD.findall(APOSTROPHES.sub("", text).replace("&", " and ").lower()))
    return " ".join(t for t, _, _ in tokens(text))


def split_name(name: str) -> tuple[str, int | None, str | None]:
    """``"Police Academy (1984)"`` → ``("Police Academy", 1984, None)``;
    ``"Dark Matter (Drama Film)"`` → ``("Dark Matter", None, "Drama Film")``."""
    if m := YEAR_SUFFIX.search(name):
        return name[: m.start()], int(m.group(1)), None
    if (m := QUALIFIER_SUFFIX.search(name)) and m.start() > 0:
        return name[: m.start()], None, m.group(1)
    return name, None, None


def is_weak(words: list[str]) -> bool:
    """At most one content word (``Frozen``, ``The Score``, ``It``): could be an ordinary phrase."""
    return sum(w not in STOPWORDS for w in words) <= 1


@lru_cache(maxsize=65536)
def word_similarity(a: str, b: str) -> float:
    """difflib ratio of two words (cached: the same pairs recur across a corpus)."""
    if 2 * min(len(a), len(b)) / (len(a) + len(b)) < 0.5:
        return 0.0
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def _one_edit(a: list[str], b: list[str]) -> bool:
    """Whether two short word lists are equal or one insertion, deletion or substitution apart."""
    if a == b:
        return True
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    if abs(len(a) - len(b)) != 1:
        return False
    long, short = (a, b) if len(a) > len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _inner_stopwords(words: list[str], content: list[int]) -> list[str]:
    """Stopwords strictly between the first and the last content word, each tagged with the gap it sits in."""
    gaps = zip(content, content[1:], strict=False)
    return [f"{g}:{words[p]}" for g, (a, b) in enumerate(gaps) for p in range(a + 1, b)]


class ItemLinker:
    """Links item titles in free text to catalogue ids (rules in the module docstring).

    Args:
        item_ids: catalogue ids, one per item.
        names: the items' display names (``"Title (Year)"`` or plain).
        popularity: per item; breaks ties between items sharing a title. Defaults to all zero.
        fuzzy_threshold: minimum difflib ratio between a misspelt word and the title's word; ``None`` turns the
            fuzzy pass off.
        max_postings: a word in more titles than this is not used to find fuzzy candidates.
    """

    def __init__(
        self,
        item_ids: list[str],
        names: list[str],
        popularity: list[float] | None = None,
        fuzzy_threshold: float | None = 0.8,
        max_postings: int = 2000,
    ):
        if len(item_ids) != len(names):
            raise ValueError(f"{len(item_ids)} ids but {len(names)} names")
        self.item_ids = list(item_ids)
        self.popularity = [float(p) for p in popularity] if popularity is not None else [0.0] * len(item_ids)
        self.fuzzy_threshold = fuzzy_threshold
        self.max_postings = max_postings
        self.years: list[int | None] = []
        keys: dict[str, list[int]] = defaultdict(list)  # normalised title → item rows
        for row, name in enumerate(names):
            base, year, qualifier = split_name(name)
            self.years.append(year)
            for key in self._keys_of(base, qualifier):
                if row not in keys[key]:
                    keys[key].append(row)
        self.keys = dict(keys)
        self.prefixes: set[str] = set()
        # fuzzy index: content word → (key, position among the key's content words)
        self.postings: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self.content: dict[str, tuple[list[str], list[int]]] = {}  # key → (words, content positions)
        for key in self.keys:
            words = key.split()
            prefix = words[0]
            self.prefixes.add(prefix)
            for w in words[1:]:
                prefix = f"{prefix} {w}"
                self.prefixes.add(prefix)
            content = [p for p, w in enumerate(words) if w not in STOPWORDS]
            if len(content) >= 2 and len(key) >= 8:
                self.content[key] = (words, content)
                for q, p in enumerate(content):
                    self.postings[words[p]].append((key, q))

    @classmethod
    def from_catalogue(cls, catalogue, **kwargs) -> ItemLinker:
        """Builds the linker from a catalogue of the canonical schema: a ``Dataset``, a dict of columns or a list of
        row dicts."""
        if isinstance(catalogue, list):
            catalogue = {k: [row[k] for row in catalogue] for k in ("item_id", "name", "popularity")}
        return cls(list(catalogue["item_id"]), list(catalogue["name"]), list(catalogue["popularity"]), **kwargs)

    @staticmethod
    def _keys_of(base: str, qualifier: str | None) -> list[str]:
        key = normalise(base)
        if not key:
            return []
        keys = [key]
        if qualifier:
            keys.append(normalise(f"{base} {qualifier}"))
        if "-" in base:
            keys.append(normalise(base.replace("-", "")))
        words = key.split()
        if words[0] in ARTICLES and len(words) >= 3:
            keys.append(" ".join(words[1:]))
        return list(dict.fromkeys(k for k in keys if k))

    def _choose(self, key: str, year: int | None) -> tuple[int, bool]:
        """The item row for ``key`` (rule 6) and whether ``year`` matched it."""
        rows = self.keys[key]
        if year is not None:
            dated = [r for r in rows if self.years[r] == year]
            if dated:
                return max(dated, key=lambda r: (self.popularity[r], -r)), True
        return max(rows, key=lambda r: (self.popularity[r], -r)), False

    @staticmethod
    def _title_case(word: str) -> bool:
        return word[:1].isupper() and not (len(word) > 1 and word.isupper())

    @staticmethod
    def _sentence_start(text: str, start: int) -> bool:
        before = text[:start].rstrip()
        return not before or before[-1] in ".!?\n:\"“"

    def _evidence(self, text: str, spans: list[tuple[int, int]], words: list[str], start: int) -> bool:
        """Rule 4 for a short title written without its year (``words`` = the title, found at token ``start``)."""
        content = [start + i for i, w in enumerate(words) if w not in STOPWORDS]
        if len(content) != 1:
            return False
        a, b = spans[content[0]]
        if not self._title_case(text[a:b]) or self._sentence_start(text, a):
            return False
        end = start + len(words)
        for q, inner in ((start - 1, start), (end, end - 1)):
            if 0 <= q < len(spans):
                gap = text[min(spans[q][1], spans[inner][1]) : max(spans[q][0], spans[inner][0])]
                if (not gap or gap.isspace()) and self._title_case(text[spans[q][0] : spans[q][1]]):
                    return False
        return True

    def link_spans(self, text: str) -> list[Link]:
        """Every mention in ``text``, in order of position (an item may appear more than once)."""
        found = tokens(text)
        toks = [t for t, _, _ in found]
        spans = [(a, b) for _, a, b in found]
        n = len(toks)
        candidates = []  # (priority, start, stop, row)
        for i in range(n):
            key, j, best = toks[i], i + 1, None
            while key in self.prefixes:
                if key in self.keys:
                    best = (key, j)
                if j >= n:
                    break
                key, j = f"{key} {toks[j]}", j + 1
            if best is None:
                continue
            key, end = best
            year = int(toks[end]) if end < n and YEAR_TOKEN.match(toks[end]) else None
            row, dated = self._choose(key, year)
            weak = is_weak(toks[i:end])
            if weak and not dated and not self._evidence(text, spans, toks[i:end], i):
                continue
            candidates.append(((dated, not weak, end - i), i, end + 1 if dated else end, row))
        covered = [False] * n
        links: list[tuple[int, Link]] = []
        for _, start, stop, row in sorted(candidates, key=lambda c: (tuple(-x for x in c[0]), c[1])):
            if not any(covered[start:stop]):
                covered[start:stop] = [True] * (stop - start)
                links.append((start, Link(self.item_ids[row], spans[start][0], spans[stop - 1][1], 1.0)))
        if self.fuzzy_threshold is not None and not all(covered):
            links.extend(self._fuzzy(toks, spans, covered))
        links.sort(key=lambda x: x[0])
        return [link for _, link in links]

    def _fuzzy(self, toks: list[str], spans: list[tuple[int, int]], covered: list[bool]) -> list[tuple[int, Link]]:
        """Rule 5 over the tokens no exact match consumed."""
        n = len(toks)
        content = [p for p in range(n) if toks[p] not in STOPWORDS]  # text positions of its content words
        candidates: set[tuple[str, int]] = set()  # (key, index into ``content`` where the key's first word sits)
        for q, p in enumerate(content):
            posting = self.postings.get(toks[p])
            if not covered[p] and posting is not None and len(posting) <= self.max_postings:
                candidates.update((key, q - k) for key, k in posting if q - k >= 0)
        scored = []
        for key, q0 in candidates:
            words, key_content = self.content[key]
            size = len(key_content)
            if q0 + size > len(content):
                continue
            positions = content[q0 : q0 + size]
            start, stop = positions[0], positions[-1] + 1
            if any(covered[start:stop]):
                continue
            diff = [(toks[p], words[k]) for p, k in zip(positions, key_content, strict=True) if toks[p] != words[k]]
            if len(diff) > 1:
                continue
            if diff:
                a, b = diff[0]
                if min(len(a), len(b)) < 4 or word_similarity(a, b) < self.fuzzy_threshold:
                    continue
                if _inner_stopwords(toks, positions) != _inner_stopwords(words, key_content):
                    continue
            else:
                text_stops, key_stops = _inner_stopwords(toks, positions), _inner_stopwords(words, key_content)
                if text_stops == key_stops or not _one_edit(text_stops, key_stops):
                    continue  # identical content and stopwords: the exact scan's business
            if start > 0 and key_content[0] > 0 and toks[start - 1] == words[key_content[0] - 1]:
                start -= 1  # take a leading article along
            span = " ".join(toks[start:stop])
            scored.append((SequenceMatcher(None, span, key, autojunk=False).ratio(), start, stop, key))
        out = []
        for ratio, start, stop, key in sorted(scored, key=lambda s: (-s[0], s[1], s[3])):
            if any(covered[start:stop]):
                continue
            year = int(toks[stop]) if stop < n and YEAR_TOKEN.match(toks[stop]) else None
            row, dated = self._choose(key, year)
            stop = stop + 1 if dated else stop
            covered[start:stop] = [True] * (stop - start)
            out.append((start, Link(self.item_ids[row], spans[start][0], spans[stop - 1][1], round(ratio, 4))))
        return out

    def link(self, text: str) -> list[str]:
        """The item ids mentioned in ``text``, in order of first mention, without repeats."""
        return list(dict.fromkeys(link.item for link in self.link_spans(text)))

    def link_batch(self, texts: list[str]) -> list[list[str]]:
        """:meth:`link` over a batch of texts."""
        return [self.link(t) for t in texts]

    def __len__(self) -> int:
        return len(self.item_ids)
