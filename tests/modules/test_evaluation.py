"""``crslight test`` on a policy: ranking from its item head and simulator episodes, written to test_metrics.json."""

import json
import math

import pytest
import torch

from crslight.lightning_cli import run_lightning_cli
from crslight.models import tiny_causal_lm
from crslight.modules.sft import SFTModule

EXPECTED = {"recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10", "recall@10_new", "item_coverage",
            "satisfaction", "acceptance", "coherence", "distinct-2"}


def cli_args(command, policy, root, *extra):
    return [
        command, "--seed_everything=0", "--model=SFTModule", f"--model.model={policy}", "--model.init_args.evaluation.episodes=3",
        "--model.init_args.evaluation.max_turns=1", "--model.init_args.evaluation.max_new_tokens=8", "--model.lr=1e-2",
        "--data=Synthetic", "--data.n_dialogues=10", "--data.n_items=40", f"--data.tokenizer={policy}",
        "--data.batch_size=2", "--data.max_length=512", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}", *extra,
    ]


def test_test_writes_every_metric(tiny_policy, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    run_lightning_cli(cli_args("test", tiny_policy, tmp_path))
    files = list(tmp_path.rglob("test_metrics.json"))
    assert len(files) == 1
    metrics = json.loads(files[0].read_text())
    assert EXPECTED <= {k.removeprefix("test/") for k in metrics}
    assert all(v is None or math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["test/recall@1"] <= metrics["test/recall@10"] <= metrics["test/recall@50"] <= 1
    assert 1 <= metrics["test/satisfaction"] <= 5


def test_test_writes_one_record_per_episode_whose_means_are_the_metrics(tiny_policy, tmp_path, monkeypatch):
    from crslight.modules.evaluation import load_episode_records

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    run_lightning_cli(cli_args("test", tiny_policy, tmp_path, "--model.init_args.evaluation.episodes=5",
                                      "--model.init_args.evaluation.max_turns=2"))
    (metrics_file,) = tmp_path.rglob("test_metrics.json")
    metrics = json.loads(metrics_file.read_text())
    records = load_episode_records(metrics_file.parent / "test_episodes.jsonl")
    assert [r["episode"] for r in records] == [0, 1, 2, 3, 4]  # one row per episode, by index
    assert {"episode", "dialogue_id", "accepted", "satisfaction", "turns", "items"} <= set(records[0])
    assert "reward" not in records[0]  # no R_phi configured
    assert sum(r["accepted"] for r in records) / 5 == pytest.approx(metrics["test/acceptance"], abs=1e-6)
    assert sum(r["satisfaction"] for r in records) / 5 == pytest.approx(metrics["test/satisfaction"], abs=1e-6)
    assert sum(r["turns"] for r in records) / 5 == pytest.approx(metrics["test/turns"], abs=1e-6)
    assert all(len(r["items"]) == r["turns"] and r["accepted"] in (0, 1) for r in records)


def test_sft_trains_the_ranking_head_and_a_checkpoint_keeps_it(tiny_policy, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    cli = run_lightning_cli(cli_args("fit", tiny_policy, tmp_path, "--trainer.max_steps=3",
                                     "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3",
                                     "--model.ranking_loss_weight=0.5"))
    head = cli.model.item_head
    assert head is not None and head.bias.abs().sum() > 0  # trained from zero
    logged = cli.trainer.callback_metrics  # the total is the LM loss plus the weighted catalogue loss
    assert logged["train/loss"].item() == pytest.approx(
        logged["train/lm_loss"].item() + 0.5 * logged["train/rank_loss"].item(), rel=1e-4)
    assert logged["val/ppl"].item() == pytest.approx(math.exp(logged["val/loss"].item()), rel=1e-4)
    assert "val/rank_loss" in logged
    assert not torch.equal(head.proj.weight, torch.eye(head.proj.weight.shape[0]))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    again = SFTModule.load_from_checkpoint(ckpt)
    assert torch.equal(again.item_head.bias, head.bias) and torch.equal(again.item_head.title_ids, head.title_ids)


def test_reward_is_the_mean_r_phi_score_of_the_episode_replies(tiny_tokenizer, tmp_path):
    import lightning

    from crslight.data import load_corpus
    from crslight.modules.evaluation import ConversationEvaluator, run_episodes
    from crslight.modules.reward import RewardModule
    from crslight.simulator.policies import LMPolicy

    reward = RewardModule(backbone="tiny")
    torch.nn.init.normal_(reward.head.proj.weight)  # scores that differ between replies
    path = tmp_path / "reward.ckpt"
    torch.save({"state_dict": reward.state_dict(), "hyper_parameters": dict(reward.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    corpus = load_corpus("synthetic", None, "test", n_dialogues=10, n_items=40)
    policy = LMPolicy(tiny_causal_lm(tiny_tokenizer, seed=0).eval(), tiny_tokenizer, max_new_tokens=6, seed=0)
    episodes = run_episodes(policy, corpus, episodes=3, max_turns=2, seed=0)
    transitions = [t for e in episodes for t in e.transitions]
    evaluator = ConversationEvaluator(coherence_model="", reward_model=str(path))
    evaluator.update(episodes)
    expected = RewardModule.load(path).score(contexts=[t.context for t in transitions],
                                             replies=[t.reply for t in transitions]).mean()
    assert evaluator.compute()["reward"] == pytest.approx(float(expected), abs=1e-6)
    # each episode's record holds the mean score of its own replies; weighted by replies they give back the mean
    records = evaluator.records
    assert [r["episode"] for r in records] == [0, 1, 2] and sum(r["turns"] for r in records) == len(transitions)
    first = episodes[0].steps
    assert records[0]["reward"] == pytest.approx(float(expected_scores(path, transitions)[:first].mean()), abs=1e-6)
    per_reply = sum(r["reward"] * r["turns"] for r in records) / len(transitions)
    assert per_reply == pytest.approx(float(expected), abs=1e-6)


def expected_scores(path, transitions):
    from crslight.modules.reward import RewardModule

    return RewardModule.load(path).score(contexts=[t.context for t in transitions],
                                         replies=[t.reply for t in transitions])


GATHER_SCRIPT = """
import json, os, sys
import torch.distributed as dist
import torch.multiprocessing as mp
from crslight.modules.evaluation import gather_records

def work(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mine = [{"episode": i, "rank": rank} for i in range(rank, 5, 2)]  # run_episodes' split: i % world_size
    gathered = gather_records(mine)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(gathered, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def test_records_are_gathered_from_every_rank_by_episode_index(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(port), str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        gathered = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["episode"] for r in gathered] == [0, 1, 2, 3, 4]
        assert [r["rank"] for r in gathered] == [0, 1, 0, 1, 0]


def test_ckpt_path_may_name_a_run_folder(tiny_policy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    run_lightning_cli(cli_args("fit", tiny_policy, tmp_path / "fit", "--trainer.max_steps=2",
                               "--trainer.limit_val_batches=0"))  # trained with evaluation.episodes=3
    (ckpt,) = (tmp_path / "fit").rglob("*.ckpt")
    cli = run_lightning_cli(cli_args("test", tiny_policy, tmp_path / "test", f"--ckpt_path={tmp_path / 'fit'}",
                                     "--model.init_args.evaluation.episodes=0"))
    assert cli.trainer.ckpt_path == str(ckpt)
    # test-time options come from this command line, not from the checkpoint's hyperparameters
    assert cli.model.evaluation.episodes == 0 and "evaluation" not in cli.model.hparams
    assert "test/satisfaction" not in cli.trainer.callback_metrics
    with pytest.raises(SystemExit) as exit_info:  # a folder with no checkpoint: a message and exit code 2
        run_lightning_cli(cli_args("test", tiny_policy, tmp_path / "test", f"--ckpt_path={tmp_path / 'test'}"))
    assert exit_info.value.code == 2
    assert "no .ckpt file under" in capsys.readouterr().err
