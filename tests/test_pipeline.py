"""``crslight pipeline``: the shipped synthetic configs, shrunk to a tiny policy and R_phi, run end to end."""

from pathlib import Path

import pytest
import yaml

from crslight.cli import main
from crslight.models import tiny_causal_lm
from crslight.pipeline import comparison_table

REPO = Path(__file__).resolve().parents[1]


def _shrunk(stage: str, tiny_policy: str) -> dict:
    """configs/synthetic/STAGE.yaml with a tiny model, a few steps and a small corpus (everything else as shipped)."""
    config = yaml.safe_load((REPO / "configs" / "synthetic" / f"{stage}.yaml").read_text())
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer.update(enable_progress_bar=False, enable_model_summary=False, precision="32-true")
    data.update(n_dialogues=30, batch_size=4)
    if stage == "reward":
        model["backbone"] = "tiny"
        trainer.update(max_steps=3, val_check_interval=3)
    else:
        model["model"] = tiny_policy
        data.update(tokenizer=tiny_policy, max_length=96)
        if stage == "sft":
            trainer.update(max_steps=3, val_check_interval=3, limit_val_batches=1)
        else:
            model.update(max_new_tokens=6, minibatch_size=4, micro_batch_size=4)
            trainer.update(limit_train_batches=2, limit_val_batches=1)
    return config


@pytest.fixture
def tiny_configs(tiny_tokenizer, tmp_path):
    policy = tmp_path / "tiny_policy"
    tiny_causal_lm(tiny_tokenizer, seed=0).save_pretrained(policy)
    tiny_tokenizer.save_pretrained(policy)
    folder = tmp_path / "configs"
    folder.mkdir()
    for stage in ("sft", "reward", "ppo"):
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump(_shrunk(stage, str(policy))))
    return folder


def test_pipeline_runs_every_stage_and_prints_the_comparison(tiny_configs, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["pipeline", "--configs", str(tiny_configs), "--out", str(out), "--eval-episodes", "2",
                 "--eval-max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    table = (out / "comparison.md").read_text().strip()
    assert table in printed
    header, rule, *rows = table.splitlines()
    assert header == "| metric | base | sft | rlhf |"
    assert {row.split(" | ")[0].strip("| ") for row in rows} >= {"recall@10", "reward", "satisfaction", "coherence"}
    for stage in ("sft", "reward", "ppo", "test_base", "test_sft", "test_rlhf"):
        assert (out / stage / "version_0").is_dir(), stage
    # RLHF starts from the SFT checkpoint and the trained R_phi of this same run
    import json

    report = json.loads((out / "comparison.json").read_text())
    assert set(report["results"]) == {"base", "sft", "rlhf"}
    assert all(Path(p).is_file() for p in report["checkpoints"].values())
    ppo_config = yaml.safe_load((out / "ppo" / "version_0" / "config.yaml").read_text())
    assert ppo_config["model"]["init_args"]["init_from"] == report["checkpoints"]["sft"]
    assert ppo_config["model"]["init_args"]["reward_model"] == report["checkpoints"]["reward"]
    # the base column is the policy before any training: its ranking differs from the SFT one
    assert report["results"]["base"]["item_coverage"] != report["results"]["sft"]["item_coverage"] or \
        report["results"]["base"]["mrr@10"] != report["results"]["sft"]["mrr@10"]


def test_pipeline_names_missing_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reward\.yaml"):
        main(["pipeline", "--configs", str(tmp_path), "--out", str(tmp_path / "runs")])


def test_comparison_table_marks_missing_values():
    table = comparison_table({"base": {"recall@10": 0.1, "coherence": float("nan")}, "sft": {"recall@10": 0.25}},
                             columns=("recall@10", "coherence", "absent"))
    assert table.splitlines() == ["| metric | base | sft |", "|---|---:|---:|", "| recall@10 | 0.100 | 0.250 |",
                                  "| coherence | n/a | n/a |"]
