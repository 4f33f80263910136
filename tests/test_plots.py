import json
import math
import struct

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger

from crslight.cli import main
from crslight.plots import choose_figures, plot_results, plot_run, read_metrics, smooth, split_column

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking that it is one: magic bytes, IHDR first, non-trivial size."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and data.rstrip(b"\x00")[-8:-4] == b"IEND"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"
    return struct.unpack(">II", data[16:24])


def write_run(root, name: str, steps: int, rl: bool):
    """A metrics.csv exactly as CSVLogger writes it: train metrics every step, val every 10 steps (NaN gaps)."""
    logger = CSVLogger(root, name=name)
    rng = np.random.default_rng(0)
    for step in range(steps):
        epoch = step // 20
        if rl:
            metrics = {"train/reward": 0.02 * step + rng.normal(0, 0.1), "train/kl": 0.001 * step,
                       "train/kl_coef": 0.05, "train/acceptance": min(1.0, 0.01 * step), "train/loss": 1 / (1 + step)}
        else:
            metrics = {"train/loss_step": 3 * math.exp(-step / 20) + rng.normal(0, 0.05), "train/lr": 1e-4}
        logger.log_metrics({**metrics, "epoch": epoch}, step=step)
        if step % 10 == 9:
            val = {"val/reward": 0.02 * step} if rl else {"val/loss": 3 * math.exp(-step / 20), "train/loss_epoch": 1.0}
            logger.log_metrics({**val, "epoch": epoch}, step=step)
    logger.save()
    return logger.log_dir


def test_reads_csvlogger_columns_with_nan_gaps(tmp_path):
    run = write_run(tmp_path, "ppo", 30, rl=True)
    data = read_metrics(f"{run}/metrics.csv")
    assert {"step", "epoch", "train/reward", "val/reward"} <= data.keys()
    assert np.isfinite(data["val/reward"]).sum() == 3  # steps 9, 19, 29
    assert np.isnan(data["train/reward"]).sum() == 3  # the val rows leave it empty


def test_rl_run_gets_reward_kl_and_acceptance_curves(tmp_path):
    run = write_run(tmp_path / "logs", "ppo", 60, rl=True)
    written = plot_run(run, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["acceptance.png", "kl.png", "kl_coef.png", "reward.png"]
    assert all(p.parent == tmp_path / "plots" for p in written)
    for p in written:
        width, height = png_size(p)
        assert width > 400 and height > 300


def test_sft_run_gets_loss_curves(tmp_path):
    run = write_run(tmp_path / "logs", "sft", 40, rl=False)
    written = plot_run(run, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png"]  # train step/epoch and val share one figure; lr is left out
    png_size(written[0])


def test_folder_of_runs_mirrors_its_layout(tmp_path):
    write_run(tmp_path / "logs", "ppo", 30, rl=True)
    write_run(tmp_path / "logs", "sft", 30, rl=False)
    written = plot_run(tmp_path / "logs", tmp_path / "plots", metrics=["loss"])
    rel = sorted(str(p.relative_to(tmp_path / "plots")) for p in written)
    assert rel == ["ppo/version_0/loss.png", "sft/version_0/loss.png"]


def test_missing_logs_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no log folder"):
        plot_run(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        plot_run(tmp_path, tmp_path / "out")


def test_split_column_and_choice_of_figures():
    assert split_column("train/reward_step") == ("reward", "train", "step")
    assert split_column("val/recall@10") == ("recall@10", "val", "")
    assert split_column("loss") == ("loss", "", "")
    columns = ["epoch", "step", "train/loss", "train/reward", "val/reward", "train/klx", "train/lr"]
    assert choose_figures(columns) == {"reward": ["train/reward", "val/reward"]}  # "klx" is not KL
    assert choose_figures(["step", "train/loss", "train/lr"]) == {"loss": ["train/loss"]}
    assert choose_figures(["step", "val/acc"]) == {"acc": ["val/acc"]}  # nothing known: everything


def test_smoothing_is_debiased_and_follows_the_data():
    # weight 0.5: ema = [0.5*1, 0.25*1 + 0.5*3] = [0.5, 1.75]; debias / (1 - 0.5), / (1 - 0.25) → [1.0, 2.333...]
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0]), 0.5), [1.0, 7 / 3])
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0]), 0.0), [1.0, 3.0])


RESULTS = [
    {"dataset": "redial", "model": "sft", "recall@10": 0.12, "ndcg@10": 0.07, "satisfaction": 0.41, "seed": 0},
    {"dataset": "redial", "model": "ppo", "recall@10": 0.15, "ndcg@10": 0.09, "satisfaction": 0.55, "seed": 0},
    {"dataset": "redial", "model": "ppo", "recall@10": 0.17, "ndcg@10": 0.10, "satisfaction": 0.57, "seed": 1},
    {"dataset": "synthetic", "model": "popularity", "recall@10": 0.05, "satisfaction": None},
    {"dataset": "synthetic", "model": "ppo", "recall@10": 0.31, "ndcg@10": 0.2, "satisfaction": 0.7},
]


def test_results_bar_chart_has_a_panel_per_dataset(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps(RESULTS[:3]))
    two.write_text(json.dumps(RESULTS))
    out_one = plot_results(one, tmp_path / "figs" / "one.png")
    out_two = plot_results(two, tmp_path / "figs" / "two.png", title="crslight")
    (_, h1), (_, h2) = png_size(out_one), png_size(out_two)
    assert h2 > 1.5 * h1  # two stacked panels


def test_results_without_metrics_or_models_are_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"dataset": "redial", "recall@10": 0.1}]))
    with pytest.raises(ValueError, match="no \"model\""):
        plot_results(bad, tmp_path / "x.png")
    bad.write_text(json.dumps([{"dataset": "redial", "model": "sft", "seed": 3}]))
    with pytest.raises(ValueError, match="no numeric metric"):
        plot_results(bad, tmp_path / "x.png")


def test_cli_main_writes_and_lists_the_files(tmp_path, capsys):
    run = write_run(tmp_path / "logs", "ppo", 30, rl=True)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    assert main(["plot", "--logs", str(run), "--results", str(results), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "out" / "results.png") in printed and str(tmp_path / "out" / "reward.png") in printed
    assert all(png_size(type(tmp_path)(p)) for p in printed)


def test_cli_main_errors_are_exit_2(tmp_path, capsys):
    assert main(["plot", "--out", str(tmp_path)]) == 2
    assert main(["plot", "--logs", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no log folder" in capsys.readouterr().err
