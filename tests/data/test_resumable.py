"""Training loaders resume mid-epoch: the batches left, in their order, none of the skipped ones read again, and torch's
generator untouched; an uninterrupted epoch is ``RandomSampler``'s; under DDP each rank resumes its own share."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from crslight.data.resumable import ResumableLoader, ShuffleSampler


class Reads(list):
    """A dataset that records which samples were read (in this process)."""

    def __init__(self, n: int):
        super().__init__(range(n))
        self.reads: list[int] = []

    def __getitem__(self, index):
        self.reads.append(index)
        return super().__getitem__(index)


def _loader(data, **options) -> ResumableLoader:
    return ResumableLoader(data, batch_size=3, sampler=ShuffleSampler(data), **options)


def _batches(iterator) -> list[list[int]]:
    return [batch.tolist() for batch in iterator]


def test_an_uninterrupted_epoch_is_random_samplers():
    torch.manual_seed(3)
    expected = _batches(DataLoader(range(10), batch_size=3, shuffle=True))
    rng = torch.get_rng_state()
    torch.manual_seed(3)
    assert _batches(_loader(range(10))) == expected  # the order of a run is what it was before loaders resumed
    assert torch.equal(torch.get_rng_state(), rng)  # and so is every random number drawn after


@pytest.mark.parametrize("workers", [{}, {"num_workers": 2, "persistent_workers": True}], ids=["main", "workers"])
def test_resumes_mid_epoch_without_reading_the_skipped_batches(workers):
    data = Reads(12)
    torch.manual_seed(0)
    straight = _loader(data, **workers)
    epoch = iter(straight)
    trained = [next(epoch).tolist() for _ in range(2)]
    state, rng = straight.state_dict(), torch.get_rng_state()  # what a checkpoint written here holds
    rest = _batches(epoch)
    straight.sampler.set_epoch(1)
    next_epoch = _batches(straight)

    torch.manual_seed(1)  # a new process: a fresh loader, and the generator as the checkpoint restores it
    resumed = _loader(data, **workers)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    data.reads.clear()
    assert _batches(resumed) == rest and len(rest) == 2
    assert torch.equal(torch.get_rng_state(), rng)  # resuming drew no random number
    if not workers:
        assert sorted(data.reads) == sorted(i for batch in rest for i in batch)  # only the batches left were read
    assert state["ranks"][0]["batches"] == 2 and resumed.state_dict()["ranks"][0]["batches"] == 4
    resumed.sampler.set_epoch(1)
    assert _batches(resumed) == next_epoch  # the next epoch is whole, and drawn as it was
    assert sorted(i for batch in trained + rest for i in batch) == list(range(12))


def test_a_checkpoint_after_the_epochs_last_batch_starts_the_next_epoch_whole():
    # limit_train_batches: 2 ends each epoch after 2 of its 4 batches; the checkpoint written after the second batch
    # resumes into the next epoch, where Lightning sets the sampler's epoch to 1
    torch.manual_seed(0)
    straight = _loader(range(12))
    epoch = iter(straight)
    next(epoch), next(epoch)
    state, rng = straight.state_dict(), torch.get_rng_state()
    straight.sampler.set_epoch(1)
    next_epoch = _batches(straight)
    resumed = _loader(range(12))
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    torch.set_rng_state(rng)
    assert _batches(resumed) == next_epoch and len(next_epoch) == 4


RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler
from crslight.data.resumable import ResumableLoader

rank, out = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2)
data = list(range(20))

def loader():  # what Lightning makes of a training loader under DDP: the same loader around a DistributedSampler
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(3)
    return ResumableLoader(data, batch_size=2, sampler=sampler)

straight = iter(loader())
trained = [next(straight).tolist() for _ in range(2)]
first = loader()
epoch = iter(first)
[next(epoch) for _ in range(2)]
state = first.state_dict()  # a collective: Lightning calls it on every rank, rank 0 writes the checkpoint
resumed = loader()
resumed.load_state_dict(state)
json.dump({"state": state, "trained": trained, "rest": [b.tolist() for b in straight],
           "resumed": [b.tolist() for b in resumed]}, open(f"{out}/rank{rank}.json", "w"))
dist.barrier()  # both ranks done before the group goes: a rank leaving first can abort the other's gloo threads
dist.destroy_process_group()
"""


def test_ddp_ranks_resume_their_own_share(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path)], env=env, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=120)
        assert rank.returncode == 0, stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert len(result["state"]["ranks"]) == 2  # the checkpoint holds every rank's position
        assert result["state"]["ranks"][rank] == {"epoch": 3, "batches": 2, "seed": 0}
        assert result["resumed"] == result["rest"] and len(result["rest"]) == 3  # its own share, from where it was
    shares = [sorted(i for batch in r["trained"] + r["rest"] for i in batch) for r in results]
    assert sorted(shares[0] + shares[1]) == list(range(20))  # the ranks' shares split the data, as before
