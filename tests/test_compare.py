import json

import numpy as np
import pytest

from crslight.cli import main
from crslight.modules.evaluation import save_episode_records


def _test_run(folder, accepted, satisfaction, recall=0.2, dialogues=None, version=0):
    """A test's log folder as `crslight test` writes it (version_N with test_metrics.json and test_episodes.jsonl)."""
    run = folder / f"version_{version}"
    run.mkdir(parents=True)
    metrics = {"test/recall@10": recall, "test/acceptance": float(np.mean(accepted)),
               "test/satisfaction": float(np.mean(satisfaction))}
    (run / "test_metrics.json").write_text(json.dumps(metrics))
    dialogues = dialogues or [f"d{i}" for i in range(len(accepted))]
    save_episode_records(run / "test_episodes.jsonl", [
        {"episode": i, "dialogue_id": d, "accepted": a, "satisfaction": s, "turns": 2, "ending": "max_turns",
         "items": [[1]]} for i, (a, s, d) in enumerate(zip(accepted, satisfaction, dialogues, strict=True))])
    return run


def test_compare_reports_a_paired_difference_the_marginals_cannot_show(tmp_path, capsys):
    # 200 users: the second policy is accepted by every user the first is, and by 20 more; the users themselves vary
    # a lot (half accept anything), so the marginal intervals overlap while the paired one is clearly above zero
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(int)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:20]] = 1
    _test_run(tmp_path / "sft_test", base.tolist(), (1 + 3 * base).tolist(), recall=0.2)
    _test_run(tmp_path / "ppo_test", better.tolist(), (1 + 3 * better).tolist(), recall=0.25)
    out = tmp_path / "report.json"
    code = main(["compare", str(tmp_path / "sft_test"), str(tmp_path / "ppo_test"), "--names", "sft", "rlhf",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| recall@10 | 0.200 | 0.250 |" in printed
    report = json.loads(out.read_text())
    diff, lo, hi = report["differences_vs_sft"]["rlhf"]["acceptance"]
    assert diff == pytest.approx(0.1)
    assert 0 < lo < diff < hi
    sft_hi, rlhf_lo = report["intervals"]["sft"]["acceptance"][2], report["intervals"]["rlhf"]["acceptance"][1]
    assert rlhf_lo < sft_hi  # the marginal intervals overlap
    assert report["episodes"] == {"sft": 200, "rlhf": 200}
    assert "+0.100 [+0.0" in printed


def test_compare_takes_the_newest_version_holding_a_test(tmp_path):
    _test_run(tmp_path / "a", [0, 1], [1, 2], recall=0.1, version=0)
    _test_run(tmp_path / "a", [1, 1], [3, 3], recall=0.3, version=10)  # version_10 is newer than version_2
    _test_run(tmp_path / "a", [0, 0], [1, 1], recall=0.2, version=2)
    from crslight.compare import compare

    report = compare([tmp_path / "a"])
    assert report["results"]["a"]["recall@10"] == 0.3
    assert report["runs"]["a"].endswith("version_10")


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such folder"),
    ("no test", "holds no test_metrics.json"),
    ("bad json", "not a JSON object of test metrics"),
    ("other users", "did not meet the same simulated users"),
    ("same names", "two runs share a name"),
    ("bad baseline", "--baseline 'x': not one of the runs"),
    ("bad record", "record 1: expected an episode record"),
])
def test_compare_refuses_what_it_cannot_compare_with_exit_code_2(tmp_path, capsys, case, expected):
    a = _test_run(tmp_path / "a", [0, 1], [1, 2])
    b_folder = tmp_path / "b"
    args = [str(tmp_path / "a"), str(b_folder)]
    if case == "missing":
        pass
    elif case == "no test":
        b_folder.mkdir()
    elif case == "bad json":
        b = _test_run(b_folder, [0, 1], [1, 2])
        (b / "test_metrics.json").write_text("{not json")
    elif case == "other users":
        _test_run(b_folder, [0, 1], [1, 2], dialogues=["x", "y"])
    elif case == "same names":
        _test_run(b_folder, [0, 1], [1, 2])
        args += ["--names", "p", "p"]
    elif case == "bad baseline":
        _test_run(b_folder, [0, 1], [1, 2])
        args += ["--baseline", "x"]
    elif case == "bad record":
        b = _test_run(b_folder, [0, 1], [1, 2])
        (b / "test_episodes.jsonl").write_text('{"episode": 0}\n')
    assert a.is_dir()
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crslight compare: ") and expected in err
    assert "Traceback" not in err
