"""crslight's PPO against TRL 1.12.0's ``trl.experimental.ppo`` on one machine: samples/s and peak RSS.

Both sides get the same policy weights, the same prompts (token ids, all of one length: no padding on either side),
the same batch, a fixed reply length (``--new-tokens`` on every reply: TRL with ``stop_token=None``, crslight with
``min_new_tokens`` in the policy folder's ``generation_config.json``, which its sampler's config inherits), the same
PPO epochs, one minibatch of the whole batch, no micro-batching, full fine-tuning, AdamW at 1e-5 with a constant
schedule, no gradient clipping, fixed KL (k1, 0.05), vf_coef 0.1, clip 0.2 / 0.2, gamma 1, lambda 0.95, temperature 1,
and a reward model of the same architecture and size (the policy's backbone plus a scalar head). crslight runs its real
path: ``PPOModule`` in a Lightning ``Trainer`` on a ``Synthetic`` prompts DataModule restricted to those prompts;
TRL runs ``PPOTrainer.train``. What stays different is listed in docs/benchmarks.md (the critic above all: crslight's
value head shares the policy's backbone by default, TRL needs a separate value model; ``--critic separate`` gives
crslight one too).

Each side runs in its own subprocess, so each gets a clean peak RSS (``ru_maxrss`` of that process, model loading
included); the TRL one with ``PYTHONPATH`` at ``--trl-path``, where TRL is installed apart from the project::

    pip install --target ~/.cache/crslight/trl-1.12.0 trl==1.12.0 --no-deps

One step on each side is a warm-up; samples/s = prompts of the ``--steps`` timed steps / their wall time (from the end
of the warm-up step to the end of the last step).

    python benchmarks/ppo_vs_trl.py                      # tiny random Llama, then SmolLM2-135M
    python benchmarks/ppo_vs_trl.py --model tiny --steps 5 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TRL_VERSION = "1.12.0"
MODELS = ("tiny", "smollm2")
SETTINGS = ("batch_size", "new_tokens", "ppo_epochs", "warmup", "steps", "precision", "critic", "optimizer_in_backward",
            "threads", "seed", "prompt_length", "dialogues")
"""The command-line settings both sides get."""


def default_trl_path() -> Path:
    """``$CRSLIGHT_CACHE/trl-1.12.0`` (``~/.cache/crslight/trl-1.12.0`` by default)."""
    root = os.environ.get("CRSLIGHT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "crslight") / f"trl-{TRL_VERSION}"


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(times: list[float], warmup: int, batch_size: int) -> float:
    """Prompts per second over the steps after the first ``warmup``; ``times`` are the steps' end times (wall clock,
    or this process's CPU time for prompts per CPU-second)."""
    timed = len(times) - warmup
    if warmup < 1 or timed < 1:
        raise ValueError(f"need at least one warm-up and one timed step, got {len(times)} steps, warmup {warmup}")
    return timed * batch_size / (times[-1] - times[warmup - 1])


def select_prompts(samples: list, count: int) -> list:
    """``count`` samples of the most common prompt length (then the nearest lengths), in their original order."""
    lengths = Counter(len(s.ids) for s in samples)
    mode = max(lengths, key=lambda n: (lengths[n], -n))
    ranked = sorted(range(len(samples)), key=lambda i: (abs(len(samples[i].ids) - mode), i))
    if len(ranked) < count:
        raise ValueError(f"only {len(samples)} prompts, need {count}: raise --dialogues")
    return [samples[i] for i in sorted(ranked[:count])]


# -- preparation (parent process) --------------------------------------------------------------------------------------
def prepare(model: str, args, folder: Path) -> dict:
    """Writes the shared policy folder, crslight's R_phi checkpoint and the prompts; returns the children's spec."""
    import lightning
    import torch
    from transformers import GenerationConfig

    from crslight.data.datamodules import Synthetic
    from crslight.models import load_tokenizer, resolve_model_path, tiny_causal_lm
    from crslight.modules.reward import RewardModule

    tokenizer = load_tokenizer("smollm2")  # pad <|endoftext|>, distinct from the end-of-turn <|im_end|>
    policy = folder / "policy"
    policy.mkdir()
    if model == "tiny":
        tiny_causal_lm(tokenizer, seed=args.seed).save_pretrained(policy)
    else:  # the cached safetensors of SmolLM2-135M-Instruct, linked (the config files are rewritten below)
        source = Path(resolve_model_path(model))
        for name in ("config.json", "model.safetensors"):
            (policy / name).symlink_to(source / name)
    tokenizer.save_pretrained(policy)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, min_new_tokens=args.new_tokens).save_pretrained(policy)

    count = (args.warmup + args.steps) * args.batch_size
    data = Synthetic(task="prompts", tokenizer=str(policy), n_dialogues=args.dialogues, max_length=args.prompt_length)
    prompts = select_prompts(data.build("train"), count)

    torch.manual_seed(args.seed)
    # R_phi reads (context, reply) text cut to as many tokens as TRL's reward model reads ids (prompt + reply)
    reward = RewardModule(backbone=str(policy), context_turns=None, max_tokens=args.prompt_length + args.new_tokens,
                          max_reply_tokens=args.new_tokens + 8)
    reward_path = folder / "reward.ckpt"
    torch.save({"state_dict": reward.state_dict(), "hyper_parameters": dict(reward.hparams),
                "pytorch-lightning_version": lightning.__version__}, reward_path)
    del reward
    return {**{k: getattr(args, k) for k in SETTINGS}, "model": model, "policy": str(policy), "reward": str(reward_path),
            "prompts": [[list(p.ids), p.dialogue, p.turn] for p in prompts], "output_dir": str(folder / "trl")}


# -- the two sides (child processes) -----------------------------------------------------------------------------------
class StepClock:
    """End times of every PPO step: wall clock and this process's CPU time."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self, warmup: int, batch_size: int, **extra) -> dict:
        return {"samples_per_s": throughput(self.wall, warmup, batch_size),
                "samples_per_cpu_s": throughput(self.cpu, warmup, batch_size), "peak_rss_mb": peak_rss_mb(),
                "step_s": [round(b - a, 3) for a, b in zip(self.wall, self.wall[1:], strict=False)], **extra}


def run_crslight(spec: dict) -> dict:
    """crslight's ``PPOModule`` for ``warmup + steps`` steps in a Lightning ``Trainer``; timings and peak RSS."""
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything

    from crslight.data.datamodules import PromptSample, Synthetic
    from crslight.modules.ppo import PPOModule

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    prompts = [PromptSample(ids, d, t) for ids, d, t in spec["prompts"]]

    class Prompts(Synthetic):
        """The synthetic scenario's prompts DataModule, restricted to the benchmark's prompts."""

        def build(self, split: str):
            return prompts if split == self.splits["fit"] else super().build(split)

    class Clock(StepClock, Callback):
        def __init__(self) -> None:
            super().__init__()
            self.lengths: list[float] = []
            self.loaded_rss = 0.0

        def on_train_start(self, trainer, module) -> None:
            self.loaded_rss = peak_rss_mb()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.tick()
            self.lengths.append(float(trainer.callback_metrics["train/response_length"]))

    seed_everything(spec["seed"], verbose=False)
    b = spec["batch_size"]
    data = Prompts(task="prompts", tokenizer=spec["policy"], n_dialogues=spec["dialogues"],
                   max_length=spec["prompt_length"], batch_size=b)
    module = PPOModule(model=spec["policy"], reward_model=spec["reward"], max_new_tokens=spec["new_tokens"],
                       temperature=1.0, ppo_epochs=spec["ppo_epochs"], minibatch_size=b, micro_batch_size=b,
                       kl_coef=0.05, lr=1e-5, gradient_clip_val=None, critic=spec["critic"],
                       optimizer_in_backward=spec["optimizer_in_backward"])
    clock = Clock()
    trainer = Trainer(accelerator="cpu", devices=1, precision=spec["precision"], max_epochs=1,
                      limit_train_batches=spec["warmup"] + spec["steps"], limit_val_batches=0, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[clock])
    trainer.fit(module, data)
    return clock.result(spec["warmup"], b, rss_after_load_mb=clock.loaded_rss, response_length=clock.lengths,
                        threads=torch.get_num_threads())


def run_trl(spec: dict) -> dict:
    """TRL's ``PPOTrainer.train`` for ``warmup + steps`` steps with the matching settings; timings and peak RSS."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if spec["precision"] == "bf16-mixed":  # PPOTrainer's own Accelerator reads it; transformers 5 no longer sets it
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers import logging as hf_logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" for the reward and value heads
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    folder, b = spec["policy"], spec["batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # TRL masks the pad id out of every forward pass
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": [ids for ids, _, _ in spec["prompts"]]})
    config = PPOConfig(
        output_dir=spec["output_dir"], seed=spec["seed"], use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, num_sample_generations=0, bf16=spec["precision"] == "bf16-mixed",
        gradient_checkpointing=False, per_device_train_batch_size=b, gradient_accumulation_steps=1, num_mini_batches=1,
        local_rollout_forward_batch_size=b, total_episodes=len(dataset), num_ppo_epochs=spec["ppo_epochs"],
        response_length=spec["new_tokens"], stop_token=None, temperature=1.0, learning_rate=1e-5,
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, kl_coef=0.05, kl_estimator="k1",
        vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, whiten_rewards=False,
    )

    class Clock(StepClock, TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.tick()

    clock = Clock()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward, value_model=value, train_dataset=dataset, callbacks=[clock])
    loaded_rss = peak_rss_mb()
    trainer.train()
    return clock.result(spec["warmup"], b, rss_after_load_mb=loaded_rss, response_length="fixed: stop_token=None",
                        threads=torch.get_num_threads())


# -- orchestration -------------------------------------------------------------------------------------------------
def check_trl(path: Path) -> None:
    """Exits with the install command unless TRL 1.12.0 with ``trl.experimental.ppo`` imports from ``path``."""
    code = "import trl, trl.experimental.ppo; print(trl.__version__)"
    env = {**os.environ, "PYTHONPATH": str(path), "TRL_EXPERIMENTAL_SILENCE": "1"}
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    version = found.stdout.strip().splitlines()[-1] if found.returncode == 0 and found.stdout.strip() else None
    if version != TRL_VERSION:
        reason = (found.stderr.strip().splitlines() or ["no output"])[-1]
        problem = f"found TRL {version}" if version else f"importing it there failed ({reason})"
        sys.exit(f"error: TRL {TRL_VERSION} (the last release with trl.experimental.ppo) is needed in {path}, apart "
                 f"from the project's environment; {problem}. Install it with\n\n"
                 f"    {sys.executable} -m pip install --target {path} trl=={TRL_VERSION} --no-deps\n\n"
                 "(its dependencies accelerate, datasets and jinja2 come from this environment), or pass --trl-path.")


def run_side(side: str, spec: dict, folder: Path, trl_path: Path, script: str = __file__) -> dict:
    """Runs one side (``script --child side``) in its own process; its result and the load average around it."""
    spec_path, out_path = folder / "spec.json", folder / f"{side}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if side == "trl":
        env["PYTHONPATH"] = os.pathsep.join([str(trl_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, script, "--child", side, "--spec", str(spec_path), "--child-out", str(out_path)]
    load = os.getloadavg()[0]
    subprocess.run(command, env=env, check=True, stdout=sys.stderr)  # stdout carries only the table
    return {**json.loads(out_path.read_text()), "load_avg_1m": [load, os.getloadavg()[0]]}


def table(rows: list[dict], unit: str = "samples", cpu: bool = True) -> str:
    """The Markdown table of :func:`main`: one row per model (throughput in ``unit``/s; ``cpu``: the ratio per
    CPU-second as a last column)."""
    head = (f"| model | crslight {unit}/s | TRL {unit}/s | ratio | crslight peak RSS MB | TRL peak RSS MB | ratio |"
            + (f" {unit} per CPU-s ratio |" if cpu else "") + "\n|---|---:|---:|---:|---:|---:|---:|"
            + ("---:|" if cpu else ""))
    lines = [f"| {r['label']} | {r['crslight']['samples_per_s']:.2f} | {r['trl']['samples_per_s']:.2f} | "
             f"{r['speed_ratio']:.2f}x | {r['crslight']['peak_rss_mb']:.0f} | {r['trl']['peak_rss_mb']:.0f} | "
             f"{r['rss_ratio']:.2f}x |" + (f" {r['cpu_speed_ratio']:.2f}x |" if cpu else "") for r in rows]
    return "\n".join([head, *lines])


def compare(model: str, args) -> dict:
    """Prepares ``model`` and runs each side in its own subprocess; the row of the table."""
    notes = [note for note, on in (("separate critic", args.critic == "separate"),
                                   ("optimizer in backward", args.optimizer_in_backward),
                                   (args.precision, args.precision != "32-true")) if on]
    label = f"{model} ({', '.join(notes)})" if notes else model
    row = {"model": model, "label": label, "settings": {k: getattr(args, k) for k in SETTINGS}}
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl-") as tmp:
        spec = prepare(model, args, Path(tmp))
        row["settings"]["prompt_tokens"] = sorted({len(ids) for ids, _, _ in spec["prompts"]})
        for side in ("crslight", "trl"):
            print(f"[{model}] {side} ...", file=sys.stderr, flush=True)
            row[side] = run_side(side, spec, Path(tmp), args.trl_path)
    row["speed_ratio"] = row["crslight"]["samples_per_s"] / row["trl"]["samples_per_s"]
    row["cpu_speed_ratio"] = row["crslight"]["samples_per_cpu_s"] / row["trl"]["samples_per_cpu_s"]
    row["rss_ratio"] = row["crslight"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
    return row


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (``benchmarks/ppo_memory.py`` reads the same settings from it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per PPO step (one minibatch, one micro-batch)")
    parser.add_argument("--new-tokens", type=int, default=32, help="reply length, the same on every reply")
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed PPO steps first")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--critic", choices=["shared", "separate"], default="shared",
                        help="crslight's critic (TRL always has a separate value model)")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="crslight steps each weight inside the backward pass (PPOModule's optimizer_in_backward; "
                             "TRL has no such option)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (0: torch's default; two spin against each other on a busy "
                             "two-core machine)")
    parser.add_argument("--prompt-length", type=int, default=64, help="longest prompt, in tokens")
    parser.add_argument("--dialogues", type=int, default=200, help="synthetic dialogues the prompts are drawn from")
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every crslight-against-TRL script shares: seed, TRL's folder, the output, the child protocol."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-path", type=Path, default=default_trl_path(), help="folder TRL is installed in")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", choices=["crslight", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)


def run(args, runners: dict, compare_model, table_of) -> None:
    """A child process runs its side (``runners[args.child]``) and writes the result; the parent compares each
    model (``compare_model(model, args)``), prints ``table_of(rows)`` and writes the rows to ``--out``."""
    if args.child:
        spec = json.loads(args.spec.read_text())
        args.child_out.write_text(json.dumps(runners[args.child](spec)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_trl(args.trl_path)
    rows = []
    for model in MODELS if args.model == "both" else (args.model,):
        rows.append(compare_model(model, args))
        print(json.dumps({k: rows[-1][k] for k in ("label", "crslight", "trl")}), file=sys.stderr, flush=True)
    print(table_of(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


def main() -> None:
    run(build_parser().parse_args(), {"crslight": run_crslight, "trl": run_trl}, compare, table)


if __name__ == "__main__":
    main()
