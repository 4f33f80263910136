"""How much the words can change what a grounded user accepts: a policy's test episodes as decoded, and again with
every reply forced to recommend.

The second variant appends the slot token (``<|item|>``) to every prompt, so each reply starts with a recommendation
(the item best-first from the policy's scores, then the words the policy samples after it), exactly as ``crslight
test`` decodes otherwise (temperature 0.8, top-k 50, ``greedy_items``). Both variants run the same episodes with the
same seeds (paired), so the printed difference and its 95% bootstrap interval say how much a policy that only learned
*when* to recommend could gain over the checkpoint.

    python benchmarks/forced_recommendation.py --ckpt runs/redial/sft --dataset redial --episodes 500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from crslight.data.datamodules import OpenDialKG, ReDial
from crslight.models.engine import Engine, EnginePolicy
from crslight.models.loading import find_checkpoint
from crslight.models.tokenize import ITEM_TOKEN
from crslight.modules.evaluation import run_episodes
from crslight.modules.policy import load_policy_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a policy checkpoint or run folder")
    parser.add_argument("--dataset", choices=["redial", "opendialkg"], default="redial")
    parser.add_argument("--root", default=None, help="the dataset folder (default ../shared/data/DATASET)")
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--max-turns", type=int, default=2)
    args = parser.parse_args()
    module = load_policy_checkpoint(find_checkpoint(args.ckpt))
    module.policy.eval()
    cls = ReDial if args.dataset == "redial" else OpenDialKG
    dm = cls(root=args.root or f"../shared/data/{args.dataset}", task="prompts", tokenizer="smollm2")
    dm.setup("test")
    corpus = dm.corpus("test")
    slot = dm.tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
    accepted = {}
    for variant, encode in (("as decoded", dm.encode_prompt), ("forced to recommend",
                                                               lambda context: dm.encode_prompt(context) + [slot])):
        start = time.perf_counter()
        engine = Engine(module.policy, dm.tokenizer, module.item_head, corpus.catalogue["name"], max_new_tokens=40,
                        temperature=0.8, top_k=50, greedy_items=True)
        policy = EnginePolicy(engine, encode, corpus.catalogue["item_id"], seed=0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            episodes = run_episodes(policy, corpus, args.episodes, args.max_turns, 0, root=dm.root)
        accepted[variant] = np.array([e.accepted for e in episodes], dtype=float)
        items = np.mean([len(t.items) for e in episodes for t in e.transitions])
        print(f"{variant}: acceptance {accepted[variant].mean():.3f}, items per reply {items:.2f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    diff = accepted["forced to recommend"] - accepted["as decoded"]
    rng = np.random.default_rng(0)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
    low, high = np.percentile(means, [2.5, 97.5])
    print(f"forced − as decoded: {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}] over {len(diff)} paired episodes")


if __name__ == "__main__":
    main()
