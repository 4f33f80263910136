"""The decoding engine: batched sampling with a KV cache, where a recommendation is one draw from the item scores.

Every place that samples a reply (PPO rollouts, the test's simulated episodes, ``crslight chat``) goes through
:class:`Engine`, so what is trained on and what is tested on are decoded the same way. One call:

1. **Prefill** the left-padded prompts in one forward pass of the transformer body, keeping its KV cache.
2. **Decode** one token per row and step with the cache. A row's next token is, in this order:

   - the next token of a title being written in (forced: context, not an action);
   - after the slot token (:data:`~crslight.models.tokenize.ITEM_TOKEN`) was fed (also as a prompt's last token, which
     makes the reply start with a recommendation), the first title token of the item
     drawn from the policy's item scores at that state (:meth:`~crslight.models.retrieval.ItemHead.log_probs`:
     sampled in rollouts, best-first with ``greedy_items``), items already mentioned in the context, and those drawn
     earlier in the same reply, excluded;
   - otherwise a token sampled from the LM's next-token distribution (temperature, top-k), greedy at temperature 0.

3. **Stop** a row at its end-of-turn token; finished rows leave the batch (their cache rows are dropped), and the
   loop ends when no row is left or after ``max_new_tokens`` sampled tokens (a title being written is finished).

The result is the reply's token ids, which of them were sampled (PPO's actions), and each recommendation: its slot's
offset in the reply and the catalogue row drawn. The reply's text names exactly that item, and :class:`Reply`
carries its id, so the simulator reads the recommendation itself rather than re-linking the words.

With no item head (a plain LM) or no slot token in its vocabulary, the engine is a plain sampler.
The loop has no collective operation, so DDP ranks decode independently (the policy is never the DDP wrapper here).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaModel

from crslight.models.decoder import LeanLlama, lean_decoder
from crslight.models.heads import position_ids_from_attention_mask
from crslight.models.retrieval import ItemHead, decoder_of
from crslight.models.tokenize import ITEM_TOKEN, title_text
from crslight.schema import context_lines

# the KV cache's keyword in the transformer body's forward: ``cache`` in transformers 5, ``past_key_values`` before
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class Reply(str):
    """A reply's text that also carries the catalogue ids it recommends (``items``), in order, and per
    recommendation the same reply with other items drawn there instead (``alternatives``: one list per slot, each a
    :class:`Reply`; empty unless the engine draws alternatives)."""

    items: list[str]
    alternatives: list[list[Reply]]

    def __new__(cls, text: str, items: list[str] | None = None,
                alternatives: list[list[Reply]] | None = None) -> Reply:
        reply = super().__new__(cls, text)
        reply.items = list(items or [])
        reply.alternatives = [list(a) for a in alternatives or []]
        return reply


@dataclass
class Generation:
    """One decoded reply.

    Attributes:
        tokens: the reply's token ids, up to and including the end-of-turn token when it was reached.
        sampled: per token, True where it was sampled (an action), False where a title was written in.
        slots: ``(offset of the slot token in tokens, catalogue row drawn)`` per recommendation.
        excluded: per slot, the catalogue rows that could not be drawn there (mentioned in the context, or drawn at an
            earlier slot of the reply); the item scores read them too.
        alternatives: per slot, further items drawn from the same distribution at the same state (``item_alternatives``
            of the engine; empty otherwise): what PPO shows the same user instead, to compare items in one state.
        text: the context's embedding the item scores read (``(d,)``, CPU), when they read text.
    """

    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)
    excluded: list[list[int]] = field(default_factory=list)
    alternatives: list[list[int]] = field(default_factory=list)
    text: torch.Tensor | None = None

    @property
    def items(self) -> list[int]:
        return [row for _, row in self.slots]

    def with_item(self, slot: int, row: int, titles: list[list[int]]) -> list[int]:
        """The reply's tokens with the title written at slot number ``slot`` replaced by catalogue row ``row``'s."""
        offset, drawn = self.slots[slot]
        end = offset + 1 + len(titles[drawn])
        return self.tokens[: offset + 1] + list(titles[row]) + self.tokens[end:]


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``(b, vocab)`` logits as sampling reads them, as ``generate``'s warpers leave them: float32, divided by the
    temperature, then all but the ``top_k`` likeliest tokens (0: all) and the least likely tokens whose probability
    mass stays within ``1 - top_p`` (the likeliest always stays) set to ``-inf``."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``(b, n)`` probabilities, by inverting the cumulative distribution at a uniform draw: the
    distribution ``torch.multinomial`` samples, for one uniform number a row (``multinomial`` draws an exponential
    number per entry: 6 ms a step over SmolLM2's 49,152 tokens and 8 rows, a sixth of a decoding step on a CPU)."""
    cdf = probs.float().cumsum(-1)  # a token of probability 0 adds nothing: its interval is empty, never drawn
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)


class Engine:
    """Decodes replies for a causal LM, drawing recommended items from its item head (see the module docstring).

    Args:
        model: the causal LM (a transformers model, or a PEFT model around one).
        tokenizer: its tokenizer (pad and end-of-turn tokens; the slot token when recommending).
        item_head: the policy's item scores; None decodes plain text.
        item_names: the catalogue's names in the item head's row order (what a slot writes); needed with a head.
        max_new_tokens: sampled tokens per reply at most.
        temperature: token sampling temperature; 0 decodes greedily.
        top_k: sample among the k most likely tokens (0: all).
        top_p: then among the most likely tokens whose probabilities sum to ``top_p`` (1: all), as ``generate``'s
            nucleus sampling.
        stop_tokens: the tokens that end a reply (default: the tokenizer's end-of-turn/EOS token).
        item_temperature: temperature of the item draw.
        greedy_items: take the best item instead of sampling one.
        item_alternatives: at each sampled recommendation, draw this many more items (with replacement) from the same
            distribution and record them (:attr:`Generation.alternatives`); the reply names the first draw only.
        lean: decode a Llama body with the lean forward pass (:mod:`crslight.models.decoder`); False, or another
            architecture: the Hugging Face body with its dynamic cache.
    """

    def __init__(self, model: nn.Module, tokenizer, item_head: ItemHead | None = None,
                 item_names: list[str] | None = None, max_new_tokens: int = 48, temperature: float = 1.0,
                 top_k: int = 0, item_temperature: float = 1.0, greedy_items: bool = False,
                 item_alternatives: int = 0, lean: bool = True, top_p: float = 1.0,
                 stop_tokens: list[int] | None = None):
        if item_head is not None and (item_names is None or len(item_names) != item_head.num_items):
            raise ValueError(f"the item head scores {item_head.num_items} items: item_names must name each of them")
        self.model, self.tokenizer, self.item_head = model, tokenizer, item_head
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.item_temperature, self.greedy_items = item_temperature, greedy_items
        self.item_alternatives = 0 if greedy_items else item_alternatives
        slot = tokenizer.convert_tokens_to_ids(ITEM_TOKEN) if ITEM_TOKEN in tokenizer.get_vocab() else None
        vocab = model.get_input_embeddings().weight.shape[0]
        self.slot_id = slot if item_head is not None and slot is not None and slot < vocab else None
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = top_p
        eos = tokenizer.eos_token_id if stop_tokens is None else list(stop_tokens)
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.item_names = list(item_names or [])
        self._titles: list[list[int]] | None = None
        self.lean = lean
        self._backend: _Backend | None = None

    def titles(self) -> list[list[int]]:
        """Per catalogue row, the token ids written after its slot (the title as in training)."""
        if self._titles is None:
            encoded = self.tokenizer([title_text(n) for n in self.item_names], add_special_tokens=False)["input_ids"]
            self._titles = [list(ids) for ids in encoded]
        return self._titles

    def decoding_dtype(self) -> torch.dtype:
        """The dtype the loop computes in: bfloat16 under bf16 autocast on a CPU (the weights copied once per change,
        instead of autocast casting frozen float32 weights again at every step), else the weights' own."""
        param = next(self.model.parameters())
        if (param.device.type == "cpu" and param.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return torch.bfloat16
        return param.dtype

    def backend(self) -> _Backend:
        """The forward pass the loop runs: :class:`~crslight.models.decoder.LeanLlama` for a Llama body (made once per
        engine; it re-reads the weights when they change), else the Hugging Face body (:class:`_HFBackend`)."""
        if self._backend is None:
            lean = lean_decoder(self.model) if self.lean else None
            self._backend = _LeanBackend(lean) if lean is not None else _HFBackend(self.model)
        return self._backend

    def _sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(-1)
        return sample_categorical(torch.softmax(sampling_logits(logits, self.temperature, self.top_k, self.top_p), -1),
                                  generator)

    def _draw_items(self, hidden: torch.Tensor, output_embeddings: torch.Tensor, previous: torch.Tensor,
                    generator: torch.Generator | None, text: torch.Tensor | None = None) -> list[list[int]]:
        """Per row, the item drawn, then ``item_alternatives`` more from the same distribution."""
        logp = self.item_head.log_probs(hidden, output_embeddings, previous, self.item_temperature, text)
        if self.greedy_items:
            return logp.argmax(-1)[:, None].tolist()
        return torch.multinomial(logp.exp(), 1 + self.item_alternatives, replacement=True,
                                 generator=generator).tolist()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], exclude: list[list[int]] | None = None,
                 generator: torch.Generator | None = None, contexts: list[list[str]] | None = None) -> list[Generation]:
        """Decodes one reply per prompt.

        Args:
            prompts: token ids of each prompt (no padding).
            exclude: per prompt, catalogue rows mentioned in its context: the item scores read them (co-mentioned
                items) and the draw skips them.
            generator: the random generator of every draw (None: torch's global one).
            contexts: per prompt, its turns as :func:`~crslight.schema.context_lines`: needed when the item
                scores read the context's words.
        """
        b = len(prompts)
        device = next(self.model.parameters()).device
        text = None
        if self.item_head is not None and self.item_head.reads_text:
            if contexts is None or len(contexts) != b:
                raise ValueError("these item scores read the context's words: pass contexts, one per prompt")
            text = self.item_head.encode_contexts(contexts).float().cpu()
        out = [Generation(text=None if text is None else text[i]) for i in range(b)]
        mentioned = [list(exclude[i]) if exclude else [] for i in range(b)]  # grows with each item drawn
        if b == 0:
            return out
        width = max(len(p) for p in prompts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        backend, dtype = self.backend(), self.decoding_dtype()
        hidden = backend.prefill(ids, mask, self.max_new_tokens, dtype)
        output_embeddings = backend.output_embeddings(dtype)
        active = list(range(b))  # the batch rows still decoding, in cache order
        queue: list[list[int]] = [[] for _ in range(b)]
        budget = [self.max_new_tokens] * b
        last = [p[-1] for p in prompts]  # a prompt that ends with the slot token starts with a recommendation
        positions = mask.sum(1) - 1
        while active:
            logits = F.linear(hidden, output_embeddings)
            chosen = self._sample(logits, generator).tolist()
            drawing = [k for k, i in enumerate(active) if last[i] == self.slot_id and self.slot_id is not None]
            if drawing:
                index = torch.tensor(drawing, device=device)
                rows = [active[k] for k in drawing]
                previous = torch.nn.utils.rnn.pad_sequence([torch.tensor(mentioned[i] or [-1]) for i in rows],
                                                           batch_first=True, padding_value=-1).to(device)
                draws = self._draw_items(hidden[index], output_embeddings, previous, generator,
                                         None if text is None else text[rows].to(device))
                for i, (item, *alternatives) in zip(rows, draws, strict=True):
                    out[i].slots.append((len(out[i].tokens) - 1, item))
                    out[i].excluded.append(list(mentioned[i]))
                    if self.item_alternatives:
                        out[i].alternatives.append(alternatives)
                    mentioned[i].append(item)
                    queue[i] = list(self.titles()[item])
            keep, next_tokens = [], []
            for k, i in enumerate(active):
                if queue[i]:
                    token, sampled = queue[i].pop(0), False
                else:
                    token, sampled = chosen[k], True
                    budget[i] -= 1
                out[i].tokens.append(token)
                out[i].sampled.append(sampled)
                last[i] = token
                done = (sampled and token in self.eos) or (budget[i] <= 0 and not queue[i] and token != self.slot_id)
                if not done:
                    keep.append(k)
                    next_tokens.append(token)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                backend.select(index)
                mask, positions = mask[index], positions[index]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            positions = positions + 1
            hidden = backend.step(torch.tensor(next_tokens, device=device)[:, None], mask, positions[:, None], dtype)
        return out

    def decode(self, generation: Generation | list[int]) -> str:
        """The reply's text (special tokens, the slot among them, left out) of a generation or of token ids."""
        tokens = generation.tokens if isinstance(generation, Generation) else generation
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class _Backend:
    """The forward pass under the decoding loop: prefill the prompts, then one token per row and step."""

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """Left-padded ``(b, t)`` prompts → each row's last hidden state ``(b, h)``; starts a fresh cache."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
        """``(b, 1)`` next tokens (``mask``: every column so far, theirs included) → ``(b, h)`` hidden states."""
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> None:
        """Keeps the cache rows ``rows``."""
        raise NotImplementedError

    def output_embeddings(self, dtype: torch.dtype) -> torch.Tensor:
        """The LM head's weight ``(vocab, h)`` as the loop multiplies it (logits, and the item scores' title table)."""
        raise NotImplementedError


class _LeanBackend(_Backend):
    def __init__(self, lean: LeanLlama):
        self.lean, self.cache = lean, None

    def prefill(self, ids, mask, new_tokens, dtype):
        self.cache = self.lean.new_cache(len(ids), ids.shape[1] + new_tokens + 16, dtype, ids.device)
        hidden = self.lean.forward(ids, position_ids_from_attention_mask(mask), mask.bool(), self.cache, dtype)
        return hidden[:, -1]

    def step(self, tokens, mask, positions, dtype):
        return self.lean.forward(tokens, positions, mask.bool(), self.cache, dtype)[:, -1]

    def select(self, rows):
        self.cache.select(rows)

    def output_embeddings(self, dtype):
        return self.lean.output_weight(dtype)


class _HFBackend(_Backend):
    """Any transformers body with its dynamic cache (under bf16 autocast on a CPU: a bfloat16 copy of the model,
    made once)."""

    def __init__(self, model: nn.Module):
        self.model, self.cache, self._copy = model, None, None

    def _model(self, dtype):
        if dtype == next(self.model.parameters()).dtype:
            return self.model
        if self._copy is None:
            self._copy = copy.deepcopy(self.model).to(dtype).eval()
        return self._copy

    def prefill(self, ids, mask, new_tokens, dtype):
        self.cache = DynamicCache()
        self._body = decoder_of(self._model(dtype))
        step = self._body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                          use_cache=True, **{_CACHE_KWARG: self.cache})
        return step.last_hidden_state[:, -1]

    def step(self, tokens, mask, positions, dtype):
        step = self._body(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{_CACHE_KWARG: self.cache})
        return step.last_hidden_state[:, -1]

    def select(self, rows):
        self.cache.batch_select_indices(rows)

    def output_embeddings(self, dtype):
        return self._model(dtype).get_output_embeddings().weight


def item_rows_of(context: list[dict], item_index: dict[str, int]) -> list[int]:
    """Catalogue rows of the items mentioned anywhere in a context (what a recommendation should not repeat)."""
    return list(dict.fromkeys(item_index[i] for turn in context for i in turn["items"] if i in item_index))


class EnginePolicy:
    """The environment's ``policy(contexts) -> replies`` through the engine, remembering what is behind every reply.

    Each reply is a :class:`~crslight.models.engine.Reply` carrying the ids of the items the policy drew, so the
    simulator reacts to exactly those; items mentioned in the context are never drawn again.

    Args:
        engine: the decoding engine.
        encode: schema turns → prompt ids (the DataModule's ``encode_prompt``: same template, system prompt, slots).
        item_ids: the catalogue ids in the item head's row order.
        seed: seeds call ``n``'s draws with ``seed + n``; None uses torch's global generator.
        record: keep ``(prompt, generation, reply)`` of every call (PPO), for :meth:`match`.
    """

    def __init__(self, engine: Engine, encode: Callable[[list[dict]], list[int]], item_ids: list[str],
                 seed: int | None = None, record: bool = False) -> None:
        self.engine, self.encode, self.item_ids = engine, encode, list(item_ids)
        self.item_index = {item: row for row, item in enumerate(self.item_ids)}
        self.seed, self.record = seed, record
        self.calls: list[list[tuple[list[int], Generation, Reply]]] = []
        self.n_calls = 0

    def __call__(self, contexts: list[list[dict]]) -> list[Reply]:
        prompts = [self.encode(context) for context in contexts]
        exclude = [item_rows_of(context, self.item_index) for context in contexts]
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=next(self.engine.model.parameters()).device)
            generator.manual_seed(self.seed + self.n_calls)
        self.n_calls += 1
        head = getattr(self.engine, "item_head", None)
        lines = [context_lines(c) for c in contexts] if head is not None and head.reads_text else None
        generations = self.engine.generate(prompts, exclude, generator, lines)
        replies = [self.reply(g) for g in generations]
        if self.record:
            self.calls.append(list(zip(prompts, generations, replies, strict=True)))
        return replies

    def reply(self, generation: Generation) -> Reply:
        """The :class:`Reply` of a generation, with its alternatives (the same words, another item at one slot)."""
        ids = [self.item_ids[row] for row in generation.items]
        alternatives = [[Reply(self.engine.decode(generation.with_item(s, row, self.engine.titles())),
                               ids[:s] + [self.item_ids[row]] + ids[s + 1 :]) for row in rows]
                        for s, rows in enumerate(generation.alternatives)]
        return Reply(self.engine.decode(generation), ids, alternatives)

    def match(self, episodes: list) -> list[list[tuple[list[int], Generation, Reply]]]:
        """Per episode, the ``(prompt, reply, text)`` of each of its steps.

        The environment runs one lock-step batch: call ``s`` answered, in order, the episodes that reached step ``s``.
        """
        out: list[list[tuple[list[int], Generation, Reply]]] = [[] for _ in episodes]
        for step, call in enumerate(self.calls):
            owners = [k for k, e in enumerate(episodes) if len(e.transitions) > step]
            if len(owners) != len(call):
                raise RuntimeError(f"step {step}: {len(call)} replies recorded for {len(owners)} episodes")
            for k, record in zip(owners, call, strict=True):
                if episodes[k].transitions[step].reply != record[2]:
                    raise RuntimeError(f"episode {episodes[k].index} step {step}: reply does not match the record")
                out[k].append(record)
        return out
