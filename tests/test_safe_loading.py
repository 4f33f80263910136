"""Every file crslight unpickles loads weights only, whatever the installed torch's default: a planted checkpoint whose
unpickling would run code is refused, the code never runs, and the command line names the file with exit code 2.

``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` makes this torch behave as torch < 2.6 (which ``pyproject.toml`` allows), where
``torch.load`` without ``weights_only`` unpickles anything: only an explicit ``weights_only=True`` protects there."""

import pickle

import pytest
import torch

from crslight.cli import main
from crslight.modules.policy import MODULE_KEY, load_policy_checkpoint
from crslight.modules.reward import RewardModule

PLANTED: list[str] = []


def run_planted(tag: str) -> str:
    """What a planted file runs when it is unpickled (a stand-in for any code)."""
    PLANTED.append(tag)
    return tag


class Payload:
    """Unpickling it calls :func:`run_planted` (by reference: a bound ``PLANTED.append`` would pickle a copy of the
    list, and the test could not see the call)."""

    def __reduce__(self):
        return (run_planted, ("ran",))


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A checkpoint file shaped like crslight's (module key, hyper-parameters, state dict) that carries the payload,
    with torch's weights-only default switched off."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    PLANTED.clear()
    path = tmp_path / "planted.ckpt"
    torch.save({MODULE_KEY: "crslight.modules.sft.SFTModule", "hyper_parameters": {"model": "tiny"},
                "state_dict": {}, "payload": Payload()}, path)
    return path


def test_the_switch_really_makes_torch_unpickle_anything(planted):
    """The premise of this module: with the default off, a plain ``torch.load`` runs the payload."""
    torch.load(planted)
    assert PLANTED == ["ran"]


def test_a_policy_checkpoint_is_loaded_weights_only(planted):
    with pytest.raises(pickle.UnpicklingError, match="planted.ckpt"):
        load_policy_checkpoint(planted)
    assert PLANTED == []


def test_a_reward_checkpoint_is_loaded_weights_only(planted):
    with pytest.raises(pickle.UnpicklingError, match="planted.ckpt"):
        RewardModule.load(planted)
    with pytest.raises(pickle.UnpicklingError, match="planted.ckpt"):  # a run folder: its newest checkpoint
        RewardModule.load(planted.parent)
    assert PLANTED == []


@pytest.mark.parametrize("command", ["test", "fit"])
def test_ckpt_path_is_loaded_weights_only_and_refused_with_a_message(planted, tiny_policy, tmp_path, monkeypatch,
                                                                     capsys, command):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    code = main([command, "--model=SFTModule", f"--model.model={tiny_policy}", "--data=Synthetic",
                 "--data.n_dialogues=10", "--data.n_items=40", f"--data.tokenizer={tiny_policy}",
                 "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={planted}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--ckpt_path {planted}" in err and "loads weights only" in err and "Traceback" not in err
    assert PLANTED == []


def test_export_refuses_a_planted_checkpoint(planted, tmp_path, capsys):
    code = main(["export", "--ckpt", str(planted), "--out", str(tmp_path / "out")])
    assert code == 2
    assert str(planted) in capsys.readouterr().err
    assert PLANTED == [] and not (tmp_path / "out").exists()


def test_the_debug_switch_shows_the_traceback(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_DEBUG", "1")
    with pytest.raises(pickle.UnpicklingError):
        main(["export", "--ckpt", str(planted), "--out", str(tmp_path / "out")])
    assert PLANTED == []


def test_a_planted_signal_cache_file_is_refused_not_run(planted, tmp_path, monkeypatch):
    from crslight.data.corpus import load_corpus
    from crslight.data.pairs import _signal_key, signal_values
    from crslight.signals import CompositeLabel, DwellTimeSignal

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    corpus, label = load_corpus("synthetic", split="valid", n_dialogues=20, n_items=30), CompositeLabel([DwellTimeSignal()])
    path = tmp_path / "cache" / "signals" / f"{_signal_key(corpus, label.signals[0])}.pt"
    path.parent.mkdir(parents=True)
    torch.save(Payload(), path)
    with pytest.raises(pickle.UnpicklingError, match=path.name):
        signal_values(corpus, label)
    assert PLANTED == []
