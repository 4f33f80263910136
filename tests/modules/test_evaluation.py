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
        command, "--seed_everything=0", "--model=SFTModule", f"--model.model={policy}", "--model.eval_episodes=3",
        "--model.eval_max_turns=1", "--model.eval_max_new_tokens=8", "--model.lr=1e-2",
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


def test_ckpt_path_may_name_a_run_folder(tiny_policy, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    run_lightning_cli(cli_args("fit", tiny_policy, tmp_path / "fit", "--trainer.max_steps=2",
                               "--trainer.limit_val_batches=0"))  # trained with eval_episodes=3
    (ckpt,) = (tmp_path / "fit").rglob("*.ckpt")
    cli = run_lightning_cli(cli_args("test", tiny_policy, tmp_path / "test", f"--ckpt_path={tmp_path / 'fit'}",
                                     "--model.eval_episodes=0"))
    assert cli.trainer.ckpt_path == str(ckpt)
    # test-time options come from this command line, not from the checkpoint's hyperparameters
    assert cli.model.hparams.eval_episodes == 0
    assert "test/satisfaction" not in cli.trainer.callback_metrics
    with pytest.raises(FileNotFoundError, match="no .ckpt file under"):
        run_lightning_cli(cli_args("test", tiny_policy, tmp_path / "test", f"--ckpt_path={tmp_path / 'test'}"))
