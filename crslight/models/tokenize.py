"""Dialogues → token ids with the model's own chat template, and a loss mask over the recommender's tokens.

Seeker turns are the ``user`` role and recommender turns the ``assistant`` role, after a system prompt. The template is
rendered for growing prefixes of the conversation and each new piece is tokenised on its own, so that every turn's
token span is known exactly: training masks, evaluation (every recommender turn read from one pass over the dialogue)
and generation prompts all agree on the same tokens. This needs a template whose rendering of a prefix is a prefix of
the rendering of the whole, which holds for ChatML-style templates (SmolLM2, Qwen, Llama 3); other templates get an
error naming the turn.

**Recommendation slots.** Given the catalogue's names, every item a recommender turn names is written as the slot
token :data:`ITEM_TOKEN` followed by the item's title: ``How about<|item|> Heat (1995)? ...``. The slot is the
policy's decision to recommend (a token it learns to emit); which item follows is drawn from its item scores at the
slot (:mod:`crslight.models.retrieval`), and the title is then written in, not sampled: its tokens are context, never
trained on as words (``loss_mask`` False) and never PPO actions. One title is tokenised on its own, exactly as the
decoding engine (:mod:`crslight.models.engine`) writes it, so training and generation see the same ids. Seeker turns
keep their titles as plain words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from crslight.schema import RECOMMENDER

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")

ITEM_TOKEN = "<|item|>"
"""The recommendation slot: the policy emits it where a reply names an item, and the item's title follows it."""

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly recommender. Ask about the user's tastes and mood, and recommend items by their full title."
)


@dataclass
class EncodedDialogue:
    """One dialogue as tokens.

    Attributes:
        input_ids: the whole conversation (system prompt included), ``(t,)``.
        loss_mask: True on the recommender's reply tokens (content and end-of-turn token), ``(t,)``.
        turn_starts: per turn, the index of its first content token (after the role header).
        turn_ends: per turn, one past its last token.
        slots: per turn, ``(position of a slot token, item id)`` for each item the turn names through a slot.
    """

    input_ids: list[int]
    loss_mask: list[bool]
    turn_starts: list[int]
    turn_ends: list[int]
    slots: list[list[tuple[int, str]]]


def to_messages(turns: list[dict], system_prompt: str | None, assistant: str = RECOMMENDER) -> list[dict]:
    """Schema turns → chat messages: the ``assistant`` side's turns are ``assistant``, the other side's ``user``."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "assistant" if t["role"] == assistant else "user", "content": t["text"]} for t in turns]
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def title_text(name: str) -> str:
    """How a title is written after a slot: one leading space, whitespace normalised."""
    return " " + " ".join(name.split())


def slot_segments(text: str, items: list[str], names: dict[str, str]) -> list[tuple[str, str | None]]:
    """Splits a recommender text at the titles of ``items``: ``[(words, None), (title, item_id), ...]``.

    Each item's first mention (its catalogue name, else the name without a trailing ``(year)``) becomes a slot; an
    item whose name is not in the text gets none. Overlapping matches keep the earlier, longer one.
    """
    spans: list[tuple[int, int, str]] = []
    for item in dict.fromkeys(items):
        name = names.get(item)
        if not name:
            continue
        for candidate in dict.fromkeys([" ".join(name.split()), _YEAR.sub("", name).strip()]):
            at = text.find(candidate) if candidate else -1
            if at >= 0:
                spans.append((at, at + len(candidate), item))
                break
    spans.sort(key=lambda s: (s[0], -s[1]))
    out: list[tuple[str, str | None]] = []
    cursor = 0
    for lo, hi, item in spans:
        if lo < cursor:
            continue
        out.append((text[cursor:lo].rstrip(" "), None))
        out.append((text[lo:hi], item))
        cursor = hi
    out.append((text[cursor:], None))
    return out


def encode_dialogue(
    tokenizer, turns: list[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    names: dict[str, str] | None = None, generation_prompt: bool = False, assistant: str = RECOMMENDER,
) -> EncodedDialogue:
    """Tokenises a dialogue turn by turn (see the module docstring); no truncation.

    Args:
        tokenizer: the policy's tokenizer (with :data:`ITEM_TOKEN` when ``names`` is given).
        turns: schema turns.
        system_prompt: the system message; None for none.
        names: item id → catalogue name; given, recommender turns write their items through slots.
        generation_prompt: end with the header of the assistant's next turn (a prompt for its reply).
        assistant: the side the model plays (``recommender``; ``seeker`` for a user simulator's words).
    """
    messages = to_messages(turns, system_prompt, assistant)
    offset = 1 if system_prompt else 0
    slot_id = tokenizer.convert_tokens_to_ids(ITEM_TOKEN) if names is not None else None
    if slot_id is not None and slot_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {ITEM_TOKEN} token: load it with load_tokenizer(..., item_token=True)")
    ids: list[int] = []
    mask: list[bool] = []
    starts: list[int] = []
    ends: list[int] = []
    slots: list[list[tuple[int, str]]] = []
    rendered = _render(tokenizer, messages[:offset]) if offset else ""

    def add(text: str, learn: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(piece)
        mask.extend([learn] * len(piece))

    add(rendered, False)
    for i in range(offset, len(messages)):
        full = _render(tokenizer, messages[: i + 1])
        new = full[len(rendered):]
        content = messages[i]["content"]
        at = new.find(content) if full.startswith(rendered) else -1
        if at < 0:
            raise ValueError(
                f"the tokenizer's chat template does not render turn {i - offset} as an extension of the turns before "
                "it; crslight needs a ChatML-style template (see crslight/models/tokenize.py)"
            )
        add(new[:at], False)  # the role header
        starts.append(len(ids))
        replying = messages[i]["role"] == "assistant"
        turn_slots: list[tuple[int, str]] = []
        if replying and names is not None:
            segments = slot_segments(content, turns[i - offset]["items"], names)
            for text, item in segments[:-1]:
                if item is None:
                    add(text, True)
                else:
                    turn_slots.append((len(ids), item))
                    ids.append(slot_id)
                    mask.append(True)
                    add(title_text(text), False)  # written in by the engine, not sampled
            add(segments[-1][0] + new[at + len(content):], True)
        else:
            add(new[at:], replying)
        slots.append(turn_slots)
        ends.append(len(ids))
        rendered = full
    if generation_prompt:
        add(_render(tokenizer, messages, add_generation_prompt=True)[len(rendered):], False)
    return EncodedDialogue(ids, mask, starts, ends, slots)


def encode_prompt(
    tokenizer, turns: list[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int | None = None,
    names: dict[str, str] | None = None, assistant: str = RECOMMENDER,
) -> list[int]:
    """The prompt for the next reply of the ``assistant`` side (the recommender, or a seeker played by a model): the
    context (slots as in training) and the assistant header. Every prompt crslight generates from is built here —
    rollouts, evaluation, chat, :class:`~crslight.simulator.policies.LMPolicy` and the LM simulator.

    When longer than ``max_length`` the oldest turns are dropped (the system prompt stays).
    """
    first = 0
    while True:
        ids = encode_dialogue(tokenizer, turns[first:], system_prompt, names, generation_prompt=True,
                              assistant=assistant).input_ids
        if max_length is None or len(ids) <= max_length or first >= len(turns) - 1:
            return ids[-max_length:] if max_length else ids
        first += 1
