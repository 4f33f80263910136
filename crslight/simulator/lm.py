"""Chat generation with any transformers causal LM, and the LM-backed user simulator.

:func:`generate_chat` is shared by :class:`~crslight.simulator.policies.LMPolicy` (the model plays the recommender)
and :class:`LMSimulator` (the model plays the seeker): the prompt comes from
:func:`crslight.models.tokenize.encode_prompt`, the one prompt builder of training, rollouts, evaluation and chat (the
tokenizer's chat template, rendered turn by turn), then crslight's decoding engine (:mod:`crslight.models.engine`, the
one every reply goes through) decodes the batch with its KV cache, stopping at the end of the assistant's turn (the
EOS token plus the end-of-turn tokens of the common templates: ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``,
``<|end|>``). A context longer than ``max_context_tokens`` loses its oldest turns, never the system prompt.

:class:`LMSimulator` keeps the decisions rule-based: acceptance, signals, dwell and leaving come from a rule simulator
(by default :class:`~crslight.simulator.grounded.GroundedSimulator`), and the model only rewrites the rule-based answer
into free-form words, told what the user decided. A language model judging acceptance would make the reward depend
on the simulator model's whims; keeping the decision in the rules keeps episodes comparable across simulator models.
Greedy decoding is the default, so episodes stay reproducible; sampling is seeded from the episodes' generators.
"""

from __future__ import annotations

import numpy as np
import torch

from crslight.models.tokenize import encode_prompt
from crslight.schema import RECOMMENDER, SEEKER
from crslight.simulator.base import Reaction, UserSimulator, UserState

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the end-of-turn tokens the tokenizer knows."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return list(dict.fromkeys(ids))


def chat_engine(model, tokenizer, max_new_tokens: int = 64, do_sample: bool = True, temperature: float = 0.8,
                top_p: float = 0.95, top_k: int = 0):
    """The decoding engine of a plain chat model (no item scores), stopping at the end of the assistant's turn.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer; must have a chat template and a pad token.
        max_new_tokens: longest reply, in tokens.
        do_sample: sample (True) or decode greedily (False).
        temperature: sampling temperature.
        top_p: nucleus sampling mass (1.0 turns it off).
        top_k: top-k sampling (0 turns it off).
    """
    from crslight.models.engine import Engine

    return Engine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                  top_k=top_k, top_p=top_p if do_sample else 1.0, stop_tokens=stop_token_ids(tokenizer))


@torch.no_grad()
def generate_chat(
    engine,
    contexts: list[list[dict]],
    system_prompt: str | None | list[str | None],
    assistant: str = RECOMMENDER,
    max_context_tokens: int = 768,
    seed: int | None = None,
) -> list[str]:
    """The next message of the ``assistant`` side for each context (schema turns), batched.

    Args:
        engine: a :func:`chat_engine` (made once per model: it keeps the model's decoding weights).
        contexts: one list of schema turns per prompt.
        system_prompt: who the model plays (None: no system message), or one per context.
        assistant: the side the model plays (``recommender``, or ``seeker`` for the LM simulator).
        max_context_tokens: longest prompt; older turns are dropped to fit.
        seed: seeds this call's random generator (torch's global one is left alone); None: the global one.
    """
    if not contexts:
        return []
    systems = system_prompt if isinstance(system_prompt, list) else [system_prompt] * len(contexts)
    prompts = [encode_prompt(engine.tokenizer, turns, system, max_context_tokens, assistant=assistant)
               for turns, system in zip(contexts, systems, strict=True)]
    device = next(engine.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return [engine.decode(g) for g in engine.generate(prompts, generator=generator)]


SEEKER_PROMPT = (
    "You are a person chatting with a recommender to find something to watch. Answer in one or two short, casual "
    "sentences. Do not recommend anything yourself."
)


class LMSimulator(UserSimulator):
    """A user whose words come from a chat model and whose decisions come from a rule simulator.

    Args:
        rules: the simulator that decides acceptance, signals and leaving (e.g. a ``GroundedSimulator``).
        model: a transformers causal LM with a chat template (e.g. ``load_causal_lm("smollm2")``).
        tokenizer: its tokenizer (``load_tokenizer(...)``).
        system_prompt: who the model plays.
        max_new_tokens: longest utterance, in tokens.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        max_context_tokens: longest prompt; the oldest turns are dropped to fit.
    """

    def __init__(
        self,
        rules: UserSimulator,
        model,
        tokenizer,
        system_prompt: str = SEEKER_PROMPT,
        max_new_tokens: int = 48,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_context_tokens: int = 768,
    ):
        self.rules, self.model, self.tokenizer = rules, model, tokenizer
        self.system_prompt, self.max_context_tokens, self.do_sample = system_prompt, max_context_tokens, do_sample
        self.engine = chat_engine(model, tokenizer, max_new_tokens, do_sample, temperature, top_p)

    def prefix_points(self, dialogue: dict) -> list[int]:
        return self.rules.prefix_points(dialogue)

    def start(self, dialogue: dict, prefix_len: int, rng: np.random.Generator) -> UserState:
        return self.rules.start(dialogue, prefix_len, rng)

    def satisfaction(self, state: UserState) -> float:
        return self.rules.satisfaction(state)

    def react(
        self, state: UserState, context: list[dict], reply: str, items: list[str], rng: np.random.Generator
    ) -> Reaction:
        return self.react_batch([state], [context], [reply], [items], [rng])[0]

    def react_batch(self, states, contexts, replies, items, rngs) -> list[Reaction]:
        reactions = self.rules.react_batch(states, contexts, replies, items, rngs)
        # one draw from every episode's generator, so the rule decisions' streams stay aligned in any batch
        seed = int(sum(int(r.integers(2**31)) for r in rngs) % 2**31) if self.do_sample else None
        turns = [[*context, {"role": RECOMMENDER, "text": reply, "items": []}]
                 for context, reply in zip(contexts, replies, strict=True)]
        intents = [f"{self.system_prompt} What you want to say, in your own words: \"{r.text}\"" for r in reactions]
        texts = generate_chat(self.engine, turns, intents, SEEKER, self.max_context_tokens, seed)
        for reaction, text in zip(reactions, texts, strict=True):
            reaction.text = text or reaction.text
        return reactions
