"""Dialogues → token ids with the model's own chat template, and a loss mask over the recommender's tokens.

Seeker turns are the ``user`` role and recommender turns the ``assistant`` role, after a system prompt. The template is
rendered for growing prefixes of the conversation and each new piece is tokenised on its own, so that every turn's
token span is known exactly: training masks, evaluation (every recommender turn read from one pass over the dialogue)
and generation prompts all agree on the same tokens. This needs a template whose rendering of a prefix is a prefix of
the rendering of the whole, which holds for ChatML-style templates (SmolLM2, Qwen, Llama 3); other templates get an
error naming the turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from crslight.data.schema import RECOMMENDER

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
    """

    input_ids: list[int]
    loss_mask: list[bool]
    turn_starts: list[int]
    turn_ends: list[int]


def to_messages(turns: list[dict], system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "assistant" if t["role"] == RECOMMENDER else "user", "content": t["text"]} for t in turns]
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_dialogue(tokenizer, turns: list[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> EncodedDialogue:
    """Tokenises a dialogue turn by turn (see the module docstring); no truncation."""
    messages = to_messages(turns, system_prompt)
    offset = 1 if system_prompt else 0
    ids: list[int] = []
    mask: list[bool] = []
    starts: list[int] = []
    ends: list[int] = []
    rendered = _render(tokenizer, messages[:offset]) if offset else ""

    def add(text: str, learn: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(piece)
        mask.extend([learn] * len(piece))

    add(rendered, False)
    for i in range(offset, len(messages)):
        full = _render(tokenizer, messages[: i + 1])
        new = full[len(rendered):]
        at = new.find(messages[i]["content"]) if full.startswith(rendered) else -1
        if at < 0:
            raise ValueError(
                f"the tokenizer's chat template does not render turn {i - offset} as an extension of the turns before "
                "it; crslight needs a ChatML-style template (see crslight/data/tokenize.py)"
            )
        add(new[:at], False)  # the role header
        starts.append(len(ids))
        add(new[at:], messages[i]["role"] == "assistant")
        ends.append(len(ids))
        rendered = full
    return EncodedDialogue(ids, mask, starts, ends)


def encode_prompt(
    tokenizer, turns: list[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int | None = None
) -> list[int]:
    """The prompt for the recommender's next reply: the context and the assistant header.

    When longer than ``max_length`` the oldest turns are dropped (the system prompt stays).
    """
    first = 0
    while True:
        text = _render(tokenizer, to_messages(turns[first:], system_prompt), add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_length is None or len(ids) <= max_length or first >= len(turns) - 1:
            return ids[-max_length:] if max_length else ids
        first += 1
