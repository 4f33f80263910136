"""``crslight refresh``: a warm-started R_phi, a short PPO and the gate, on exported logs, at tiny sizes."""

import json

from crslight.cli import main
from crslight.pipeline import paired_intervals


def test_refresh_versions_warm_starts_and_gates(shrunk_configs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    configs = shrunk_configs("logs", tmp_path / "configs")
    week1, week2 = tmp_path / "logs1", tmp_path / "logs2"
    for folder, n in ((week1, 30), (week2, 40)):  # the second week: the first one's conversations and 10 more
        assert main(["data", "export-logs", "--dataset", "synthetic", "--out", str(folder), "--n-dialogues",
                     str(n)]) == 0
    out, runs = tmp_path / "refresh", tmp_path / "runs"
    first = [f"--data.init_args.root={week1}", f"--trainer.logger.init_args.save_dir={runs}"]
    for stage in ("sft", "reward"):
        main(["fit", "-c", str(configs / f"{stage}.yaml"), *first, f"--trainer.logger.init_args.name={stage}"])
    capsys.readouterr()
    # no current pair yet, and none given: a clear error, no version folder
    assert main(["refresh", "--logs", str(week2), "--configs", str(configs), "--out", str(out)]) == 2
    assert "give --policy and --reward" in capsys.readouterr().err and not out.exists()

    gate = ["--eval-episodes", "6", "--eval-max-new-tokens", "6"]
    assert main(["refresh", "--logs", str(week2), "--configs", str(configs), "--out", str(out), "--policy",
                 str(runs / "sft"), "--reward", str(runs / "reward"), *gate]) == 0
    printed = capsys.readouterr().out
    v1 = json.loads((out / "v001" / "refresh.json").read_text())
    assert (out / "v001" / "refresh.md").read_text().strip() in printed
    # R_phi started from the previous one; PPO from the current policy with the new R_phi
    hparams = json.loads(json.dumps(_hparams(v1["trained"]["reward"])))
    assert hparams["init_from"] == str(runs / "reward")
    assert _hparams(v1["trained"]["policy"])["reward_model"] == v1["trained"]["reward"]
    # the gate: both policies on the same episodes; the decision follows its rule
    records = {name: [json.loads(line) for line in (out / "v001" / f"test_{name}" / "version_0" /
                                                    "test_episodes.jsonl").open()]
               for name in ("current", "candidate")}
    assert [r["dialogue_id"] for r in records["current"]] == [r["dialogue_id"] for r in records["candidate"]]
    assert len(records["current"]) == v1["gate"]["episodes"] == 6
    difference = paired_intervals(records, "current")[1]["candidate"]["acceptance"]
    assert v1["gate"]["difference"] == list(difference)
    assert v1["gate"]["promoted"] == (difference[2] >= 0)
    expected = v1["trained"] if v1["gate"]["promoted"] else v1["previous"]
    assert v1["current"] == {"policy": expected["policy"], "reward": expected["reward"]}

    # the next refresh starts from v001's current pair, writes v002 and leaves v001 as it was
    before = {p: p.read_bytes() for p in (out / "v001").rglob("*") if p.is_file()}
    assert main(["refresh", "--logs", str(week2), "--configs", str(configs), "--out", str(out), *gate]) == 0
    v2 = json.loads((out / "v002" / "refresh.json").read_text())
    assert v2["previous"] == v1["current"]
    assert {p: p.read_bytes() for p in (out / "v001").rglob("*") if p.is_file()} == before


def _hparams(checkpoint: str) -> dict:
    from crslight.guards import load_weights

    return load_weights(checkpoint)["hyper_parameters"]
