"""Every checkpoint the shipped configs write loads wherever it is used: each of ``configs/{synthetic,redial,opendialkg}/
{sft,reward,ppo}.yaml`` is fitted at tiny size through ``crslight fit`` and its checkpoints go back through the
commands that read them.

The tiny version of a config is the shipped YAML with sizes changed and nothing else (:func:`tiny_config`): the policy
is the tiny random Llama that writes the recommendation slot (``tiny_recommender``, so chat replies recommend through
the exported item scores), R_phi keeps its shipped backbone (MiniLM, siamese, frozen), two optimizer steps (one PPO
iteration), replies of a few tokens, two test episodes, and the crash-recovery checkpoint written every step (10 or 50
as shipped), so that each run writes every kind of file the shipped one does: ``sft-*``, ``last`` and ``resume-*``;
``reward-*`` (weights only) and ``resume-*``; ``ppo-*``, ``last`` and ``resume-*``. ReDial and OpenDialKG are read from copies of the
real files cut to their first dialogues (:func:`redial_subset`, :func:`opendialkg_subset`): ``max_samples`` does not
reach R_phi's pairs, whose signals over a whole corpus take minutes on a cold cache.

What each checkpoint goes through:

- **SFT and PPO** (policies): ``crslight test -c CONFIG --ckpt_path RUN_FOLDER`` (exit 0; ``test_metrics.json`` with
  the ranking, the simulator's metrics and the judging R_phi's ``test/reward``); ``crslight export --ckpt FILE`` of
  every ``.ckpt`` the run wrote (a transformers folder whose item scores are the checkpoint's, over the dataset's
  catalogue); ``crslight chat --policy EXPORTED`` (the run's newest checkpoint) with two lines on stdin: two replies,
  items recommended through the exported scores and linked to the catalogue.
- **R_phi**: it scores replies and writes none, so exporting it or chatting with it makes no sense: ``crslight export``
  of it ends with exit code 2 and a message naming it an R_phi checkpoint (it ended in a ``ValueError`` traceback
  before). Its round trip is ``crslight test -c CONFIG --ckpt_path RUN_FOLDER`` (exit 0, ``test/pairwise_accuracy``),
  ``RewardModule.load`` of the run folder scoring a reply (with the catalogue facts it was fitted with, where the
  config reads items), PPO's ``reward_model`` (every PPO fit here loads it) and the judging R_phi of ``crslight test``
  (SFT's ``evaluation.reward_model``, PPO's ``reward_model``: ``test/reward`` above); its crash-recovery checkpoint, written
  at the same step, loads and scores alike.
- **PPO with and without signals in the reward**: as shipped (``reward_weight: 0``, the AcceptanceSignal alone, R_phi
  judging) on every dataset; R_phi plus the signal (``reward_weight: 1``) and R_phi alone (``signals: null``) on the
  synthetic scenario. The reward changes only PPO's reward arguments in the checkpoint (``reward_weight``,
  ``signal_weights``; the signal objects are not saved), the same on every dataset, and the synthetic R_phi is the one
  that reads the recommended items' facts, so that is where R_phi in the reward does most; running the two variants on
  ReDial and OpenDialKG as well took the module from about 2.5 to 3.5 minutes.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from crslight.chat import PROMPT
from crslight.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("synthetic", "redial", "opendialkg")
#: PPO's reward: as shipped (the signal alone, R_phi judging), R_phi and the signal, R_phi alone
REWARDS = {"shipped": {}, "rphi+signals": {"reward_weight": 1.0},
           "rphi-only": {"reward_weight": 1.0, "signals": None, "signal_weights": None}}
#: the rewards PPO is fitted with on each dataset (the module docstring says why the variants run on one)
PPO_REWARDS = {"synthetic": tuple(REWARDS), "redial": ("shipped",), "opendialkg": ("shipped",)}


# -- the data: the real files cut to their first dialogues -------------------------------------------------------------
def redial_subset(root: Path, out: Path, train: int = 120, test: int = 30) -> Path:
    """ReDial's first ``train`` and ``test`` dialogues and the catalogue rows they mention, in ReDial's own files."""
    out.mkdir(parents=True, exist_ok=True)
    mentioned: set[str] = set()
    for name, n in (("train_data.jsonl", train), ("test_data.jsonl", test)):
        lines = (root / name).read_text().splitlines()[:n]
        for line in lines:
            mentioned |= set(json.loads(line)["movieMentions"] or {}) | set(re.findall(r"@(\d+)", line))
        (out / name).write_text("\n".join(lines) + "\n")
    rows = (root / "movies_with_mentions.csv").read_text().splitlines()
    (out / "movies_with_mentions.csv").write_text(
        "\n".join([rows[0], *(r for r in rows[1:] if r.split(",", 1)[0] in mentioned)]) + "\n")
    return out


def opendialkg_subset(root: Path, out: Path, rows: int = 200) -> Path:
    """OpenDialKG's first ``rows`` dialogues (every split: the split is a hash of each dialogue) and its entity files."""
    out.mkdir(parents=True, exist_ok=True)
    csv.field_size_limit(sys.maxsize)
    with (root / "opendialkg.csv").open(newline="") as f:
        kept = [row for _, row in zip(range(rows + 1), csv.reader(f), strict=False)]  # the header and `rows` rows
    with (out / "opendialkg.csv").open("w", newline="") as f:
        csv.writer(f).writerows(kept)
    for name in ("opendialkg_entities.txt", "opendialkg_relations.txt", "opendialkg_triples.txt"):
        (out / name).symlink_to(root / name)
    return out


# -- the tiny configs ----------------------------------------------------------------------------------------------------
def tiny_config(dataset: str, stage: str, policy: str, root: Path | None, runs: Path, name: str,
                init_from: Path | None = None, reward_model: Path | None = None, reward: dict | None = None) -> dict:
    """configs/DATASET/STAGE.yaml with a tiny policy, a few steps, short replies and few dialogues (everything else as
    shipped), logging to ``runs/STAGE/NAME``; PPO with ``reward``'s changes to its reward."""
    config = yaml.safe_load((REPO / "configs" / dataset / f"{stage}.yaml").read_text())
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer.update(enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2)
    trainer["logger"]["init_args"].update(save_dir=str(runs / stage), name=name)
    for callback in trainer["callbacks"]:  # the crash-recovery checkpoint every step, so that the run writes one
        if "every_n_train_steps" in callback["init_args"]:
            callback["init_args"]["every_n_train_steps"] = 1
    if dataset == "synthetic":
        data.update(n_dialogues=30, n_eval_dialogues=10)
    else:
        data["root"] = str(root)
    if stage == "reward":
        trainer.update(max_steps=2, val_check_interval=2, limit_val_batches=2)
        data["batch_size"] = 4
        return config
    model["model"] = policy
    model.update(evaluation={"episodes": 2, "max_new_tokens": 6})
    data.update(max_length=128, batch_size=2, max_samples=8)  # the tokenizer follows the model
    if stage == "sft":
        trainer.update(max_steps=2, val_check_interval=2, limit_val_batches=1)
        model.update(item_head_epochs=2, item_head_dialogues=8)
        model["evaluation"]["reward_model"] = str(reward_model)
        if "item_text_epochs" in model:
            model["item_text_epochs"] = 2
    else:
        trainer["limit_train_batches"] = 1
        if trainer.get("limit_val_batches"):
            trainer["limit_val_batches"] = 1
        model.update(init_from=str(init_from), reward_model=str(reward_model), max_new_tokens=6, minibatch_size=4,
                     micro_batch_size=4, **(reward or {}))
    return config


def fit(config: dict, folder: Path) -> tuple[Path, Path]:
    """``crslight fit -c CONFIG`` (the config written to ``folder``): the config's path and the run folder."""
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    logger = config["trainer"]["logger"]["init_args"]
    run = Path(logger["save_dir"]) / logger["name"] / "version_0"
    assert list(run.rglob("*.ckpt")), f"no checkpoint under {run}"
    return path, run


def crslight_test(config: Path, run: Path) -> dict:
    """``crslight test -c CONFIG --ckpt_path RUN_FOLDER``: the metrics it wrote."""
    logger = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]
    assert main(["test", "-c", str(config), f"--ckpt_path={run}",
                 f"--trainer.logger.init_args.name={logger['name']}-test"]) == 0
    return json.loads((Path(logger["save_dir"]) / f"{logger['name']}-test" / "version_0" / "test_metrics.json")
                      .read_text())


# -- the runs, each fitted once for the module ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """This module's folder, with a crslight cache of its own (the cut corpora and their signals stay out of the
    user's)."""
    folder = tmp_path_factory.mktemp("roundtrip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CRSLIGHT_CACHE", str(folder / "cache"))
        yield folder


@pytest.fixture(scope="module")
def roots(request, workspace):
    """Each dataset's folder: None for the synthetic scenario, cut copies of the real files for the others."""
    def cut(dataset: str) -> Path:
        subset = redial_subset if dataset == "redial" else opendialkg_subset
        return subset(request.getfixturevalue(f"{dataset}_root"), workspace / "data" / dataset)

    return {dataset: None if dataset == "synthetic" else cut(dataset) for dataset in DATASETS}


@pytest.fixture(scope="module")
def runs(roots, workspace, tiny_recommender):
    """Every shipped config fitted at tiny size, PPO with each reward: ``{(dataset, stage[, reward]): (config, run)}``."""
    fitted = {}
    for dataset in DATASETS:
        tiny = {"dataset": dataset, "policy": tiny_recommender, "root": roots[dataset], "runs": workspace / "runs"}
        folder = workspace / "configs" / dataset
        _, reward_run = fitted[dataset, "reward"] = fit(tiny_config(stage="reward", name=dataset, **tiny),
                                                        folder / "reward")
        _, sft_run = fitted[dataset, "sft"] = fit(tiny_config(stage="sft", name=dataset, reward_model=reward_run,
                                                              **tiny), folder / "sft")
        for kind in PPO_REWARDS[dataset]:
            config = tiny_config(stage="ppo", name=f"{dataset}-{kind}", init_from=sft_run, reward_model=reward_run,
                                 reward=REWARDS[kind], **tiny)
            fitted[dataset, "ppo", kind] = fit(config, folder / f"ppo-{kind}")
    return fitted


POLICY_RUNS = [(dataset, "sft") for dataset in DATASETS] + [(d, "ppo", kind) for d in DATASETS for kind in PPO_REWARDS[d]]


# -- the round trips -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", DATASETS)
def test_a_reward_model_checkpoint_tests_loads_and_is_no_policy_to_export(runs, dataset, capsys):
    from crslight.modules.reward import RewardModule

    config, run = runs[dataset, "reward"]
    (ckpt,) = run.rglob("reward-*.ckpt")
    (resume,) = run.rglob("resume-*.ckpt")
    assert "optimizer_states" not in torch.load(ckpt, map_location="cpu", weights_only=True)  # weights only, as shipped
    assert torch.load(resume, map_location="cpu", weights_only=True)["optimizer_states"]  # crash recovery: everything
    assert 0.0 <= crslight_test(config, run)["test/pairwise_accuracy"] <= 1.0
    scorer = RewardModule.load(run)
    reads_items = yaml.safe_load(config.read_text())["model"]["init_args"].get("read_items", False)
    assert bool(scorer.item_facts) == reads_items  # the catalogue facts it read at fit came back with it
    items = [[next(iter(scorer.item_facts))]] if reads_items else [[]]
    scores = scorer.score(contexts=["I want a funny movie"], replies=["Try this one."], items=items)
    assert scores.shape == (1,) and torch.isfinite(scores).all()
    again = RewardModule.load(resume).score(contexts=["I want a funny movie"], replies=["Try this one."], items=items)
    assert torch.equal(again, scores)  # the same step's weights (and catalogue facts)
    capsys.readouterr()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(run / "exported")]) == 2
    assert "is an R_phi (RewardModule) checkpoint" in capsys.readouterr().err and not (run / "exported").exists()


@pytest.mark.parametrize("key", POLICY_RUNS, ids="-".join)
def test_a_policy_checkpoint_tests_exports_and_chats(runs, roots, key, capsys, monkeypatch):
    from crslight.chat import load_catalogue
    from crslight.models.retrieval import load_item_scores

    config, run = runs[key]
    dataset, root = key[0], roots[key[0]]
    metrics = crslight_test(config, run)
    for name in ("test/recall@10", "test/satisfaction", "test/reward"):  # ranking, simulator, the judging R_phi
        assert metrics.get(name) is not None, name
    catalogue = load_catalogue(dataset, None if root is None else str(root))
    checkpoints = sorted(run.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert {p.stem.split("-")[0] for p in checkpoints} == {key[1], "last", "resume"}
    for ckpt in checkpoints:
        out = run / "exported" / ckpt.stem
        assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        head, item_ids, names = load_item_scores(out)
        assert item_ids == catalogue["item_id"] and names == catalogue["name"]
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        saved = {k.removeprefix("item_head."): v for k, v in state.items() if k.startswith("item_head.")}
        exported = head.state_dict()
        assert saved and all(torch.equal(exported[k], v) for k, v in saved.items())  # the scores the run fitted
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi! Something to watch tonight?\nAnd another one?\n"))
    where = [] if root is None else ["--root", str(root)]
    assert main(["chat", "--policy", str(out), "--dataset", dataset, *where, "--max-new-tokens", "8",
                 "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(PROMPT) == 3 and printed.count("recommender> ") == 2  # two lines answered, then end of input
    assert "  → linked: " in printed  # an item drawn from the exported scores, its title linked to the catalogue
