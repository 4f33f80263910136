"""``crslight pipeline``: the shipped synthetic configs, shrunk to a tiny policy and R_phi, run end to end."""

from pathlib import Path

import pytest
import yaml

from crslight.cli import main
from crslight.pipeline import comparison_table, differences_table, paired_intervals

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_configs(shrunk_configs, tmp_path):
    return shrunk_configs("synthetic", tmp_path / "configs")


def test_pipeline_runs_every_stage_and_prints_the_comparison(tiny_configs, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["pipeline", "--configs", str(tiny_configs), "--out", str(out), "--eval-episodes", "4",
                 "--base-episodes", "4", "--eval-max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    tables = (out / "comparison.md").read_text().strip()
    assert tables in printed
    table, deltas, vs_popularity, kl = tables.split("\n\n")
    header, rule, *rows = table.splitlines()
    assert header == "| metric | base | sft | rlhf | popularity | oracle |"
    cells = {row.split(" | ")[0].strip("| "): row.strip("| ").split(" | ")[1:] for row in rows}
    assert set(cells) >= {"recall@10", "reward", "satisfaction", "acceptance", "coherence"}
    assert cells["recall@10"][3] != "n/a" and cells["recall@10"][4] == "n/a"  # popularity ranks, the oracle does not
    for stage in ("sft", "reward", "ppo", "test_base", "test_sft", "test_rlhf"):
        assert (out / stage / "version_0").is_dir(), stage
    import json

    from crslight.modules.evaluation import load_episode_records

    report = json.loads((out / "comparison.json").read_text())
    assert set(report["results"]) == {"base", "sft", "rlhf", "popularity", "oracle"}
    # every policy, the references included, met the same four users: paired records, one per episode
    folders = {"base": "test_base/version_0", "sft": "test_sft/version_0", "rlhf": "test_rlhf/version_0",
               "popularity": "test_popularity", "oracle": "test_oracle"}
    records = {p: load_episode_records(out / f / "test_episodes.jsonl") for p, f in folders.items()}
    pairs = {p: [(r["episode"], r["dialogue_id"]) for r in rs] for p, rs in records.items()}
    assert report["episodes"] == 4 and all(pair == pairs["sft"] for pair in pairs.values())
    for policy, metrics in report["results"].items():
        intervals = report["intervals"][policy]
        assert set(intervals) == {"acceptance", "satisfaction", "reward"}
        for metric, (mean, lo, hi) in intervals.items():
            assert lo <= mean <= hi and mean == pytest.approx(metrics[metric], abs=1e-5), (policy, metric)
        mean, lo, hi = intervals["acceptance"]
        assert cells["acceptance"][list(folders).index(policy)] == f"{mean:.3f} [{lo:.2f}, {hi:.2f}]"
    assert set(report["differences_vs_sft"]) == {"base", "rlhf", "popularity", "oracle"}
    for policy, differences in report["differences_vs_sft"].items():
        gap = report["results"][policy]["satisfaction"] - report["results"]["sft"]["satisfaction"]
        assert differences["satisfaction"][0] == pytest.approx(gap, abs=1e-5)
    assert deltas.splitlines()[0] == "| Δ vs SFT | base | rlhf | popularity | oracle |"
    # and the trained policies against popularity, paired on the same users
    assert set(report["differences_vs_popularity"]) == {"sft", "rlhf"}
    assert vs_popularity.splitlines()[0] == "| Δ vs POPULARITY | sft | rlhf |"
    for policy, differences in report["differences_vs_popularity"].items():
        gap = report["results"][policy]["acceptance"] - report["results"]["popularity"]["acceptance"]
        assert differences["acceptance"][0] == pytest.approx(gap, abs=1e-5)
    # PPO's KL to the SFT policy, as its training logged it
    import csv

    with (out / "ppo" / "version_0" / "metrics.csv").open() as f:
        logged = [float(row["train/kl"]) for row in csv.DictReader(f) if row.get("train/kl")]
    assert report["ppo_kl"]["kl"] == pytest.approx(logged[-1]) and report["ppo_kl"]["max_kl"] == max(logged)
    assert kl.startswith(f"PPO's KL to the SFT policy per reply (training, last iteration): {logged[-1]:.3f} nats")
    # RLHF starts from the SFT checkpoint and the trained R_phi of this same run
    assert all(Path(p).is_file() for p in report["checkpoints"].values())
    ppo_config = yaml.safe_load((out / "ppo" / "version_0" / "config.yaml").read_text())
    assert ppo_config["model"]["init_args"]["init_from"] == report["checkpoints"]["sft"]
    assert ppo_config["model"]["init_args"]["reward_model"] == report["checkpoints"]["reward"]
    # the rlhf column is the PPO policy's own test: run on the PPO checkpoint, its metrics are test_rlhf's
    for policy, stage in (("sft", "sft"), ("rlhf", "ppo")):
        test_config = yaml.safe_load((out / folders[policy] / "config.yaml").read_text())
        assert test_config["ckpt_path"] == report["checkpoints"][stage], policy
        assert Path(report["checkpoints"][stage]).is_relative_to(out / stage / "version_0"), policy
        written = json.loads((out / folders[policy] / "test_metrics.json").read_text())
        assert report["results"][policy] == {k.removeprefix("test/"): v for k, v in written.items()}, policy
    # it replied otherwise than SFT on the same users (seeded: PPO moved the tiny policy), and its paired differences
    # from SFT are computed from the two tests' episode records
    rlhf, sft = (sorted(records[p], key=lambda r: r["episode"]) for p in ("rlhf", "sft"))
    assert [r["reward"] for r in rlhf] != [r["reward"] for r in sft]
    differences = report["differences_vs_sft"]["rlhf"]
    gaps = [a["satisfaction"] - b["satisfaction"] for a, b in zip(rlhf, sft, strict=True)]
    assert differences["satisfaction"][0] == pytest.approx(sum(gaps) / len(gaps), abs=1e-6)

    def per_reply(rs):
        return sum(r["reward"] * r["turns"] for r in rs) / sum(r["turns"] for r in rs)

    assert differences["reward"][0] == pytest.approx(per_reply(rlhf) - per_reply(sft), abs=1e-6)
    assert report["intervals"]["rlhf"]["reward"][0] == pytest.approx(per_reply(rlhf), abs=1e-6)
    # the base column is the policy before any training: its ranking differs from the SFT one
    assert report["results"]["base"]["item_coverage"] != report["results"]["sft"]["item_coverage"] or \
        report["results"]["base"]["mrr@10"] != report["results"]["sft"]["mrr@10"]


def test_pipeline_names_missing_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reward\.yaml"):
        main(["pipeline", "--configs", str(tmp_path), "--out", str(tmp_path / "runs")])


def test_paired_intervals_pair_records_by_episode_and_weight_reward_by_replies():
    def record(episode, accepted, satisfaction, reward, turns):
        return {"episode": episode, "dialogue_id": f"d{episode}", "accepted": accepted, "satisfaction": satisfaction,
                "reward": reward, "turns": turns}

    sft = [record(1, 0, 2.0, 0.0, 2), record(0, 1, 4.0, 1.0, 1)]  # any order: paired by episode index
    rlhf = [record(0, 1, 5.0, 3.0, 1), record(1, 1, 3.0, 0.0, 3)]
    intervals, differences = paired_intervals({"sft": sft, "rlhf": rlhf}, n_resamples=500)
    assert intervals["sft"]["acceptance"][0] == 0.5 and intervals["rlhf"]["satisfaction"][0] == 4.0
    # reward per reply: sft (1*1 + 0*2) / 3 = 1/3, rlhf (3*1 + 0*3) / 4 = 3/4
    assert intervals["sft"]["reward"][0] == pytest.approx(1 / 3)
    assert differences["rlhf"]["reward"][0] == pytest.approx(3 / 4 - 1 / 3)
    # each episode's satisfaction rose by exactly 1: a zero-width paired interval at +1
    assert differences["rlhf"]["satisfaction"] == pytest.approx((1.0, 1.0, 1.0))
    assert "sft" not in differences
    no_reward = [{k: v for k, v in r.items() if k != "reward"} for r in rlhf]
    assert "reward" not in paired_intervals({"sft": sft, "rlhf": no_reward})[0]["rlhf"]
    other_users = [dict(r, dialogue_id="x") for r in rlhf]
    with pytest.raises(ValueError, match="not paired"):
        paired_intervals({"sft": sft, "rlhf": other_users})


def test_tables_show_intervals_and_signed_differences():
    intervals = {"sft": {"acceptance": (0.4, 0.3412, 0.47)}, "oracle": {"acceptance": (0.9, 0.85, 0.95)}}
    table = comparison_table({"sft": {"acceptance": 0.4, "recall@10": 0.2}, "oracle": {"acceptance": 0.9}},
                             columns=("recall@10", "acceptance"), intervals=intervals)
    assert table.splitlines()[2:] == ["| recall@10 | 0.200 | n/a |",
                                      "| acceptance | 0.400 [0.34, 0.47] | 0.900 [0.85, 0.95] |"]
    deltas = differences_table({"oracle": {"acceptance": (0.5, 0.41, 0.6)}, "base": {"acceptance": (-0.1, -0.2, 0.0)}})
    assert deltas.splitlines() == ["| Δ vs SFT | oracle | base |", "|---|---:|---:|",
                                   "| acceptance | +0.500 [+0.41, +0.60] | -0.100 [-0.20, +0.00] |"]


def test_comparison_table_marks_missing_values():
    table = comparison_table({"base": {"recall@10": 0.1, "coherence": float("nan")}, "sft": {"recall@10": 0.25}},
                             columns=("recall@10", "coherence", "absent"))
    assert table.splitlines() == ["| metric | base | sft |", "|---|---:|---:|", "| recall@10 | 0.100 | 0.250 |",
                                  "| coherence | n/a | n/a |"]
