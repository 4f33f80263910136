"""Rollouts for PPO: batched sampling that stays in step across DDP ranks, and the token layout PPO trains on.

One *sample* is one recommender reply: the prompt the policy saw (token ids exactly as fed to ``generate``) and the
reply it sampled (ids up to and including the end-of-turn token). Multi-turn episodes give one sample per turn; the
episode ties them together through the turn-level return (``PPOModule``). Samples are packed as

    [pad ... prompt | reply ... pad]        prompts left-padded to a common width ``start``, replies right-padded

so every action token sits at a column ``>= start`` and a forward pass needs logits for the last ``t - start + 1``
positions only (``logits_to_keep``), not for the long prompts.

DDP: each rank samples its own rollouts, and the number of decoding steps differs between ranks. With ``synced=True``
every ``generate`` call runs with ``synced_gpus`` (a rank that is done keeps stepping until all are), and each call is
preceded by a vote: a rank that has no more prompts (its episodes ended sooner) still joins every round with a dummy
prompt until no rank needs one (:meth:`Sampler.drain`), so no rank is left waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from transformers import GenerationConfig


class Samples(NamedTuple):
    """Packed samples (``b`` replies).

    Attributes:
        input_ids: ``(b, t)`` prompt (left-padded to ``start``) then reply (right-padded).
        attention_mask: ``(b, t)`` 1 on real tokens.
        response_mask: ``(b, t)`` 1 on the sampled reply tokens (the actions).
        start: the column of every reply's first token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    start: int

    def select(self, rows: torch.Tensor | list[int]) -> Samples:
        """The rows ``rows``, with columns that are padding in all of them cut off (``start`` moves with the cut)."""
        ids, mask, resp = self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows]
        real = mask.any(0).nonzero()
        left, right = min(int(real.min()), self.start - 1), int(real.max()) + 1
        return Samples(ids[:, left:right], mask[:, left:right], resp[:, left:right], self.start - left)


def pack(prompts: list[list[int]], replies: list[list[int]], pad_id: int) -> Samples:
    """Lays out prompts and replies as :class:`Samples`."""
    start = max(len(p) for p in prompts)
    width = start + max(max(len(r) for r in replies), 1)
    b = len(prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width), dtype=torch.long)
    for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        input_ids[i, start - len(prompt) : start] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, start - len(prompt) : start + len(reply)] = 1
        if reply:
            input_ids[i, start : start + len(reply)] = torch.tensor(reply, dtype=torch.long)
            response_mask[i, start : start + len(reply)] = 1
    return Samples(input_ids, attention_mask, response_mask, start)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` counts them for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Sampler:
    """Samples replies for a batch of prompts with ``generate`` (KV cache), stopping at the end-of-turn token.

    Args:
        policy: the causal LM (unwrapped: never the DDP wrapper).
        generation_config: sampling settings; ``eos_token_id`` and ``pad_token_id`` must be set.
        synced: keep DDP ranks in step (module docstring).
    """

    def __init__(self, policy, generation_config: GenerationConfig, synced: bool = False) -> None:
        self.policy, self.config, self.synced = policy, generation_config, synced
        self.calls = 0

    def _vote(self, active: bool, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if active else 0.0], device=device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.policy.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    generation_config=self.config, synced_gpus=self.synced)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        """The sampled reply ids of each prompt, cut after the first end-of-turn token (which is kept)."""
        device = next(self.policy.parameters()).device
        if self.synced:
            self._vote(True, device)
        batch = pack(prompts, [[] for _ in prompts], self.config.pad_token_id)
        ids = batch.input_ids[:, : batch.start].to(device)
        mask = batch.attention_mask[:, : batch.start].to(device)
        out = self._generate(ids, mask)[:, batch.start :].tolist()
        self.calls += 1
        eos = self.config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        replies = []
        for row in out:
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            replies.append(row[:end])
        return replies

    @torch.no_grad()
    def drain(self) -> None:
        """Joins the other ranks' remaining generation rounds with a dummy prompt until none needs another."""
        if not self.synced:
            return
        device = next(self.policy.parameters()).device
        dummy = torch.tensor([[self.config.eos_token_id if isinstance(self.config.eos_token_id, int)
                               else self.config.eos_token_id[0]]], device=device)
        while self._vote(False, device):
            self._generate(dummy, torch.ones_like(dummy))


class Recorder:
    """The environment's ``policy(contexts) -> replies``, remembering the token ids behind every reply.

    Args:
        encode: schema turns → prompt ids (the DataModule's ``encode_prompt``: same chat template and system prompt).
        sample: prompts → reply ids (a :class:`Sampler`).
        decode: reply ids → text.
    """

    def __init__(self, encode: Callable[[list[dict]], list[int]], sample: Callable[[list[list[int]]], list[list[int]]],
                 decode: Callable[[list[int]], str]) -> None:
        self.encode, self.sample, self.decode = encode, sample, decode
        self.calls: list[list[tuple[list[int], list[int], str]]] = []

    def __call__(self, contexts: list[list[dict]]) -> list[str]:
        prompts = [self.encode(context) for context in contexts]
        replies = self.sample(prompts)
        texts = [self.decode(reply) for reply in replies]
        self.calls.append(list(zip(prompts, replies, texts, strict=True)))
        return texts

    def match(self, episodes: list) -> list[list[tuple[list[int], list[int], str]]]:
        """Per episode, the ``(prompt, reply, text)`` of each of its steps.

        The environment runs one lock-step batch: call ``s`` answered, in order, the episodes that reached step ``s``.
        """
        out: list[list[tuple[list[int], list[int], str]]] = [[] for _ in episodes]
        for step, call in enumerate(self.calls):
            owners = [k for k, e in enumerate(episodes) if len(e.transitions) > step]
            if len(owners) != len(call):
                raise RuntimeError(f"step {step}: {len(call)} replies recorded for {len(owners)} episodes")
            for k, record in zip(owners, call, strict=True):
                if episodes[k].transitions[step].reply != record[2]:
                    raise RuntimeError(f"episode {episodes[k].index} step {step}: reply does not match the record")
                out[k].append(record)
        return out
