"""Training loaders that resume mid-epoch: a run killed after batch ``k`` of an epoch and resumed from a checkpoint
written there trains on the same batches, in the same order, as a run that never stopped.

**What Lightning does and does not do.** Lightning (2.x) saves ``state_dict()`` of every training DataLoader that has
one into the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, resuming an unfinished epoch, gives it back
through ``load_state_dict()`` before it asks for the first batch. It skips nothing itself: it counts the epoch's
batches on from ``k`` and expects the loader to continue where it stopped. A plain DataLoader starts the epoch over, in
a new order; and making its iterator draws from torch's global generator, whose state the checkpoint had restored
(:mod:`crslight.modules.policy`), so the random streams after the resume differ as well.

**What is kept.** :class:`ResumableLoader` saves the epoch (as Lightning set it on the sampler), how many batches it
handed out in that epoch and, on one device, the seed of the epoch's order (:class:`ShuffleSampler`: drawn from torch's
generator exactly as ``RandomSampler`` draws it, so an uninterrupted run's order is the one it always was). Resuming the
same epoch, it skips the batches already trained on by skipping their indices -- no sample is read or collated again --
and draws nothing from torch's generator. When Lightning goes on with a new epoch instead (the checkpoint was written
after the epoch's last batch), the loader starts that epoch as any run would.

**DDP.** Lightning swaps the sampler for a ``DistributedSampler`` (its seed and epoch: the shuffle is the one it always
was) and re-creates the loader around it. Every rank's state is gathered into the checkpoint, which only rank 0
writes, and each rank takes back its own, so a rank-dependent order (``use_distributed_sampler: false``) resumes too. A
run resumes exactly on the same number of processes only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler


class ShuffleSampler(RandomSampler):
    """``RandomSampler`` (no replacement) that remembers the seed of its epoch's order, and can be told to repeat it.

    Each epoch draws its seed from torch's global generator, as ``RandomSampler`` does (``seed_everything`` fixes the
    order, the same as before); ``set_epoch`` only records the epoch Lightning is in. Lightning replaces it by a
    ``DistributedSampler`` under DDP, as it replaces a ``RandomSampler``.
    """

    def __init__(self, data_source: Sized):
        super().__init__(data_source)
        self.epoch = 0
        self.seed: int | None = None  # this epoch's, once its first index was drawn
        self._repeat: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def repeat(self, seed: int) -> None:
        """The next pass uses ``seed`` instead of drawing one (a resumed epoch)."""
        self._repeat = seed

    def __iter__(self) -> Iterator[int]:
        seed, self._repeat = self._repeat, None
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed
        yield from torch.randperm(len(self.data_source), generator=torch.Generator().manual_seed(self.seed)).tolist()


class _Skipping:
    """``loader``'s batches of indices without the first ``loader._skip`` (read when an iterator starts: a worker
    iterator starts twice on creation, and a persistent one again every epoch). The length stays the epoch's: Lightning
    counts the epoch's batches on from where it stopped."""

    def __init__(self, loader: ResumableLoader, batches):
        self.loader, self.batches = loader, batches

    def __iter__(self) -> Iterator[list[int]]:
        return islice(iter(self.batches), self.loader._skip, None)

    def __len__(self) -> int:
        return len(self.batches)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch Lightning saves in checkpoints and restores on resume (see the
    module docstring). Takes ``DataLoader``'s arguments; shuffle with ``sampler=ShuffleSampler(data)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._handed_out = 0  # batches of the current epoch given to the training loop
        self._resume: dict[str, Any] | None = None
        self._skip = 0

    @property
    def _index_sampler(self):
        # DataLoader's iterators read their batches of indices here (private to torch, unchanged since 1.x; a change
        # would fail tests/data/test_resumable.py)
        batches = super()._index_sampler
        return _Skipping(self, batches) if self._skip else batches

    def __iter__(self) -> Iterator:
        return self._epoch()

    def _epoch(self) -> Iterator:
        # a generator: this runs at the epoch's first batch, once Lightning has set the sampler's epoch
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["epoch"] == getattr(self.sampler, "epoch", None):
            skip = resume["batches"] if resume["batches"] < len(self) else 0
        if skip and isinstance(self.sampler, ShuffleSampler):
            self.sampler.repeat(resume["seed"])
        self._handed_out = skip
        if skip:  # the interrupted run drew the workers' base seed at this epoch's start, before the saved RNG state
            self._skip = skip
            with torch.random.fork_rng(devices=[]):
                iterator = super().__iter__()
            self._skip = 0
        else:
            iterator = super().__iter__()
        for batch in iterator:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's epoch, batches handed out in it, and (one device) the epoch's seed. A collective under DDP:
        Lightning calls it on every rank when it writes a checkpoint."""
        state = {"epoch": getattr(self.sampler, "epoch", None), "batches": self._handed_out,
                 "seed": getattr(self.sampler, "seed", None)}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return {"ranks": states}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """This rank's part of what :meth:`state_dict` saved; used by the next epoch if it is the same epoch."""
        states = state_dict["ranks"]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._resume = dict(states[rank] if rank < len(states) else states[0])
