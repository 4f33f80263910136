"""LightningDataModules: one per source (``ReDial``, ``OpenDialKG``, ``Synthetic``, ``Logs``), one ``task`` per stage.

- ``task: sft`` — whole dialogues with a loss mask on the recommender's tokens (:class:`SFTBatch`): one pass trains
  on every recommender turn of a dialogue.
- ``task: prompts`` — one prompt per recommender turn, the context before it, left-padded for ``generate``
  (:class:`PromptBatch`); it carries the dialogue and turn index so a simulator can ground the episode.

The test split is always read as whole dialogues (:class:`SFTBatch` with its recommendation samples), whatever the
task, so evaluation encodes each dialogue once and reads every recommender turn from that one pass.

Tokenisation uses the policy's chat template (``crslight.models.tokenize``); it happens in ``setup``, once per split.
The training loader saves its place in the epoch into checkpoints, so a run resumed mid-epoch goes on with the batches
an uninterrupted run would see (:mod:`crslight.data.resumable`).
"""

from __future__ import annotations

from itertools import islice
from typing import Literal, NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from crslight.data.corpus import Corpus, load_corpus
from crslight.data.pairs import PairOptions, make_pair_data, pair_loader
from crslight.data.resumable import ResumableLoader, ShuffleSampler
from crslight.guards import require_positive
from crslight.models.tokenize import DEFAULT_SYSTEM_PROMPT, encode_dialogue, encode_prompt
from crslight.schema import RECOMMENDER, context_lines, rec_samples_of

IGNORE_INDEX = -100


class SFTBatch(NamedTuple):
    """Right-padded dialogues, with the recommendation samples they hold (CRSLab / UniCRS protocol).

    Attributes:
        input_ids: ``(b, t)`` token ids.
        attention_mask: ``(b, t)`` 1 on tokens, 0 on padding.
        labels: ``(b, t)`` the token id where the recommender speaks, ``-100`` elsewhere (unshifted, as transformers'
            causal LMs expect).
        rec_row: ``(n,)`` the batch row of each recommendation sample.
        rec_position: ``(n,)`` the position whose hidden state scores the catalogue: the recommendation slot
            (:data:`~crslight.models.tokenize.ITEM_TOKEN`) of the item; in the test split the turn's first slot for every
            item of the turn (the protocol ranks once per turn: no item of the reply is seen), and the last token of
            the role header for a turn whose items have no slot.
        rec_target: ``(n,)`` the catalogue row of the item the turn mentions.
        rec_previous: ``(n, m)`` catalogue rows of items mentioned earlier in the dialogue, ``-1``-padded (for the
            protocol variant that excludes them).
        rec_context: per sample, ``"role: text"`` of each turn before it (:func:`~crslight.schema.
            context_lines`): what item scores with a text part read.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rec_row: torch.Tensor | None = None
    rec_position: torch.Tensor | None = None
    rec_target: torch.Tensor | None = None
    rec_previous: torch.Tensor | None = None
    rec_context: list[list[str]] | None = None


class PromptBatch(NamedTuple):
    """Left-padded prompts for the recommender's next reply.

    Attributes:
        input_ids: ``(b, t)`` token ids, padding on the left.
        attention_mask: ``(b, t)``.
        dialogue_index: ``(b,)`` row of the dialogue in the split.
        turn_index: ``(b,)`` index of the recommender turn the prompt precedes.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    dialogue_index: torch.Tensor
    turn_index: torch.Tensor


class DialogueSample(NamedTuple):
    ids: list[int]
    labels: list[int]
    recs: list[tuple[int, int, list[int], list[str]]]  # (position, target, previous, context) per recommendation


class PromptSample(NamedTuple):
    ids: list[int]
    dialogue: int
    turn: int


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pads lists of ints into a ``(b, max_len)`` long tensor."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            if left:
                out[i, width - len(s):] = torch.tensor(s)
            else:
                out[i, : len(s)] = torch.tensor(s)
    return out


DEFAULT_TOKENIZER = "smollm2"
"""The DataModule's tokenizer when none is given; in a config it follows the policy (``model.init_args.model``)."""


class CRSDataModule(LightningDataModule):
    """Shared DataModule logic; use the per-source subclasses in configs.

    Args:
        root: folder of the official download (``None`` for ``Synthetic``).
        task: ``sft`` (dialogues with a recommender loss mask), ``prompts`` (one prompt per recommender turn) or
            ``pairs`` (reward-model samples and preference pairs, as text: see ``crslight.data.pairs``).
        tokenizer: model name, folder or alias whose tokenizer and chat template are used (``smollm2``). In a config
            it is the policy's, linked to ``model.init_args.model`` (``crslight.lightning_cli``): leave it out.
        batch_size: samples per batch.
        max_length: tokens kept per sample (dialogues are cut on the right, prompts lose their oldest turns); the
            test split's dialogues are never cut, so that every recommendation sample is scored.
        system_prompt: the system message before every dialogue; empty for none.
        num_workers: DataLoader workers.
        skip_bad_rows: skip malformed source rows instead of raising (the count is logged).
        max_samples: keep only the first N samples of each split (quick runs); ``None`` keeps all.
        train_split: the split trained on.
        eval_split: the split ``validate`` uses; ``test`` always uses ``test``.
        pairs: ``task: pairs`` only: the composite label (signals and weights) and which pairs to build.
    """

    source: str = ""

    def __init__(
        self,
        root: str | None = None,
        task: Literal["sft", "prompts", "pairs"] = "sft",
        tokenizer: str = DEFAULT_TOKENIZER,
        batch_size: int = 8,
        max_length: int = 512,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        num_workers: int = 0,
        skip_bad_rows: bool = False,
        max_samples: int | None = None,
        train_split: str = "train",
        eval_split: str = "valid",
        pairs: PairOptions | None = None,
    ):
        super().__init__()
        require_positive(batch_size=batch_size, max_length=max_length, max_samples=max_samples)
        if task not in ("sft", "prompts", "pairs"):
            raise ValueError(f"unknown task {task!r}: expected 'sft', 'prompts' or 'pairs'")
        self.save_hyperparameters(ignore=["pairs"])  # signal extractors hold caches; the CLI saves the config
        self.root, self.task, self.tokenizer_name = root, task, tokenizer
        self.batch_size, self.max_length, self.num_workers = batch_size, max_length, num_workers
        self.system_prompt = system_prompt or None
        self.max_samples = max_samples
        self.splits = {"fit": train_split, "validate": eval_split, "test": "test", "predict": "test"}
        self._tokenizer = None
        self._item_names: dict[str, str] | None = None
        self._data: dict[str, object] = {}
        self.pairs = (pairs or PairOptions()) if task == "pairs" else pairs

    # -- sources ------------------------------------------------------------------------------------------------
    def corpus(self, split: str) -> Corpus:
        """The split in the canonical schema (cached on disk; cheap to call again)."""
        return load_corpus(self.source, self.root, split, skip_bad_rows=self.hparams.skip_bad_rows,
                           **self.corpus_options())

    def corpus_options(self) -> dict:
        return {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from crslight.models.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name, item_token=True)
        return self._tokenizer

    @property
    def item_names(self) -> dict[str, str]:
        """item id → catalogue name (one catalogue for every split): what recommendation slots write."""
        if self._item_names is None:
            catalogue = self.corpus(self.splits["fit"]).catalogue
            self._item_names = dict(zip(catalogue["item_id"], catalogue["name"], strict=True))
        return self._item_names

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        for split in {"train", "valid", "test"} & set(self.splits.values()):
            self.corpus(split)

    def setup(self, stage: str) -> None:
        splits = [self.splits["fit"], self.splits["validate"]] if stage == "fit" else [self.splits[stage]]
        for split in splits:
            if split not in self._data:
                self._data[split] = self.build(split)

    def build(self, split: str):
        if self.task == "pairs":
            return make_pair_data(self.corpus, split, self.pairs)
        corpus = self.corpus(split)
        dialogues = corpus.dialogues
        if self.task == "sft" or split == self.splits["test"]:  # evaluation always reads whole dialogues
            rows = dialogues.select(range(min(self.max_samples, len(dialogues)))) if self.max_samples else dialogues
            # the test split is never cut: every recommendation sample of the protocol is scored
            test = split == self.splits["test"]
            return [self.encode_sft(turns, corpus.item_index, None if test else self.max_length, first_slot=test)
                    for turns in rows["turns"]]
        starts = ((d, t, turns) for d, turns in enumerate(dialogues["turns"]) for t, tr in enumerate(turns)
                  if tr["role"] == RECOMMENDER and t > 0)
        # only the prompts kept are tokenised: a quick run (max_samples) does not encode the whole split first
        return [PromptSample(self.encode_prompt(turns[:t]), d, t) for d, t, turns in islice(starts, self.max_samples)]

    def encode_sft(self, turns: list[dict], item_index: dict[str, int], max_length: int | None,
                   first_slot: bool = False) -> DialogueSample:
        """Token ids, labels, and ``(position, target, previous, context lines)`` per recommendation sample within
        ``max_length`` (None: the whole dialogue); the position is the item's slot, or with ``first_slot`` the turn's
        first slot (see :class:`SFTBatch`)."""
        enc = encode_dialogue(self.tokenizer, turns, self.system_prompt, self.item_names)
        ids = enc.input_ids[:max_length]
        labels = [i if m else IGNORE_INDEX for i, m in zip(ids, enc.loss_mask, strict=False)]
        recs = []
        lines = context_lines(turns)
        for s in rec_samples_of(0, turns):
            slots = enc.slots[s.turn]
            own = [p for p, item in slots if item == s.item]
            position = (slots[0][0] if first_slot and slots else own[0] if own else enc.turn_starts[s.turn] - 1)
            if s.item in item_index and position < len(ids):
                recs.append((position, item_index[s.item], [item_index[i] for i in s.previous_items if i in item_index],
                             lines[: s.turn]))
        return DialogueSample(ids, labels, recs)

    def encode_prompt(self, turns: list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, turns, self.system_prompt, self.max_length, self.item_names)

    # -- collation ----------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(self, samples: list) -> SFTBatch | PromptBatch:
        if isinstance(samples[0], DialogueSample):
            ids = pad([s[0] for s in samples], self.pad_id)
            mask = pad([[1] * len(s[0]) for s in samples], 0)
            recs = [(row, *rec) for row, s in enumerate(samples) for rec in s.recs]
            if not recs:
                return SFTBatch(ids, mask, pad([s[1] for s in samples], IGNORE_INDEX))
            return SFTBatch(
                ids, mask, pad([s[1] for s in samples], IGNORE_INDEX),
                rec_row=torch.tensor([r[0] for r in recs]),
                rec_position=torch.tensor([r[1] for r in recs]),
                rec_target=torch.tensor([r[2] for r in recs]),
                rec_previous=pad([r[3] or [-1] for r in recs], -1),
                rec_context=[r[4] for r in recs],
            )
        ids = pad([s[0] for s in samples], self.pad_id, left=True)
        mask = pad([[1] * len(s[0]) for s in samples], 0, left=True)
        return PromptBatch(ids, mask, torch.tensor([s[1] for s in samples]), torch.tensor([s[2] for s in samples]))

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._data:
            self._data[split] = self.build(split)
        data = self._data[split]
        if self.task == "pairs":
            return pair_loader(data, shuffle, self.batch_size, self.num_workers)
        if shuffle:  # training: a run resumed from a mid-epoch checkpoint goes on where it stopped
            return ResumableLoader(data, batch_size=self.batch_size, sampler=ShuffleSampler(data),
                                   collate_fn=self.collate, num_workers=self.num_workers,
                                   drop_last=self.task == "prompts")
        # evaluation batches dialogues of similar length together: far less padding, same metrics
        order = sorted(range(len(data)), key=lambda i: len(data[i].ids))
        return DataLoader(data, batch_size=self.batch_size, sampler=order, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.splits["fit"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.splits["validate"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.splits["test"], shuffle=False)


class ReDial(CRSDataModule):
    """ReDial (Li et al., NeurIPS 2018) from the official files in ``root`` (see ``crslight.data.redial``)."""

    source = "redial"


class OpenDialKG(CRSDataModule):
    """OpenDialKG (Moon et al., ACL 2019) from the official ``data/`` folder in ``root``.

    Args:
        catalogue: ``recommended`` (the entities that recommender turns mention: the convention of published results,
            UniCRS and iEvaLM) or ``entities`` (all 100,812 entities of the entity list).
        **kwargs: see :class:`CRSDataModule`.
    """

    source = "opendialkg"

    def __init__(self, catalogue: Literal["recommended", "entities"] = "recommended", **kwargs):
        super().__init__(**kwargs)
        self.catalogue = catalogue

    def corpus_options(self) -> dict:
        return {"catalogue": self.catalogue}


class Logs(CRSDataModule):
    """A team's own interaction logs in crslight's format (``docs/logs.md``, ``crslight.data.logs``).

    ``root`` is the folder of logs (conversations ``*.jsonl`` / ``*.parquet``, optionally in ``train/``, ``valid/``,
    ``test/``, and ``catalogue.csv`` / ``.jsonl`` / ``.parquet``) or one conversations file with the catalogue beside
    it. Check it first with ``crslight data validate --dataset logs --root DIR``.
    """

    source = "logs"


class Synthetic(CRSDataModule):
    """The embedded synthetic scenario (``crslight.data.synthetic``); needs no download.

    Args:
        seed: the generator's seed.
        n_dialogues: train dialogues.
        n_items: catalogue size.
        n_eval_dialogues: dialogues in the valid and in the test split (default: a fifth of ``n_dialogues``).
        **kwargs: see :class:`CRSDataModule`.
    """

    source = "synthetic"

    def __init__(self, seed: int = 0, n_dialogues: int = 1000, n_items: int = 400,
                 n_eval_dialogues: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed, self.n_dialogues, self.n_items, self.n_eval_dialogues = seed, n_dialogues, n_items, n_eval_dialogues

    def corpus_options(self) -> dict:
        return {"seed": self.seed, "n_dialogues": self.n_dialogues, "n_items": self.n_items,
                "n_eval_dialogues": self.n_eval_dialogues}
