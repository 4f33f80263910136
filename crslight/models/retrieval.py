"""Ranking the whole catalogue from the policy itself.

The CRSLab / UniCRS protocol ranks every catalogue item at each recommender turn. Scoring each title by its full
log-likelihood under the policy costs one forward pass over all titles per sample: on ReDial test that is 4,897
samples × 6,924 titles × ~6 tokens ≈ 2·10⁸ tokens, about 55 hours at the ~1,000 tokens/s SmolLM2 reaches on this
machine's CPU. Even with the context's KV cache reused it is the title tokens that cost, so exact log-likelihood
ranking is out of reach here; it stays the right choice for a short candidate list.

What crslight does instead reads the policy's own next-token geometry. The hidden state ``h`` at the end of the
recommender's role header (the state that produces the reply's first token) is scored against each item's
*title embedding* ``ē_i``: the mean of the LM head's output-embedding rows over the title's tokens (year dropped)::

    score_i = <W · h, ē_i> + b_i

With ``W`` = identity and ``b`` = 0 this is exactly the mean next-token logit the policy gives the title's tokens —
a zero-shot ranking from the base model. SFT trains ``W`` (hidden × hidden) and the per-item bias ``b`` with a
cross-entropy over the catalogue, beside the language-model loss; PPO changes ``h`` (and, with full fine-tuning, the
embeddings) and so changes the ranking. Items never mentioned in training still get a score from their title. The
title table follows the live LM-head weights (an ``embedding_bag`` per call, no copy).

Cost: one forward pass per dialogue (every recommender turn read from it) plus one ``(n, h) × (h, n_items)`` matmul.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (its ``last_hidden_state`` is what the LM head reads); PEFT-aware."""
    if hasattr(model, "get_base_model"):  # a peft PeftModel
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def attribute_words(attributes: str | None) -> str:
    """``"genre=drama; mood=calm"`` → ``"drama calm"``: the values of a catalogue ``attributes`` string."""
    if not attributes:
        return ""
    return " ".join(part.split("=", 1)[-1].strip() for part in attributes.split(";") if part.strip())


def title_token_ids(tokenizer, names: list[str], attributes: list[str | None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened token ids of each item's text and their offsets, for ``embedding_bag``: the title (leading space,
    year dropped), then the values of its catalogue attributes when there are any (``"drama calm 2010s"``), so items
    that share a genre or mood share part of their embedding."""
    attributes = attributes or [None] * len(names)
    texts = [" " + " ".join(filter(None, [_YEAR.sub("", name).strip() or name, attribute_words(attrs)]))
             for name, attrs in zip(names, attributes, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    encoded = [ids or [tokenizer.eos_token_id] for ids in encoded]
    lengths = torch.tensor([len(ids) for ids in encoded])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return torch.tensor([i for ids in encoded for i in ids]), offsets


class ItemHead(nn.Module):
    """Scores every catalogue item from a hidden state of the policy (see the module docstring).

    Args:
        hidden_size: the policy's hidden size.
        title_ids: flattened title token ids (:func:`title_token_ids`).
        title_offsets: start of each title in ``title_ids``; its length is the catalogue size.
    """

    def __init__(self, hidden_size: int, title_ids: torch.Tensor, title_offsets: torch.Tensor, links: int = 0):
        super().__init__()
        n = len(title_offsets)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.eye_(self.proj.weight)
        self.bias = nn.Parameter(torch.zeros(n))
        # the context's items: co-mentioned items (EASE links, weight ``link_weight``) and the items themselves
        self.link_weight = nn.Parameter(torch.ones(()))
        self.mention_bonus = nn.Parameter(torch.zeros(()))
        # kept in checkpoints, so a head rebuilds from a state dict alone (and a changed catalogue cannot load)
        self.register_buffer("title_ids", title_ids)
        self.register_buffer("title_offsets", title_offsets)
        self.register_buffer("link_index", torch.full((n, links), -1, dtype=torch.long))
        self.register_buffer("link_value", torch.zeros(n, links))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> ItemHead:
        """A head shaped like the one that wrote ``state`` (keys under ``prefix``), with its weights."""
        links = state[prefix + "link_index"].shape[1] if prefix + "link_index" in state else 0
        head = cls(state[prefix + "proj.weight"].shape[0], state[prefix + "title_ids"], state[prefix + "title_offsets"],
                   links)
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing = head.load_state_dict(own, strict=False).missing_keys
        if set(missing) - {"link_weight", "mention_bonus", "link_index", "link_value"}:  # older heads had no links
            raise RuntimeError(f"item head state lacks {sorted(missing)}")
        return head

    def set_links(self, index: torch.Tensor, value: torch.Tensor) -> None:
        """Installs each item's links to co-mentioned items (``(n_items, k)`` columns, ``-1`` for none, and weights;
        :func:`crslight.models.cooccurrence.top_links`)."""
        self.link_index = index.to(self.title_ids.device)
        self.link_value = value.to(self.title_offsets.device, torch.float32)

    def context_scores(self, previous: torch.Tensor) -> torch.Tensor:
        """``(n, n_items)``: from ``previous`` ``(n, m)`` (``-1``-padded catalogue rows mentioned before), the EASE
        links of those items times ``link_weight``, plus ``mention_bonus`` on the items themselves."""
        n, k = previous.shape[0], self.link_index.shape[1]
        out = torch.zeros(n, self.num_items + 1, device=previous.device)
        real = previous >= 0
        if k:
            target = self.link_index[previous.clamp(min=0)]  # (n, m, k)
            value = self.link_value[previous.clamp(min=0)] * real[..., None]
            target = torch.where(target >= 0, target, self.num_items)
            out = out.scatter_add(1, target.reshape(n, -1), value.reshape(n, -1))
        out = out[:, : self.num_items] * self.link_weight
        return out + self.mention_bonus * previous_mask(previous, self.num_items)

    @classmethod
    def for_catalogue(cls, policy: nn.Module, tokenizer, names: list[str],
                      attributes: list[str | None] | None = None) -> ItemHead:
        return cls(policy.config.hidden_size, *title_token_ids(tokenizer, names, attributes))

    @property
    def num_items(self) -> int:
        return len(self.title_offsets)

    def log_probs(self, hidden: torch.Tensor, output_embeddings: torch.Tensor, previous: torch.Tensor | None = None,
                  temperature: float = 1.0) -> torch.Tensor:
        """The recommendation distribution at slot states: ``(n, h)`` → ``(n, n_items)`` float32 log-probabilities of
        ``scores / temperature``; the items in ``previous`` (``(n, m)`` ``-1``-padded rows: mentioned in the
        dialogue) inform the scores and get probability 0 (a recommendation names something new, unless nothing new
        is left)."""
        scores = self(hidden, output_embeddings, previous).float() / temperature
        if previous is not None:
            mask = previous_mask(previous, self.num_items)
            mask &= ~mask.all(-1, keepdim=True)  # a dialogue that mentioned every item may name one again
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.log_softmax(scores, dim=-1)

    def item_table(self, output_embeddings: torch.Tensor) -> torch.Tensor:
        """``(n_items, h)``: each title's mean output-embedding row."""
        return F.embedding_bag(self.title_ids, output_embeddings, self.title_offsets, mode="mean")

    def forward(self, hidden: torch.Tensor, output_embeddings: torch.Tensor,
                previous: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, h)`` hidden states (and ``(n, m)`` rows mentioned before, ``-1``-padded) → ``(n, n_items)`` scores."""
        table = self.item_table(output_embeddings).to(hidden.dtype)
        scores = self.proj(hidden) @ table.T + self.bias.to(hidden.dtype)
        if previous is not None:
            scores = scores + self.context_scores(previous).to(scores.dtype)
        return scores


def turn_hidden_states(
    policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """One pass over whole dialogues; the last hidden state at each ``(row, position)``: ``(n, h)``."""
    hidden = decoder_of(policy)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[rows, positions]


def rank_scores(policy: nn.Module, head: ItemHead, batch) -> torch.Tensor:
    """Catalogue scores ``(n, n_items)`` for every recommendation sample of an ``SFTBatch``."""
    hidden = turn_hidden_states(policy, batch.input_ids, batch.attention_mask, batch.rec_row, batch.rec_position)
    return head(hidden, policy.get_output_embeddings().weight, batch.rec_previous)


def previous_mask(previous: torch.Tensor, n_items: int) -> torch.Tensor:
    """``(n, m)`` ``-1``-padded item rows → ``(n, n_items)`` bool, True where the item was mentioned earlier."""
    mask = torch.zeros(previous.shape[0], n_items + 1, dtype=torch.bool, device=previous.device)
    mask.scatter_(1, previous.clamp(min=-1) % (n_items + 1), True)  # -1 lands in the spare last column
    return mask[:, :n_items]


def retrieval_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target item over the whole catalogue."""
    return F.cross_entropy(scores.float(), target)


@torch.no_grad()
def slot_features(policy: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's hidden states at every recommendation sample of ``batches`` (``SFTBatch``-like: ``input_ids``,
    ``attention_mask``, ``rec_row``, ``rec_position``, ``rec_target``, ``rec_previous``), for fitting the item scores.

    Returns:
        ``(hidden (n, h) float32, target (n,), previous (n, m))``, ``previous`` ``-1``-padded.
    """
    device = next(policy.parameters()).device
    hidden, target, previous = [], [], []
    for batch in batches:
        if batch.rec_row is not None:
            h = turn_hidden_states(policy, batch.input_ids.to(device), batch.attention_mask.to(device),
                                   batch.rec_row.to(device), batch.rec_position.to(device))
            hidden.append(h.float().cpu())
            target.append(batch.rec_target.cpu())
            previous.extend(batch.rec_previous.cpu())
    if not hidden:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.full((0, 1), -1, dtype=torch.long)
    previous = torch.nn.utils.rnn.pad_sequence(previous, batch_first=True, padding_value=-1)
    return torch.cat(hidden), torch.cat(target), previous


def fit_item_head(head: ItemHead, hidden: torch.Tensor, target: torch.Tensor, previous: torch.Tensor,
                  output_embeddings: torch.Tensor, epochs: int, lr: float, batch_size: int = 256,
                  weight_decay: float = 0.0, seed: int = 0, trains: str = "all") -> list[float]:
    """Trains ``head`` on cached slot states: AdamW on the catalogue cross-entropy, the title table fixed
    (``output_embeddings`` detached); ``trains`` is ``all`` (its map, per-item bias and context weights) or
    ``context`` (the link weight and the mention bonus alone). Seeded, so every DDP rank fits the same head. Returns
    the mean loss of each epoch.

    An epoch over a whole training split costs one ``(n, h) x (h, n_items)`` matmul: seconds, where each SFT step runs
    the whole language model for a few dialogues.
    """
    if trains not in ("all", "context"):
        raise ValueError(f"trains must be 'all' or 'context', got {trains!r}")
    params = [p for p in head.parameters() if p.requires_grad] if trains == "all" else [head.link_weight,
                                                                                         head.mention_bonus]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = head.bias.device
    table_source = output_embeddings.detach().float().to(device)
    hidden, target, previous = hidden.to(device), target.to(device), previous.to(device)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(target), generator=generator).to(device)
        total = 0.0
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            loss = retrieval_loss(head(hidden[rows], table_source, previous[rows]), target[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(rows)
        losses.append(total / max(1, len(target)))
    return losses


ITEM_SCORES_FILE = "item_scores.safetensors"
ITEM_CATALOGUE_FILE = "item_catalogue.json"


def save_item_scores(folder, head: ItemHead, item_ids: list[str], names: list[str]) -> None:
    """Writes the item scores beside an exported policy: the head's tensors (safetensors) and the catalogue's ids and
    names in its row order (what a recommendation slot writes)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, folder / ITEM_SCORES_FILE)
    (folder / ITEM_CATALOGUE_FILE).write_text(json.dumps({"item_id": list(item_ids), "name": list(names)}) + "\n")


def load_item_scores(folder) -> tuple[ItemHead, list[str], list[str]] | None:
    """What :func:`save_item_scores` wrote in ``folder`` — ``(head, item ids, names)`` — or None when it has none."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ITEM_SCORES_FILE).is_file() or not (folder / ITEM_CATALOGUE_FILE).is_file():
        return None
    head = ItemHead.from_state_dict(load_file(folder / ITEM_SCORES_FILE))
    catalogue = json.loads((folder / ITEM_CATALOGUE_FILE).read_text())
    if len(catalogue["item_id"]) != head.num_items:
        raise ValueError(f"{folder / ITEM_CATALOGUE_FILE} names {len(catalogue['item_id'])} items, the item scores "
                         f"{head.num_items}")
    return head.eval(), catalogue["item_id"], catalogue["name"]
