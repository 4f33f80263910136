"""What the item choice alone earns from grounded users, per split: the policy's best items at every point where the
dataset's simulated user can start, checked against that user's hidden targets, with no words decoded.

For each dialogue of a split and each of its start points (:meth:`GroundedSimulator.prefix_points`), the policy's item
scores read the context (its last turns' words and the items it mentioned) and rank the catalogue without the items
already mentioned; the user would accept the recommendation when one of the ``k`` best is a target (an item the seeker
liked without having seen it). The rate per split tells whether the scores were fitted on the users they meet: PPO's
rollouts meet the training split's users, so a rate far above the test split's means the rollouts reward
memorised dialogues, not what generalises. Also printed: how often the best item is one the user has seen, and, per
``--temperatures``, how concentrated the distribution that PPO's rollouts sample from is at that ``item_temperature``
(the best item's probability, a target's probability, and the effective number of items, ``exp(entropy)``). A
minute on two CPU cores for ReDial's three splits; the scores must not read the policy's hidden states (SFT's
``item_head_fits: context``, the shipped default).

    python benchmarks/item_acceptance.py --ckpt runs/redial/sft --dataset redial
"""

from __future__ import annotations

import argparse
import time

import torch

from crslight.data.datamodules import OpenDialKG, ReDial
from crslight.models.loading import find_checkpoint
from crslight.models.retrieval import ItemHead, previous_mask
from crslight.schema import context_lines
from crslight.simulator.grounded import GroundedSimulator


def load_item_head(ckpt: str) -> ItemHead:
    """The item scores of a policy checkpoint, without the language model."""
    state = torch.load(find_checkpoint(ckpt), map_location="cpu", weights_only=True)["state_dict"]
    if "item_head.bias" not in state:
        raise SystemExit(f"error: --ckpt {ckpt}: this checkpoint has no item scores")
    head = ItemHead.from_state_dict(state, "item_head.").eval()
    if head.reads_hidden:
        raise SystemExit(f"error: --ckpt {ckpt}: these item scores read the policy's hidden states; this script "
                         "scores the context alone (SFT's item_head_fits: context)")
    return head


def split_rates(head: ItemHead, corpus, ks: tuple[int, ...], temperatures: tuple[float, ...] = ()
                ) -> dict[str, float]:
    """Acceptance at the ``k`` best items and the seen rate of the best one, over the split's start points; per
    temperature ``T``, the mean probability of the best item and of the targets, and ``exp(entropy)``."""
    sim, index = GroundedSimulator(corpus.catalogue), corpus.item_index
    contexts, mentioned, targets, seen = [], [], [], []
    for dialogue in corpus.dialogues:
        dialogue = dict(dialogue)
        for point in sim.prefix_points(dialogue):
            hidden_targets, hidden_seen, _, _ = sim._hidden(dialogue, point)
            turns = dialogue["turns"][:point]
            contexts.append(context_lines(turns))
            mentioned.append(torch.tensor([index[i] for i in dict.fromkeys(i for t in turns for i in t["items"])
                                           if i in index] or [-1]))
            targets.append({index[i] for i in hidden_targets if i in index})
            seen.append({index[i] for i in hidden_seen if i in index})
    previous = torch.nn.utils.rnn.pad_sequence(mentioned, batch_first=True, padding_value=-1)
    text = head.encode_contexts(contexts)
    width = head.proj.in_features
    table = torch.zeros(int(head.title_ids.max()) + 1, width)  # unused: the map W is zero
    best, spread = [], {t: torch.zeros(3) for t in temperatures}
    with torch.no_grad():
        for lo in range(0, len(contexts), 512):
            rows = slice(lo, lo + 512)
            scores = head(torch.zeros(len(previous[rows]), width), table, previous[rows],
                          None if text is None else text[rows]).float()
            scores = scores.masked_fill(previous_mask(previous[rows], head.num_items), float("-inf"))
            best.append(scores.topk(max(ks), dim=-1).indices)
            wanted = torch.zeros_like(scores, dtype=torch.bool)
            for r, found in enumerate(targets[rows]):
                wanted[r, list(found)] = True
            for t in temperatures:  # the rollouts' distribution, as ItemHead.log_probs gives it
                logp = torch.log_softmax(scores / t, dim=-1)
                p = logp.exp()
                entropy = -(p * logp.nan_to_num(0.0, neginf=0.0)).sum(-1)
                spread[t] += torch.stack([p.max(-1).values.sum(), (p * wanted).sum(), entropy.exp().sum()])
    best = torch.cat(best).tolist()
    n = len(best)
    out = {"start points": n}
    for t, (top, target, effective) in spread.items():
        out[f"T={t:g}"] = (float(top) / n, float(target) / n, float(effective) / n)
    for k in ks:
        out[f"accepted@{k}"] = sum(bool(targets[r] & set(best[r][:k])) for r in range(n)) / n
    out["best item seen"] = sum(best[r][0] in seen[r] for r in range(n)) / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a policy checkpoint or run folder")
    parser.add_argument("--dataset", choices=["redial", "opendialkg"], default="redial")
    parser.add_argument("--root", default=None, help="the dataset folder (default ../shared/data/DATASET)")
    parser.add_argument("--splits", nargs="+", default=["train", "valid", "test"])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--temperatures", type=float, nargs="*", default=[0.5, 0.05],
                        help="item temperatures whose sampling distribution is described (test split)")
    args = parser.parse_args()
    head = load_item_head(args.ckpt)
    cls = ReDial if args.dataset == "redial" else OpenDialKG
    dm = cls(root=args.root or f"../shared/data/{args.dataset}", task="prompts", tokenizer="smollm2")
    print(f"| split | start points | {' | '.join(f'accepted@{k}' for k in args.k)} | best item seen |")
    print("|---|---:|" + "---:|" * (len(args.k) + 1))
    spread = {}
    for split in args.splits:
        start = time.perf_counter()
        rates = split_rates(head, dm.corpus(split), tuple(args.k), tuple(args.temperatures) if split == "test" else ())
        cells = " | ".join(f"{rates[f'accepted@{k}']:.3f}" for k in args.k)
        print(f"| {split} | {rates['start points']} | {cells} | {rates['best item seen']:.3f} |  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        spread = {key: value for key, value in rates.items() if key.startswith("T=")} or spread
    if spread:
        print("\n| item temperature (test start points) | best item's probability | targets' probability | "
              "effective items |\n|---|---:|---:|---:|")
        for key, (top, target, effective) in spread.items():
            print(f"| {key} | {top:.3f} | {target:.4f} | {effective:.0f} |")


if __name__ == "__main__":
    main()
