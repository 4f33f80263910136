"""A lean forward pass of a Llama-family transformer body for decoding, with a preallocated KV cache.

Hugging Face's ``LlamaModel`` spends part of a one-token decoding step outside the arithmetic on a CPU: module calls,
mask building and cache bookkeeping per layer, with PEFT's LoRA two more matmuls and a dropout per adapted projection,
and under bf16 autocast a cast of every frozen weight at every step. :class:`LeanLlama` computes the same function
with the fewest operations a step needs:

- the weights read once per change (the parameters' version counters say when), LoRA merged into them
  (``W + s · B A``) and PEFT's trainable token rows into the embeddings, the query/key/value projections fused into
  one matrix and the gate/up projections into another, all in the decoding dtype (bfloat16 under bf16 autocast);
- a KV cache of fixed width per layer (:class:`KVCache`), written in place, grown only when a reply runs past it;
- a prompt's attention through ``scaled_dot_product_attention`` with a boolean key mask (left padding), one new
  token's as two batched matmuls over the grouped query heads (the fused CPU kernel costs several times that for a
  single query row).

It is exact up to floating-point summation order: the same norms (float32 variance), rotary embedding (the model's
own ``inv_freq`` and scaling) and activation as ``LlamaModel``; tests compare its hidden states and greedy tokens with
the Hugging Face body's. Other architectures decode through the Hugging Face body (:func:`lean_decoder` returns None).
Measured against ``generate`` in ``benchmarks/decoding.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel

from crslight.models.retrieval import decoder_of


def lean_decoder(model: nn.Module) -> LeanLlama | None:
    """A :class:`LeanLlama` over ``model`` (a causal LM, PEFT-aware) when its body is a plain Llama one, else None."""
    body = decoder_of(model)
    if not isinstance(body, LlamaModel):
        return None
    cfg = body.config
    plain = (not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False)
             and getattr(cfg, "hidden_act", "silu") == "silu" and getattr(cfg, "pretraining_tp", 1) == 1)
    return LeanLlama(model) if plain else None


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a (possibly LoRA-adapted) linear layer applies: PEFT's active adapters' deltas merged in."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight
    weight = base.weight
    if getattr(linear, "disable_adapters", False) or getattr(linear, "merged", False):
        return weight
    for name in linear.active_adapters:
        if name in getattr(linear, "lora_A", {}):
            weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight


@dataclass
class KVCache:
    """Keys and values of every layer, ``(layers, b, kv_heads, width, head_dim)``; ``length`` columns are filled."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more columns (doubling the width when it runs out)."""
        need = self.length + extra
        width = self.keys.shape[3]
        if need <= width:
            return
        grow = max(need, 2 * width) - width
        pad = self.keys.new_zeros(*self.keys.shape[:3], grow, self.keys.shape[4])
        self.keys = torch.cat([self.keys, pad], dim=3)
        self.values = torch.cat([self.values, pad], dim=3)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps the batch rows ``rows`` (finished rows leave)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


class LeanLlama:
    """The decoding forward of a Llama body (see the module docstring).

    Args:
        model: the causal LM (transformers Llama, or a PEFT model around one).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.body = decoder_of(model)
        cfg = self.body.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self._weights: dict | None = None
        self._key: tuple | None = None

    def _sources(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def weights(self, dtype: torch.dtype) -> dict:
        """The fused, merged weights in ``dtype``; rebuilt only when a parameter changed since the last call."""
        key = (dtype, *((p._version, p.data_ptr()) for p in self._sources()))
        if self._weights is not None and self._key == key:
            return self._weights
        with torch.no_grad():
            layers = []
            for layer in self.body.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = torch.cat([effective_weight(attn.q_proj), effective_weight(attn.k_proj),
                                 effective_weight(attn.v_proj)])
                gate_up = torch.cat([effective_weight(mlp.gate_proj), effective_weight(mlp.up_proj)])
                layers.append(tuple(w.detach().to(dtype).contiguous() for w in (
                    layer.input_layernorm.weight, qkv, effective_weight(attn.o_proj),
                    layer.post_attention_layernorm.weight, gate_up, effective_weight(mlp.down_proj))))
            inputs, outputs = self.model.get_input_embeddings(), self.model.get_output_embeddings()
            # the rows the embedding's forward reads: PEFT's trainable tokens (the slot token's row) included
            embed = inputs(torch.arange(inputs.weight.shape[0], device=inputs.weight.device))
            tied = outputs.weight.data_ptr() == inputs.weight.data_ptr()
            self._weights = {
                "embed": embed.detach().to(dtype),
                "lm_head": None if tied else effective_weight(outputs).detach().to(dtype),
                "layers": layers,
                "norm": self.body.norm.weight.detach().to(dtype),
                "inv_freq": self.body.rotary_emb.inv_freq.detach().float(),
                "scaling": float(getattr(self.body.rotary_emb, "attention_scaling", 1.0)),
            }
        self._key = key
        return self._weights

    def output_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The LM head's weight in ``dtype`` (the input embeddings when they are tied, as in SmolLM2)."""
        w = self.weights(dtype)
        return w["embed"] if w["lm_head"] is None else w["lm_head"]

    def new_cache(self, batch: int, width: int, dtype: torch.dtype, device) -> KVCache:
        shape = (len(self.body.layers), batch, self.kv_heads, width, self.head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: KVCache,
                dtype: torch.dtype) -> torch.Tensor:
        """Runs ``(b, s)`` new tokens at rotary ``positions`` ``(b, s)`` after the cache's columns.

        Args:
            key_mask: ``(b, cache.length + s)`` bool, True for real (not padding) tokens, the new ones included.
        Returns:
            ``(b, s, hidden)`` last hidden states (after the final norm), as ``LlamaModel`` returns them.
        """
        w = self.weights(dtype)
        b, s = input_ids.shape
        start = cache.length
        cache.reserve(s)
        end = start + s
        x = F.embedding(input_ids, w["embed"])
        freqs = positions[..., None].float() * w["inv_freq"]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * w["scaling"]).to(dtype)[:, None]
        sin = (emb.sin() * w["scaling"]).to(dtype)[:, None]
        # which keys each new token sees: real ones up to itself (a padding query sees itself, so no row is empty)
        query = torch.arange(start, end, device=x.device)[:, None]
        key = torch.arange(end, device=x.device)[None]
        mask = ((key_mask[:, None, :] & (key <= query)) | (key == query))[:, None]  # (b, 1, s, end)
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        for i, (ln1, qkv, o, ln2, gate_up, down) in enumerate(w["layers"]):
            h = F.linear(self._norm(x, ln1), qkv)
            q, k, v = h.split([hq * d, hk * d, hk * d], dim=-1)
            q = q.view(b, s, hq, d).transpose(1, 2)
            k = k.view(b, s, hk, d).transpose(1, 2)
            v = v.view(b, s, hk, d).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.keys[i, :, :, start:end] = k
            cache.values[i, :, :, start:end] = v
            attn = _attention(q, cache.keys[i, :, :, :end], cache.values[i, :, :, :end], mask)
            x = x + F.linear(attn.transpose(1, 2).reshape(b, s, hq * d), o)
            gate, up = F.linear(self._norm(x, ln2), gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down)
        cache.length = end
        return self._norm(x, w["norm"])


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / √d + mask) v`` with grouped-query heads: ``q`` ``(b, hq, s, d)``, ``k``/``v`` ``(b, hk, t, d)``,
    ``mask`` ``(b, 1, s, t)`` bool. One new token (``s == 1``) takes two batched matmuls over the query groups (the
    fused CPU kernel costs several times that for one query row); a prompt takes the fused kernel."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    if s > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hk)
    group = q.view(b, hk, hq // hk, d)  # the query heads that share each key/value head
    scores = torch.matmul(group, k.transpose(2, 3)).float() * d**-0.5  # (b, hk, group, t)
    scores = scores.masked_fill(~mask[:, :, 0, None, :].expand(b, 1, 1, -1), float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (b, hk, group, d)
    return out.view(b, hq, 1, d)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
