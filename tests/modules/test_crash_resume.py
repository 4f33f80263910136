"""A run killed with SIGKILL mid-epoch and resumed from its newest checkpoint ends where a run that never stopped ends:
the same weights, optimizer state, learning-rate schedule, step and epoch counters, data loader position and RNG
states, bit for bit (CPU, one thread). Every run is a process of its own (tests/modules/crash_run.py)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import crslight
from crslight.models.loading import find_checkpoint

SCRIPT = Path(__file__).with_name("crash_run.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    # the crslight this test imported, also where another checkout of it is installed
    path = os.pathsep.join(filter(None, [str(Path(crslight.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def _differences(straight, resumed, path: str = "") -> list[str]:
    """Where two checkpoints differ, as paths (``optimizer_states[0]/state/3/exp_avg``); tensors must be equal."""
    if isinstance(straight, torch.Tensor):
        same = isinstance(resumed, torch.Tensor) and straight.shape == resumed.shape and torch.equal(straight, resumed)
        return [] if same else [path]
    if isinstance(straight, dict):
        if not isinstance(resumed, dict) or straight.keys() != resumed.keys():
            return [f"{path} (keys)"]
        return [d for key in straight for d in _differences(straight[key], resumed[key], f"{path}/{key}")]
    if isinstance(straight, list | tuple):
        if not isinstance(resumed, list | tuple) or len(straight) != len(resumed):
            return [f"{path} (length)"]
        return [d for i, (a, b) in enumerate(zip(straight, resumed, strict=True)) for d in _differences(a, b,
                                                                                                       f"{path}[{i}]")]
    return [] if straight == resumed else [f"{path}: {straight!r} != {resumed!r}"]


def _crash_and_resume(stage: str, folder: Path, *models: str) -> tuple[dict, dict, dict]:
    """The uninterrupted run's final checkpoint, the checkpoint the crashed run resumed from, the resumed run's final
    checkpoint."""
    crash = _run(stage, "crash", str(folder), *models)
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    newest = find_checkpoint(folder / "checkpoints")
    resume = _run(stage, "resume", str(folder), *models)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "dataloader is not resumable" not in resume.stderr  # Lightning's warning about a plain DataLoader
    return tuple(torch.load(path, weights_only=True)
                 for path in (folder / "straight.ckpt", newest, folder / "resumed.ckpt"))


def _position(checkpoint: dict) -> tuple[int, int, int]:
    """(optimizer steps, epoch, batches of the epoch handed out), as the training loader saved them; Lightning's own
    count of the epoch's batches agrees."""
    fit = checkpoint["loops"]["fit_loop"]
    (loader,) = fit["state_dict"]["combined_loader"]
    (state,) = loader["ranks"]
    assert state["batches"] == fit["epoch_loop.batch_progress"]["current"]["ready"]
    return checkpoint["global_step"], state["epoch"], state["batches"]


def _assert_same(straight: dict, resumed: dict) -> None:
    straight = {key: value for key, value in straight.items() if key != "callbacks"}  # it had no ModelCheckpoint
    resumed = {key: value for key, value in resumed.items() if key != "callbacks"}
    assert not _differences(straight, resumed), _differences(straight, resumed)[:10]


def test_sft_killed_mid_epoch_resumes_exactly(tiny_policy, tmp_path):
    straight, newest, resumed = _crash_and_resume("sft", tmp_path, tiny_policy)
    assert _position(newest) == (6, 1, 2)  # 2 of epoch 1's 4 batches trained when the newest checkpoint was written
    assert _position(straight) == _position(resumed) == (9, 2, 1)  # epoch 2's first batch was the last
    _assert_same(straight, resumed)  # weights, Adam moments, LR schedule, counters, loader position, RNG
    assert straight["optimizer_states"][0]["state"] and straight["crslight_rng"]


def test_ppo_killed_mid_epoch_resumes_exactly(tiny_policy, tiny_reward, tmp_path):
    straight, newest, resumed = _crash_and_resume("ppo", tmp_path, tiny_policy, tiny_reward)
    assert _position(newest) == (4, 1, 1)  # 1 of epoch 1's 3 iterations trained
    assert _position(straight) == _position(resumed) == (9, 2, 3)
    _assert_same(straight, resumed)  # also the KL controller, the reward moments and the iteration count
    assert straight["crslight_state"]["iterations"] == 9


def test_reward_model_killed_mid_epoch_resumes_exactly(tiny_policy, tmp_path):
    straight, newest, resumed = _crash_and_resume("reward", tmp_path, tiny_policy)
    assert _position(newest) == (6, 1, 2)  # 2 of epoch 1's 4 batches trained
    assert _position(straight) == _position(resumed) == (9, 2, 1)
    _assert_same(straight, resumed)  # the head's dropout after the resume drew what the uninterrupted run drew
    assert straight["optimizer_states"][0]["state"] and newest["crslight_rng"]
