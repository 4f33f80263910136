"""Scalar heads on top of a backbone's hidden states, and the last-token gather they need.

One head class serves both uses:

- **reward model** R_phi: ``ScalarHead`` on the hidden state of each sequence's last real token
  (:func:`gather_last_token`) gives one score per dialogue, shape ``(b,)``;
- **value head** V(s_t) in PPO: the same ``ScalarHead`` on every position gives one value per token,
  shape ``(b, t)``.

Both are ``hidden -> 1`` linear maps; only where they are read differs, so there is no separate
``ValueHead`` class. The weight initialisation follows OpenAI's lm-human-preferences reward head
(normal with std ``1 / sqrt(hidden + 1)``, zero bias), which TRL also uses: outputs start near zero
with unit-order spread, so neither the first rewards nor the first value targets explode.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row, for left or right padding alike.

    Args:
        attention_mask: ``(b, t)``, 1 (or True) on real tokens, 0 on padding.

    Returns:
        ``(b,)`` long tensor. A row with no real token gets index 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, 0).amax(dim=-1)


def gather_last_token(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Picks the hidden state at each row's last non-pad token.

    With left padding that is always position ``t - 1``; with right padding it is the position just
    before the first pad. Looking at the mask rather than at pad ids keeps this correct when the pad
    token equals the EOS token.

    Args:
        hidden_states: ``(b, t, h)``.
        attention_mask: ``(b, t)``.

    Returns:
        ``(b, h)``.
    """
    index = last_token_index(attention_mask)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, as ``generate`` computes them.

    Pass them to the forward pass of a left-padded batch so each row sees the positions it would see
    alone. RoPE models (Llama) only depend on position differences and give the same outputs either
    way; models with absolute position embeddings do not.

    Args:
        attention_mask: ``(b, t)``.

    Returns:
        ``(b, t)`` long tensor; padding positions get 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ScalarHead(nn.Module):
    """Maps hidden states to one scalar each: ``(..., h) -> (...)``.

    Args:
        hidden_size: Width of the backbone's hidden states (``config.hidden_size``).
        dropout: Dropout on the hidden states before the projection.
        init_std: Standard deviation of the initial weights; ``None`` means ``1 / sqrt(hidden_size + 1)``.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.0, init_std: float | None = None) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, 1)
        std = 1.0 / math.sqrt(hidden_size + 1) if init_std is None else init_std
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Projects every position.

        Args:
            hidden_states: ``(..., h)``, e.g. ``(b, t, h)`` for per-token values or ``(b, h)`` for rewards.

        Returns:
            ``(...)``, in the head's dtype (float32 for a float32 head on a bfloat16 backbone).
        """
        hidden_states = hidden_states.to(self.proj.weight.dtype)
        return self.proj(self.dropout(hidden_states)).squeeze(-1)

    def score_last_token(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per sequence, read at its last non-pad token (the reward model's output).

        Args:
            hidden_states: ``(b, t, h)``.
            attention_mask: ``(b, t)``.

        Returns:
            ``(b,)``.
        """
        return self(gather_last_token(hidden_states, attention_mask))
