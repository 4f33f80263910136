"""R_phi beside two trivial reward models, on the same held-out pairs and questionnaire answers.

- ``reply_length``: the reply's length in words (longer is better): does R_phi only reward verbosity?
- ``item_popularity``: the mean ``log(1 + mentions)`` of the items the reply names (0 when none; the catalogue's own
  mention counts): does R_phi only reward recommending famous movies?

Every scorer is evaluated with the same code on the same samples: pairwise accuracy (overall and per pair kind; ties
count one half), Spearman with the composite label of real replies, and AUROC against the ``liked`` answers — the
definitions of ``RewardModule``'s ``test/...`` metrics, so R_phi's figures here equal ``crslight test``'s.

    python benchmarks/reward_baselines.py -c configs/redial/reward.yaml --ckpt runs/reward/redial/version_0/checkpoints
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.regression import spearman_corrcoef

from crslight.data.pairs import PAIR_KINDS, PairData, make_pair_data
from crslight.rl.reward_losses import pairwise_accuracy


def _interval(values: torch.Tensor, stat, resamples: int, seed: int = 0) -> list[float]:
    """A 95% percentile-bootstrap interval of ``stat`` over the rows of ``values``."""
    generator = torch.Generator().manual_seed(seed)
    draws = [stat(values[torch.randint(len(values), (len(values),), generator=generator)]) for _ in range(resamples)]
    low, high = torch.tensor(draws).quantile(torch.tensor([0.025, 0.975])).tolist()
    return [round(low, 4), round(high, 4)]


def metrics(scores: list[torch.Tensor], data: PairData, resamples: int = 0) -> dict[str, float]:
    """The reward metrics of per-group sample scores (``scores[g][i]`` scores ``data.groups[g].samples[i]``), with
    95% bootstrap intervals of accuracy and AUC when ``resamples`` > 0."""
    correct: dict[str, list[torch.Tensor]] = {kind: [] for kind in PAIR_KINDS}
    points, labels, liked_scores, liked = [], [], [], []
    for group, s in zip(data.groups, scores, strict=True):
        for c, r, k in group.pairs:
            correct[PAIR_KINDS[k]].append(pairwise_accuracy(s[c:c + 1], s[r:r + 1]))
        for i, sample in enumerate(group.samples):
            if sample.real and not math.isnan(sample.label):
                points.append(s[i])
                labels.append(sample.label)
            liked_scores += [s[i]] * len(sample.liked)
            liked += list(sample.liked)
    every = [x for values in correct.values() for x in values]
    out = {"pairwise_accuracy": float(torch.cat(every).mean()) if every else math.nan}
    if every and resamples:
        out["pairwise_accuracy_ci95"] = _interval(torch.cat(every), lambda x: float(x.mean()), resamples)
    out.update({f"pairwise_accuracy_{k}": float(torch.cat(v).mean()) for k, v in correct.items() if v})
    out["pairs"] = len(every)
    if len(points) > 1:
        out["spearman"] = float(spearman_corrcoef(torch.stack(points).float(), torch.tensor(labels)))
    if 0 < sum(liked) < len(liked):
        answers = torch.stack([torch.stack(liked_scores).float(), torch.tensor(liked).float()], dim=1)
        out["auc_liked"] = float(binary_auroc(answers[:, 0], answers[:, 1].long()))
        if resamples:
            out["auc_liked_ci95"] = _interval(answers, lambda x: float(binary_auroc(x[:, 0], x[:, 1].long())),
                                              resamples)
        out["liked_answers"] = len(liked)
    return out


def reply_length_scores(data: PairData) -> list[torch.Tensor]:
    return [torch.tensor([float(len(s.reply.split())) for s in g.samples]) for g in data.groups]


def popularity_scores(data: PairData, popularity: dict[str, float]) -> list[torch.Tensor]:
    def score(items) -> float:
        known = [math.log1p(popularity[i]) for i in items if i in popularity]
        return sum(known) / len(known) if known else 0.0

    return [torch.tensor([score(s.items) for s in g.samples]) for g in data.groups]


def reward_model_scores(data: PairData, ckpt: str, batch_size: int = 64) -> list[torch.Tensor]:
    from crslight.modules.reward import RewardModule

    model = RewardModule.load(ckpt)
    model.hparams.score_batch_size = batch_size
    flat = [s for g in data.groups for s in g.samples]
    scores = model.score(contexts=[s.context for s in flat], replies=[s.reply for s in flat]).cpu()
    out, start = [], 0
    for g in data.groups:
        out.append(scores[start:start + len(g.samples)])
        start += len(g.samples)
    return out


def load_data(config: str, split: str):
    """The config's DataModule (``task: pairs``) and the split's pairs."""
    from crslight.ablation import _instantiate

    cli = _instantiate(config, ["--model.backbone=tiny"])  # the model is loaded from the checkpoint instead
    dm = cli.datamodule
    return dm, make_pair_data(dm.corpus, split, dm.pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="the reward config R_phi was trained with")
    parser.add_argument("--ckpt", default=None, help="R_phi: a .ckpt or a folder holding one (omit: baselines only)")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (0: none)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    dm, data = load_data(args.config, args.split)
    corpus = dm.corpus(args.split)
    popularity = dict(zip(corpus.catalogue["item_id"], corpus.catalogue["popularity"], strict=True))
    report = {"config": args.config, "split": args.split, "pair_counts": data.counts(), "scorers": {}}
    report["scorers"]["reply_length"] = metrics(reply_length_scores(data), data, args.bootstrap)
    report["scorers"]["item_popularity"] = metrics(popularity_scores(data, popularity), data, args.bootstrap)
    if args.ckpt:
        start = time.time()
        report["scorers"]["R_phi"] = metrics(reward_model_scores(data, args.ckpt), data, args.bootstrap)
        report["scorers"]["R_phi"]["scoring_seconds"] = round(time.time() - start, 1)
        report["ckpt"] = args.ckpt
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    print("\n| scorer | pairwise accuracy | AUC (liked) | Spearman |\n|---|---|---|---|")
    for name, m in report["scorers"].items():
        ci = {k: " [{:.3f}, {:.3f}]".format(*m[f"{k}_ci95"]) if f"{k}_ci95" in m else "" for k in
              ("pairwise_accuracy", "auc_liked")}
        print(f"| {name} | {m['pairwise_accuracy']:.3f}{ci['pairwise_accuracy']} | "
              f"{m.get('auc_liked', math.nan):.3f}{ci['auc_liked']} | {m.get('spearman', math.nan):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
