import json

import pytest

from crslight.cli import main


def test_data_stats_prints_one_json_object(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    assert main(["data", "stats", "--dataset", "synthetic", "--split", "test", "--n-dialogues", "30"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["dialogues"] == 6
    assert {"turns", "rec_samples", "items", "items_mentioned"} <= stats.keys()


def test_data_stats_on_a_folder_without_the_files(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    assert main(["data", "stats", "--dataset", "redial", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing train_data.jsonl, test_data.jsonl, movies_with_mentions.csv" in err


def test_data_stats_reads_its_options_from_a_config_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    config = tmp_path / "stats.yaml"
    config.write_text("dataset: synthetic\nsplit: test\nn_dialogues: 30\n")
    assert main(["data", "stats", "-c", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["dialogues"] == 6  # the file's 30 dialogues, not the default 1000
    assert main(["data", "stats", "-c", str(config), "--n-dialogues", "60"]) == 0  # later flags win
    assert json.loads(capsys.readouterr().out)["dialogues"] == 12


#: every crslight subcommand, with the arguments it requires
COMMANDS = {
    "data stats": ["--dataset", "synthetic"],
    "data validate": ["--dataset", "synthetic"],
    "data export-logs": ["--dataset", "synthetic", "--out", "x"],
    "plugins": [],
    "simulate": [],
    "chat": ["--policy", "x"],
    "export": ["--ckpt", "x", "--out", "y"],
    "plot": ["--out", "x"],
    "compare": ["a", "b"],
    "ablate": ["configs/synthetic/reward.yaml"],
    "pipeline": ["--eval-episodes", "7"],
    "refresh": ["--logs", "x"],
    "fit": ["-c", "configs/synthetic/sft.yaml"],
    "validate": ["-c", "configs/synthetic/sft.yaml"],
    "test": ["-c", "configs/synthetic/sft.yaml"],
    "predict": ["-c", "configs/synthetic/sft.yaml"],
}


def print_config(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print_config"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_prints_its_config_and_reads_it_back_with_c(command, capsys, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    printed = print_config([*command.split(), *COMMANDS[command]], capsys)
    assert printed.strip(), f"crslight {command} --print_config printed nothing"
    config = tmp_path / "config.yaml"
    config.write_text(printed)
    assert print_config([*command.split(), "-c", str(config)], capsys) == printed
    if command == "pipeline":
        assert "eval_episodes: 7" in printed


def test_a_constructor_rejecting_an_option_ends_with_its_message(monkeypatch, capsys):
    from pathlib import Path

    import pytest

    from crslight.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/synthetic/ppo.yaml", "--model.init_args.optimizer_in_backward=true",
              "--trainer.logger=false"])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "\nerror: PPOModule: optimizer_in_backward " in "\n" + message
    assert "gradient_clip_val to null (got 1.0)" in message and "raise ValueError" not in message


def _instantiate(args: list[str]):
    from jsonargparse import set_docstring_parse_options
    from lightning.pytorch import LightningDataModule, LightningModule

    from crslight.lightning_cli import CRSLightningCLI, _import_parts

    set_docstring_parse_options(attribute_docstrings=True)
    _import_parts()
    return CRSLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, auto_configure_optimizers=False, args=[*args, "--trainer.logger=false"])


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_the_data_tokenizer_follows_the_policy_model(stage, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cli = _instantiate(["-c", f"configs/synthetic/{stage}.yaml", "--model.init_args.model=runs/my_policy"])
    assert cli.model.hparams.model == cli.datamodule.tokenizer_name == "runs/my_policy"
    # stating the same name (or the default, which the link replaces) beside it is accepted
    for given in ("runs/my_policy", "smollm2"):
        cli = _instantiate(["-c", f"configs/synthetic/{stage}.yaml", "--model.model=runs/my_policy",
                            f"--data.tokenizer={given}"])
        assert cli.datamodule.tokenizer_name == "runs/my_policy"


def test_a_data_tokenizer_other_than_the_policy_ends_with_exit_code_2(monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        _instantiate(["-c", "configs/synthetic/sft.yaml", "--data.init_args.tokenizer=gpt2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.init_args.tokenizer (gpt2) follows model.init_args.model (smollm2)" in err


def test_a_reward_config_links_no_tokenizer(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cli = _instantiate(["-c", "configs/synthetic/reward.yaml", "--model.backbone=tiny"])
    assert cli.datamodule.task == "pairs" and cli.datamodule.tokenizer_name == "smollm2"  # R_phi reads text


def test_checkpoint_arguments_retired_since_are_dropped_or_moved():
    from jsonargparse import Namespace

    from crslight.lightning_cli import drop_retired_arguments

    reward = Namespace(class_path="RewardModule", init_args=Namespace(lr=1.0), dict_kwargs={"bf16": True})
    drop_retired_arguments(reward)
    assert reward.dict_kwargs == {}
    persona = Namespace(class_path="PersonaSimulator", init_args=Namespace(noise=0.3, leave_step=0.15))
    ppo = Namespace(class_path="PPOModule", init_args=Namespace(simulator=persona),
                    dict_kwargs={"simulator_args": {"leave_step": 0.5}})
    drop_retired_arguments(ppo)
    assert ppo.dict_kwargs == {} and ppo.init_args.simulator.init_args == Namespace(noise=0.3, leave_step=0.5)
    sft = Namespace(class_path="SFTModule", init_args=Namespace(lora=True),
                    dict_kwargs={"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1})
    drop_retired_arguments(sft)  # the flat LoRA arguments become the lora group, with the checkpoint's rank
    assert sft.dict_kwargs == {}
    assert sft.init_args.lora == {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}


def test_bf16_autocast_falls_back_to_float32_on_a_cpu_without_bf16_instructions(monkeypatch, capsys):
    import torch

    import crslight.models.encoder as encoder
    from crslight.lightning_cli import cpu_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CRSLIGHT_CPU_BF16", raising=False)
    monkeypatch.setattr(encoder, "native_bf16", lambda device="cpu": False)
    assert cpu_precision("bf16-mixed", "auto") == "32-true"
    assert "no native bf16" in capsys.readouterr().err
    assert cpu_precision("bf16-mixed", "gpu") == "bf16-mixed"  # not on the CPU: unchanged
    assert cpu_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setenv("CRSLIGHT_CPU_BF16", "keep")
    assert cpu_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.delenv("CRSLIGHT_CPU_BF16")
    monkeypatch.setattr(encoder, "native_bf16", lambda device="cpu": True)
    assert cpu_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_a_data_error_inside_fit_ends_with_exit_code_2_and_no_traceback(tiny_policy, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    code = main(["fit", "-c", "configs/redial/sft.yaml", f"--model.init_args.model={tiny_policy}",
                 f"--data.init_args.root={tmp_path}",
                 "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.precision=32-true"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"crslight: error: {tmp_path}" in err and "missing train_data.jsonl" in err
    assert err.rstrip().splitlines()[-1].startswith("crslight: error: ") and "raise DataError" not in err


@pytest.mark.parametrize(
    ("option", "expected"),
    [("--model.init_args.lr=-1e-4", "error: PPOModule: lr must be a finite number above 0, got -0.0001"),
     ("--data.init_args.batch_size=-8", "error: Synthetic: batch_size must be a finite number above 0, got -8"),
     ("--model.init_args.kl_coef=-0.1", "error: PPOModule: kl_coef must be a finite number, 0 or more, got -0.1")],
    ids=["lr", "batch-size", "kl-coef"],
)
def test_a_bad_number_in_a_config_ends_with_its_name_and_exit_code_2(monkeypatch, capsys, option, expected):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/synthetic/ppo.yaml", option, "--trainer.logger=false"])
    err = capsys.readouterr().err
    # the message is all that is printed of the error (no traceback of the raise; other tests' log noise aside)
    assert exit_info.value.code == 2 and err.rstrip().splitlines()[-1] == expected and "raise ValueError" not in err


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "text", "random-bytes", "truncated"])
def test_a_bad_ckpt_path_ends_with_its_name_and_exit_code_2(monkeypatch, capsys, tmp_path, kind):
    from pathlib import Path

    path = tmp_path / ("run" if kind == "empty-folder" else "model.ckpt")
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("epoch=3\n")
    elif kind == "random-bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        import torch

        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "-c", "configs/synthetic/sft.yaml", f"--ckpt_path={path}", "--trainer.logger=false"])
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    expected = {"missing": "no such file or folder", "empty-folder": "no .ckpt file under",
                "text": "is not a complete PyTorch checkpoint", "random-bytes": "is not a complete PyTorch checkpoint",
                "truncated": "is not a complete PyTorch checkpoint"}[kind]
    assert exit_info.value.code == 2 and last.startswith(f"error: --ckpt_path {path}: ") and expected in last
