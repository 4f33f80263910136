"""benchmarks/ppo_vs_trl.py without TRL: the crslight side runs on the tiny model, and a missing TRL is reported."""

import argparse
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ppo_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crslight_side_runs_fixed_length_steps(bench, tmp_path):
    args = argparse.Namespace(batch_size=2, new_tokens=4, ppo_epochs=1, warmup=1, steps=1, precision="32-true",
                              critic="shared", optimizer_in_backward=True, threads=1, seed=0, prompt_length=64,
                              dialogues=30)
    spec = bench.prepare("tiny", args, tmp_path)
    assert len(spec["prompts"]) == 4 and len({len(ids) for ids, _, _ in spec["prompts"]}) == 1  # no padding
    threads = torch.get_num_threads()
    try:
        result = bench.run_crslight(spec)
    finally:
        torch.set_num_threads(threads)
    assert result["samples_per_s"] > 0 and result["samples_per_cpu_s"] > 0
    assert result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0
    assert len(result["step_s"]) == 1
    # min_new_tokens in the policy folder's generation config: every reply is exactly new_tokens long, as in TRL
    assert result["response_length"] == [4.0, 4.0]


def test_missing_trl_names_the_install_command(bench, tmp_path):
    with pytest.raises(SystemExit) as error:
        bench.check_trl(tmp_path)
    message = str(error.value)
    assert f"pip install --target {tmp_path} trl==1.12.0 --no-deps" in message
    assert sys.executable in message


def test_throughput_skips_the_warmup_steps(bench):
    # steps end at 10, 12, 13 s; one warm-up step: 2 steps of 4 prompts in 13 - 10 = 3 s
    assert bench.throughput([10.0, 12.0, 13.0], warmup=1, batch_size=4) == pytest.approx(8 / 3)
    with pytest.raises(ValueError):
        bench.throughput([10.0], warmup=1, batch_size=4)


def test_select_prompts_takes_one_length_first(bench):
    samples = [SimpleNamespace(ids=[0] * n, name=i) for i, n in enumerate([5, 7, 7, 6, 7, 9])]
    assert [s.name for s in bench.select_prompts(samples, 3)] == [1, 2, 4]  # the three of length 7
    assert [s.name for s in bench.select_prompts(samples, 5)] == [0, 1, 2, 3, 4]  # then lengths 6 and 5 (|7 - n| = 1, 2)


def test_table_has_the_ratios(bench):
    side = {"samples_per_s": 2.0, "peak_rss_mb": 1000.0}
    row = {"label": "tiny", "crslight": {**side, "samples_per_s": 3.0}, "trl": side, "speed_ratio": 1.5,
           "rss_ratio": 1.0, "cpu_speed_ratio": 1.25}
    assert bench.table([row]).splitlines()[-1] == "| tiny | 3.00 | 2.00 | 1.50x | 1000 | 1000 | 1.00x | 1.25x |"


def test_memory_ablation_runs_a_variant(tmp_path):
    import json
    import subprocess

    script = SCRIPT.parent / "ppo_memory.py"
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(script), "--model", "tiny", "--variants", "neither", "--runs", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("| neither |")
    result = json.loads(out.read_text())["neither"]
    assert len(result["peak_rss_mb"]) == 1 and result["peak_rss_mb"][0] > 0
