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

Cost: one forward pass per dialogue (every recommender turn read from it) plus one ``(n, h) × (h, n_items)`` matmul;
no forward pass at all while ``W`` is zero (a head fitted on the context alone, ``trains: context``).

**The context's words.** A head built with ``text_turns > 0`` also reads the last ``text_turns`` turns of the dialogue
as text: a sentence encoder (MiniLM by default, :mod:`crslight.models.encoder`) embeds them as ``t`` and each item
has a vector ``v_i`` of the same size, initialised from the encoder's embedding of its title, so a title that the
seeker's words resemble scores high before any training::

    score_i += s · <t, v_i>

``text_turns`` may list several windows (``[3, 8]``): ``t`` is then the normalised sum of each window's embedding, the
recent request and the longer conversation together (on ReDial's valid split Recall@50 0.472 with the last 3 turns,
0.475 with 8, 0.486 with both; docs/results.md).

The text is what reaches the items no training dialogue mentions (about 15% of ReDial's test targets): their ids have
no co-mentions, their titles still have words. :func:`fit_text_scores` fits ``v`` and ``s`` alone on the training
split's samples; :func:`choose_text_weight` then scales ``s`` by the weight of the text beside the other scores that
ranks a held-out split best.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def target_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The 1-based rank of each target among the non-excluded items (ties pessimistic): what the item scores are
    fitted on here and what the ranking metrics (:mod:`crslight.metrics.ranking`) average.

    Args:
        scores: ``(b, n_items)`` scores, higher is better.
        target: ``(b,)`` long, the relevant item's column.
        exclude: ``(b, n_items)`` bool, items left out of the ranking.

    Returns:
        ``(b,)`` float ranks; ``inf`` for a sample whose target is excluded.
    """
    if scores.ndim != 2 or target.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (b, n_items) and target (b,), got {tuple(scores.shape)} and "
                         f"{tuple(target.shape)}")
    target = target.long()
    target_score = scores.gather(1, target[:, None])
    ahead = scores >= target_score
    ahead.scatter_(1, target[:, None], False)
    if exclude is not None:
        ahead &= ~exclude.bool()
    ranks = 1.0 + ahead.sum(1).to(torch.float64)
    if exclude is not None:
        ranks[exclude.bool().gather(1, target[:, None]).squeeze(1)] = math.inf
    return ranks


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


def item_texts(names: list[str], attributes: list[str | None] | None = None) -> list[str]:
    """Each item's text: the title (year dropped), then the values of its catalogue attributes when there are any
    (``"Heat drama calm 2010s"``), so items that share a genre or mood share part of it."""
    attributes = attributes or [None] * len(names)
    return [" ".join(filter(None, [_YEAR.sub("", name).strip() or name, attribute_words(attrs)]))
            for name, attrs in zip(names, attributes, strict=True)]


def text_windows(text_turns: int | list[int]) -> list[int]:
    """The context windows (numbers of last turns) a text part reads: ``3`` → ``[3]``, ``[3, 8]`` → ``[3, 8]``, ``0`` or
    ``[]`` → none. A window below 1 is an error."""
    windows = [text_turns] if isinstance(text_turns, int) else list(text_turns)
    if windows == [0]:
        return []
    if any(not isinstance(w, int) or w < 1 for w in windows):
        raise ValueError(f"item_text_turns must be 0, a number of turns of 1 or more, or a list of them; got {text_turns}")
    return windows


def title_token_ids(tokenizer, names: list[str], attributes: list[str | None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened token ids of each item's text (:func:`item_texts`, after a leading space) and their offsets, for
    ``embedding_bag``."""
    texts = [" " + text for text in item_texts(names, attributes)]
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
        links: co-mentioned items kept per item (:meth:`set_links`).
        text_items: ``(n_items, d)`` initial item vectors of the text part (the sentence encoder's title embeddings);
            None: no text part.
        text_turns: how many of the context's last turns the text part reads; a list: several such windows, their
            embeddings summed and normalised.
        text_model: the sentence encoder that embeds them (``minilm`` or a local sentence-transformers folder); not
            saved with the weights: whoever loads the head sets it (:attr:`text_model`).
        text_encoder: a fine-tuned copy of that encoder (:class:`~crslight.models.encoder.TextTower`, made by
            :func:`tune_text_encoder`) that reads the contexts instead; its weights are part of the head's.
    """

    def __init__(self, hidden_size: int, title_ids: torch.Tensor, title_offsets: torch.Tensor, links: int = 0,
                 text_items: torch.Tensor | None = None, text_turns: int | list[int] = 3, text_model: str = "minilm",
                 text_encoder: nn.Module | None = None):
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
        self.text_items = None if text_items is None else nn.Parameter(text_items.detach().float().clone())
        self.text_scale = None if text_items is None else nn.Parameter(torch.ones(()))
        # one window: a 0-d buffer, as heads have always saved it; several: a 1-d one
        self.register_buffer("text_turns", torch.tensor(text_turns if text_items is not None else 0))
        self.text_model = text_model
        self.text_encoder = text_encoder  # a fine-tuned copy of the encoder (tune_text_encoder), saved with the head
        self._encoder = None

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "", text_model: str = "minilm") -> ItemHead:
        """A head shaped like the one that wrote ``state`` (keys under ``prefix``), with its weights."""
        links = state[prefix + "link_index"].shape[1] if prefix + "link_index" in state else 0
        text = state.get(prefix + "text_items")
        turns = state[prefix + "text_turns"].tolist() if prefix + "text_turns" in state else 0
        encoder = None
        if any(k.startswith(prefix + "text_encoder.") for k in state):  # a tuned encoder: its starting architecture
            from crslight.models.encoder import TextTower

            encoder = TextTower(text_model)
        head = cls(state[prefix + "proj.weight"].shape[0], state[prefix + "title_ids"], state[prefix + "title_offsets"],
                   links, text, turns, text_model, encoder)
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing = head.load_state_dict(own, strict=False).missing_keys
        if set(missing) - {"link_weight", "mention_bonus", "link_index", "link_value", "text_turns"}:  # older heads
            raise RuntimeError(f"item head state lacks {sorted(missing)}")
        return head

    def requires_grad_(self, requires_grad: bool = True) -> ItemHead:
        """As ``nn.Module.requires_grad_``, except that a tuned text encoder stays frozen: it trains only in
        :func:`tune_text_encoder`, and no optimizer needs its 22M weights."""
        super().requires_grad_(requires_grad)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)
        return self

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
                      attributes: list[str | None] | None = None, links: int = 0, text_turns: int | list[int] = 0,
                      text_model: str = "minilm") -> ItemHead:
        """A head over a catalogue's ``names`` (and ``attributes``); with ``text_turns > 0`` a text part whose item
        vectors start as ``text_model``'s embeddings of the titles (years dropped) and their attribute words."""
        text_items = None
        if text_windows(text_turns):
            from crslight.models.encoder import SentenceEncoder

            text_items = SentenceEncoder(text_model, cache_size=0).encode(item_texts(names, attributes))
        return cls(policy.config.hidden_size, *title_token_ids(tokenizer, names, attributes), links, text_items,
                   text_turns, text_model)

    @property
    def num_items(self) -> int:
        return len(self.title_offsets)

    @property
    def reads_hidden(self) -> bool:
        """Whether the scores depend on the policy's hidden state: False while the map ``W`` is all zeros (a head
        fitted with ``trains: context``), when ranking needs no pass of the policy."""
        return bool(self.proj.weight.detach().any())

    @property
    def reads_text(self) -> bool:
        """Whether the scores read the context's words (a text part)."""
        return self.text_items is not None

    def encode_contexts(self, contexts: list[list[str]]) -> torch.Tensor | None:
        """``(n, d)`` embeddings of the last ``text_turns`` of each context (its turns'
        :func:`~crslight.schema.context_lines`), on the head's device; None when the head has no text part."""
        if not self.reads_text:
            return None
        if self.text_encoder is not None:
            return self.window_embeddings(contexts, self.text_encoder.encode).to(self.text_items.device)
        if self._encoder is None or self._encoder.model != self.text_model:
            from crslight.models.encoder import SentenceEncoder

            self._encoder = SentenceEncoder(self.text_model)
        return self.window_embeddings(contexts, self._encoder.encode).to(self.text_items.device)

    def window_embeddings(self, contexts: list[list[str]], encode) -> torch.Tensor:
        """``(n, d)``: ``encode`` (texts → unit-norm embeddings) of each context's last turns, per window; several
        windows summed and normalised."""
        windows = text_windows(self.text_turns.tolist())
        embeddings = [encode([" ".join(lines[-turns:]) if lines else "" for lines in contexts]) for turns in windows]
        return embeddings[0] if len(windows) == 1 else F.normalize(torch.stack(embeddings).sum(0), dim=-1)

    def text_scores(self, text: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` context embeddings → ``(n, n_items)``: ``text_scale · <t, v_i>``."""
        return self.text_scale * (text.to(self.text_items.dtype) @ self.text_items.T)

    def log_probs(self, hidden: torch.Tensor, output_embeddings: torch.Tensor, previous: torch.Tensor | None = None,
                  temperature: float = 1.0, text: torch.Tensor | None = None) -> torch.Tensor:
        """The recommendation distribution at slot states: ``(n, h)`` → ``(n, n_items)`` float32 log-probabilities of
        ``scores / temperature``; the items in ``previous`` (``(n, m)`` ``-1``-padded rows: mentioned in the
        dialogue) inform the scores and get probability 0 (a recommendation names something new, unless nothing new
        is left); ``text``: the contexts' embeddings (:meth:`encode_contexts`) when the head reads text."""
        scores = self(hidden, output_embeddings, previous, text).float() / temperature
        if previous is not None:
            mask = previous_mask(previous, self.num_items)
            mask &= ~mask.all(-1, keepdim=True)  # a dialogue that mentioned every item may name one again
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.log_softmax(scores, dim=-1)

    def item_table(self, output_embeddings: torch.Tensor) -> torch.Tensor:
        """``(n_items, h)``: each title's mean output-embedding row."""
        return F.embedding_bag(self.title_ids, output_embeddings, self.title_offsets, mode="mean")

    def forward(self, hidden: torch.Tensor, output_embeddings: torch.Tensor,
                previous: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, h)`` hidden states (and ``(n, m)`` rows mentioned before, ``-1``-padded; ``(n, d)`` context
        embeddings, required when the head reads text) → ``(n, n_items)`` scores."""
        table = self.item_table(output_embeddings).to(hidden.dtype)
        scores = self.proj(hidden) @ table.T + self.bias.to(hidden.dtype)
        if previous is not None:
            scores = scores + self.context_scores(previous).to(scores.dtype)
        if self.reads_text:
            if text is None or len(text) != len(hidden):
                raise ValueError("these item scores read the context's words: pass one text embedding per hidden state "
                                 "(ItemHead.encode_contexts)")
            scores = scores + self.text_scores(text).to(scores.dtype)
        return scores


def turn_hidden_states(
    policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """One pass over whole dialogues; the last hidden state at each ``(row, position)``: ``(n, h)``."""
    hidden = decoder_of(policy)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[rows, positions]


def rank_scores(policy: nn.Module, head: ItemHead, batch) -> torch.Tensor:
    """Catalogue scores ``(n, n_items)`` for every recommendation sample of an ``SFTBatch`` (the policy runs only when
    the scores read its hidden states: :attr:`ItemHead.reads_hidden`)."""
    if head.reads_hidden:
        hidden = turn_hidden_states(policy, batch.input_ids, batch.attention_mask, batch.rec_row, batch.rec_position)
    else:
        hidden = head.proj.weight.new_zeros(len(batch.rec_row), head.proj.in_features)
    return head(hidden, policy.get_output_embeddings().weight, batch.rec_previous, head.encode_contexts(batch.rec_context))


def previous_mask(previous: torch.Tensor, n_items: int) -> torch.Tensor:
    """``(n, m)`` ``-1``-padded item rows → ``(n, n_items)`` bool, True where the item was mentioned earlier."""
    mask = torch.zeros(previous.shape[0], n_items + 1, dtype=torch.bool, device=previous.device)
    mask.scatter_(1, previous.clamp(min=-1) % (n_items + 1), True)  # -1 lands in the spare last column
    return mask[:, :n_items]


def retrieval_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target item over the whole catalogue."""
    return F.cross_entropy(scores.float(), target)


class SlotData(NamedTuple):
    """Recommendation samples as the item scores read them: the policy's hidden state at each slot ``(n, h)`` float32
    (zeros when the scores do not read it), the target rows ``(n,)``, the rows mentioned before ``(n, m)``
    (``-1``-padded), the context embeddings ``(n, d)`` (None without a text part, or before they are computed) and
    each sample's context lines (what a tuned text encoder reads)."""

    hidden: torch.Tensor
    target: torch.Tensor
    previous: torch.Tensor
    text: torch.Tensor | None = None
    contexts: list[list[str]] | None = None


@torch.no_grad()
def slot_features(policy: nn.Module | None, batches, head: ItemHead, hidden_size: int = 0,
                  encode: bool = True) -> SlotData:
    """Every recommendation sample of ``batches`` (``SFTBatch``-like: ``input_ids``, ``attention_mask``, ``rec_row``,
    ``rec_position``, ``rec_target``, ``rec_previous``, ``rec_context``) for fitting ``head``: with ``policy`` None the
    policy does not run and the hidden states are zeros of ``hidden_size``; ``encode`` False leaves the context
    embeddings to be computed later (by an encoder still to be tuned)."""
    device = next(policy.parameters()).device if policy is not None else torch.device("cpu")
    hidden, target, previous, contexts = [], [], [], []
    for batch in batches:
        if batch.rec_row is None:
            continue
        if policy is not None:
            h = turn_hidden_states(policy, batch.input_ids.to(device), batch.attention_mask.to(device),
                                   batch.rec_row.to(device), batch.rec_position.to(device))
            hidden.append(h.float().cpu())
        else:
            hidden.append(torch.zeros(len(batch.rec_target), hidden_size))
        target.append(batch.rec_target.cpu())
        previous.extend(batch.rec_previous.cpu())
        contexts.extend(batch.rec_context or [[] for _ in batch.rec_target])
    if not hidden:
        return SlotData(torch.zeros(0, hidden_size), torch.zeros(0, dtype=torch.long),
                        torch.full((0, 1), -1, dtype=torch.long))
    previous = torch.nn.utils.rnn.pad_sequence(previous, batch_first=True, padding_value=-1)
    text = head.encode_contexts(contexts) if encode else None
    return SlotData(torch.cat(hidden), torch.cat(target), previous, None if text is None else text.cpu(), contexts)


def _text_parameters(head: ItemHead) -> set[int]:
    return {id(p) for p in (head.text_items, head.text_scale) if p is not None}


def fit_item_head(head: ItemHead, data: SlotData, output_embeddings: torch.Tensor, epochs: int, lr: float,
                  batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0, trains: str = "all") -> list[float]:
    """Trains ``head`` on cached samples (:func:`slot_features`): AdamW on the catalogue cross-entropy, the title
    table fixed (``output_embeddings`` detached); ``trains`` is ``all`` (its map, per-item bias and context weights)
    or ``context`` (the link weight and the mention bonus alone). The text part, if any, is not trained here
    (:func:`fit_text_scores`). Seeded, so every DDP rank fits the same head. Returns the mean loss of each epoch.

    An epoch over a whole training split costs one ``(n, h) x (h, n_items)`` matmul: seconds, where each SFT step runs
    the whole language model for a few dialogues.
    """
    if trains not in ("all", "context"):
        raise ValueError(f"trains must be 'all' or 'context', got {trains!r}")
    text_params = _text_parameters(head)
    params = ([p for p in head.parameters() if p.requires_grad and id(p) not in text_params] if trains == "all"
              else [head.link_weight, head.mention_bonus])
    device = head.bias.device
    table_source = output_embeddings.detach().float().to(device)
    hidden, previous = data.hidden.to(device), data.previous.to(device)
    text = data.text.to(device) if data.text is not None else None

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        return retrieval_loss(head(hidden[rows], table_source, previous[rows],
                                   text[rows] if text is not None else None), data.target.to(device)[rows])

    return _adamw_epochs(params, loss_of, len(data.target), epochs, lr, batch_size, weight_decay, seed, device)


def fit_text_scores(head: ItemHead, data: SlotData, epochs: int, lr: float = 5e-2, item_lr: float = 1e-3,
                    batch_size: int = 256, seed: int = 0) -> list[float]:
    """Trains the text part alone (:meth:`ItemHead.text_scores` as the whole score): its scale at ``lr``, the item
    vectors at ``item_lr`` (they start at the titles' embeddings and should not wander far on a small split). Returns
    the mean loss of each epoch."""
    if not head.reads_text or data.text is None:
        raise ValueError("fit_text_scores needs a head with a text part and the samples' context embeddings")
    device = head.text_items.device
    text, target = data.text.to(device), data.target.to(device)
    groups = [{"params": [head.text_scale], "lr": lr}, {"params": [head.text_items], "lr": item_lr}]
    return _adamw_epochs(groups, lambda rows: retrieval_loss(head.text_scores(text[rows]), target[rows]),
                         len(target), epochs, lr, batch_size, 0.0, seed, device)


def tune_text_encoder(head: ItemHead, data: SlotData, epochs: int, lr: float = 3e-5, item_lr: float = 1e-3,
                      scale_lr: float = 5e-2, batch_size: int = 32, seed: int = 0, log=None) -> list[float]:
    """Fine-tunes a copy of the text part's sentence encoder together with the item vectors and the scale, on the
    catalogue cross-entropy of the text part alone over ``data``'s contexts (its ``contexts``): the encoder learns
    which words of a conversation point to which items, where the frozen one only compares them with titles.

    The copy (:class:`~crslight.models.encoder.TextTower`) becomes ``head.text_encoder`` and reads the contexts from
    then on; the scale starts at 20 (cosines in [-1, 1] need it to be a sharp distribution). One epoch over ReDial's
    training split (10,639 samples, one window) took about 6 minutes on an idle 2-core CPU. Seeded; returns each epoch's
    mean loss; ``log(message)`` hears of progress. The encoder's dropout draws from ``seed`` too, so every DDP rank
    tunes the same encoder (the tuning runs on each rank, outside DDP's gradient averaging).
    """
    if not head.reads_text or data.contexts is None:
        raise ValueError("tune_text_encoder needs a head with a text part and the samples' context lines")
    from crslight.models.encoder import TextTower

    if head.text_encoder is None:
        head.text_encoder = TextTower(head.text_model).to(head.text_items.device)
    encoder = head.text_encoder
    encoder.requires_grad_(True)
    encoder.train()
    head.text_scale.data.fill_(20.0)
    target = data.target.to(head.text_items.device)
    contexts = data.contexts
    groups = [{"params": list(encoder.parameters()), "lr": lr}, {"params": [head.text_items], "lr": item_lr},
              {"params": [head.text_scale], "lr": scale_lr}]
    try:
        with torch.random.fork_rng(devices=[]):  # dropout from ``seed``: every DDP rank tunes the same encoder
            torch.manual_seed(seed)
            return _adamw_epochs(groups, lambda rows: retrieval_loss(
                head.text_scores(head.window_embeddings([contexts[i] for i in rows.tolist()], encoder)), target[rows]),
                len(target), epochs, lr, batch_size, 0.0, seed, head.text_items.device, log)
    finally:
        encoder.requires_grad_(False)
        encoder.eval()


def _adamw_epochs(params, loss_of, n: int, epochs: int, lr: float, batch_size: int, weight_decay: float, seed: int,
                  device, log=None) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for lo in range(0, n, batch_size):
            rows = order[lo : lo + batch_size]
            loss = loss_of(rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / max(1, n))
        if log is not None:
            log(f"epoch {len(losses)} of {epochs}: loss {losses[-1]:.3f}")
    return losses


#: the weights of the text part beside the other scores that :func:`choose_text_weight` tries
TEXT_WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@torch.no_grad()
def choose_text_weight(head: ItemHead, data: SlotData, output_embeddings: torch.Tensor,
                       weights: tuple[float, ...] = TEXT_WEIGHTS, ks: tuple[int, ...] = (1, 10, 50)
                       ) -> tuple[float, dict[float, float]]:
    """Scales the fitted text part by the weight (of ``weights``) whose scores rank ``data`` (a held-out split) best:
    the highest sum of Recall@k over ``ks`` (the whole catalogue ranked, ties pessimistic, as the test protocol ranks
    it: :func:`target_ranks`), the smaller
    weight on a tie, the other scores as they are. Returns ``(weight, {weight: that sum})``.

    Recall, not the cross-entropy: on ReDial the cross-entropy asks for six times the weight that ranks best (the
    text part is confident on the few samples it knows and flat elsewhere), and the ranking is what is measured."""
    device = head.bias.device
    table = output_embeddings.detach().float().to(device)
    rest, text_part = [], []
    for lo in range(0, len(data.target), 512):
        rows = slice(lo, lo + 512)
        text = data.text[rows].to(device)
        part = head.text_scores(text).float()
        rest.append(head(data.hidden[rows].to(device), table, data.previous[rows].to(device), text).float() - part)
        text_part.append(part)
    rest, text_part, target = torch.cat(rest), torch.cat(text_part), data.target.to(device)

    def recall_sum(weight: float) -> float:
        rank = target_ranks(rest + weight * text_part, target)
        return sum(float((rank <= k).float().mean()) for k in ks)

    found = {w: recall_sum(w) for w in weights}
    best = max(sorted(found), key=lambda w: found[w])  # max keeps the first of equals: the smallest weight
    head.text_scale.mul_(best)
    return best, found


def fit_item_scores(head: ItemHead, train: SlotData, valid: SlotData | None, output_embeddings: torch.Tensor,
                    epochs: int, lr: float, trains: str = "all", prior: float = 0.0, text_epochs: int = 8,
                    seed: int = 0, tune_epochs: int = 0, tune_lr: float = 3e-5, log=None) -> dict[str, float]:
    """The whole fit of the item scores on cached samples, in order: the text part alone (``text_epochs`` on the
    frozen encoder's embeddings, or with ``tune_epochs`` that many epochs of :func:`tune_text_encoder` at
    ``tune_lr``, when the head has a text part); the rest with the text part switched off (:func:`fit_item_head`;
    with ``trains: context`` the map is zeroed and the bias set to ``prior`` times the log of one plus each item's
    count among the training targets); then the text part's weight beside the rest, chosen on ``valid`` (the training
    samples when None). Returns what happened: losses, the text weight and the held-out sum of Recall@1, @10 and @50
    with and without the text."""
    out: dict[str, float] = {"samples": len(train.target)}
    text_scale = None
    tuned = head.reads_text and tune_epochs > 0
    if tuned:
        text_losses = tune_text_encoder(head, train, tune_epochs, lr=tune_lr, seed=seed, log=log)
        # the rest fits with the text part switched off: zeros stand for the train split's embeddings
        train = train._replace(text=torch.zeros(len(train.target), head.text_items.shape[1]))
        if valid is not None and len(valid.target):
            valid = valid._replace(text=head.encode_contexts(valid.contexts).cpu())
    elif head.reads_text:
        text_losses = fit_text_scores(head, train, text_epochs, seed=seed)
    if head.reads_text:
        if text_losses:
            out.update(text_first_loss=text_losses[0], text_last_loss=text_losses[-1])
        text_scale = head.text_scale.detach().clone()
        head.text_scale.data.zero_()
    if trains == "context":
        counts = torch.bincount(train.target, minlength=head.num_items).float()
        head.bias.data.copy_(prior * counts.log1p().to(head.bias.device))
        head.proj.weight.data.zero_()
    losses = fit_item_head(head, train, output_embeddings, epochs, lr, trains=trains, seed=seed)
    out.update(first_loss=losses[0], last_loss=losses[-1])
    if text_scale is not None:
        head.text_scale.data.copy_(text_scale)
        held_out = valid if valid is not None and len(valid.target) else train
        if tuned and held_out is train:
            held_out = train._replace(text=head.encode_contexts(train.contexts).cpu())
        weight, found = choose_text_weight(head, held_out, output_embeddings)
        out.update(text_weight=weight, held_out_recall=found[weight], held_out_recall_without_text=found[0.0],
                   held_out_samples=len(held_out.target))
    return out


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
