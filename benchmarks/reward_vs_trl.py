"""crslight's R_phi training against TRL 1.12.0's ``RewardTrainer`` on one machine: pairs/s and peak RSS.

Both sides train the same backbone (a cross-encoder: context and reply in one input, scored at the last real token by
a scalar head) on the same preference pairs, in the same batches, for the same steps: full fine-tuning, AdamW at
``--lr`` with a constant schedule, no weight decay, the gradients' norm clipped to 1, the Bradley-Terry loss with
TRL's centring term (0.01), no dropout in the head. The pairs are the synthetic scenario's reward pairs (crslight's
``Synthetic`` DataModule, ``task: pairs``), taken in order; crslight tokenises them once (``RewardModule.encode``) and
TRL receives those token ids (``chosen_ids`` / ``rejected_ids``), so both read exactly the same inputs. crslight runs
its real path: ``RewardModule`` in a Lightning ``Trainer``; TRL runs ``RewardTrainer.train`` (its batches in the same
order: a sequential sampler).

Each side runs in its own subprocess (a clean peak RSS each, model loading included); TRL's with ``PYTHONPATH`` at
``--trl-path``, installed apart from the project as for ``benchmarks/ppo_vs_trl.py``::

    pip install --target ~/.cache/crslight/trl-1.12.0 trl==1.12.0 --no-deps

One step on each side is a warm-up; pairs/s = pairs of the ``--steps`` timed steps / their wall time.

    python benchmarks/reward_vs_trl.py                   # tiny random Llama, then SmolLM2-135M
    python benchmarks/reward_vs_trl.py --model smollm2 --out runs/reward_vs_trl.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import MODELS, StepClock, add_run_arguments, peak_rss_mb, run, run_side  # noqa: E402
from ppo_vs_trl import table as ppo_table  # noqa: E402

SETTINGS = ("batch_size", "steps", "warmup", "precision", "threads", "seed", "max_tokens", "lr", "dialogues")


def prepare(model: str, args, folder: Path) -> dict:
    """Writes the shared backbone folder and the pairs as token ids (crslight's encoding); the children's spec."""
    from crslight.models import load_tokenizer, resolve_model_path, tiny_causal_lm

    tokenizer = load_tokenizer("smollm2")
    backbone = folder / "backbone"
    backbone.mkdir()
    if model == "tiny":
        tiny_causal_lm(tokenizer, seed=args.seed).save_pretrained(backbone)
    else:
        source = Path(resolve_model_path(model))
        for name in ("config.json", "model.safetensors"):
            (backbone / name).symlink_to(source / name)
    tokenizer.save_pretrained(backbone)
    spec = {**{k: getattr(args, k) for k in SETTINGS}, "model": model, "backbone": str(backbone),
            "pad_id": tokenizer.pad_token_id, "output_dir": str(folder / "trl")}
    spec["pairs"] = pair_ids(reward_module(str(backbone), spec), pair_batches(str(backbone), spec))
    return spec


def pair_batches(backbone: str, args) -> list:
    """The first ``warmup + steps`` training batches of the synthetic scenario's reward pairs (seeded: the parent and
    crslight's child draw the same ones)."""
    import torch

    from crslight.data.datamodules import Synthetic

    data = Synthetic(task="pairs", tokenizer=backbone, n_dialogues=args["dialogues"], batch_size=args["batch_size"])
    data.setup("fit")
    torch.manual_seed(args["seed"])
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args["warmup"] + args["steps"])]
    if any(len(b.chosen) != args["batch_size"] for b in batches):
        raise ValueError(f"a batch with fewer than {args['batch_size']} pairs: raise --dialogues")
    return batches


def pair_ids(module, batches: list) -> list:
    """``(chosen ids, rejected ids)`` per pair, as the module's ``encode`` tokenises them (padding dropped)."""
    pairs = []
    for batch in batches:
        enc = module.encode(batch.context, module.reply_texts(batch.reply, batch.items))
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        pairs += [(ids[c], ids[r]) for c, r in zip(batch.chosen.tolist(), batch.rejected.tolist(), strict=True)]
    return pairs


def reward_module(backbone: str, spec: dict):
    """crslight's R_phi with the benchmark's settings (both sides' optimisation, no head dropout)."""
    from crslight.modules.reward import RewardModule

    return RewardModule(backbone=backbone, encoding="cross", context_turns=4, max_tokens=spec["max_tokens"],
                        max_reply_tokens=min(48, spec["max_tokens"] - 1), loss="bradley_terry",
                        center_rewards_coefficient=0.01, lr=spec["lr"], head_lr=spec["lr"], weight_decay=0.0,
                        warmup_steps=0, lr_schedule="constant", gradient_clip_val=1.0, head_dropout=0.0)


def run_crslight(spec: dict) -> dict:
    """crslight's ``RewardModule`` on the pairs in a Lightning ``Trainer``: its real training step (tokenising each
    batch included), on the batches whose token ids TRL gets (checked)."""
    import torch
    from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
    from torch.utils.data import DataLoader

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    batches = pair_batches(spec["backbone"], spec)
    seed_everything(spec["seed"], verbose=False)
    module = reward_module(spec["backbone"], spec)
    if pair_ids(module, batches) != [tuple(p) for p in spec["pairs"]]:
        raise RuntimeError("crslight's batches are not the pairs TRL gets")

    class Pairs(LightningDataModule):
        def train_dataloader(self):
            return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)  # each batch as it is

    class Clock(StepClock, Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.tick()

    clock = Clock()
    trainer = Trainer(accelerator="cpu", devices=1, precision=spec["precision"], max_steps=spec["warmup"] + spec["steps"],
                      limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    loaded = peak_rss_mb()
    trainer.fit(module, Pairs())
    return clock.result(spec["warmup"], spec["batch_size"], rss_after_load_mb=loaded, threads=torch.get_num_threads())


def run_trl(spec: dict) -> dict:
    """TRL's ``RewardTrainer.train`` on the same token ids, in the same order."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    hf_logging.set_verbosity_error()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["backbone"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["backbone"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({"chosen_ids": [c for c, _ in spec["pairs"]],
                                 "rejected_ids": [r for _, r in spec["pairs"]]})
    config = RewardConfig(
        output_dir=spec["output_dir"], seed=spec["seed"], use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, bf16=spec["precision"] == "bf16-mixed", gradient_checkpointing=False,
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", center_rewards_coefficient=0.01,
        max_length=None, dataloader_num_workers=0,
    )

    class Clock(StepClock, TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.tick()

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    clock = Clock()
    trainer = InOrder(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    loaded = peak_rss_mb()
    trainer.train()
    return clock.result(spec["warmup"], spec["batch_size"], rss_after_load_mb=loaded, threads=torch.get_num_threads())


def compare(model: str, args) -> dict:
    row = {"model": model, "label": model if args.precision == "32-true" else f"{model} ({args.precision})",
           "settings": {k: getattr(args, k) for k in SETTINGS}}
    with tempfile.TemporaryDirectory(prefix="reward_vs_trl-") as tmp:
        spec = prepare(model, args, Path(tmp))
        row["settings"]["tokens_per_step"] = [sum(len(c) + len(r) for c, r in spec["pairs"][lo : lo + args.batch_size])
                                              for lo in range(0, len(spec["pairs"]), args.batch_size)]
        for side in ("crslight", "trl"):
            print(f"[{model}] {side} ...", file=sys.stderr, flush=True)
            row[side] = run_side(side, spec, Path(tmp), args.trl_path, __file__)
    row["speed_ratio"] = row["crslight"]["samples_per_s"] / row["trl"]["samples_per_s"]
    row["rss_ratio"] = row["crslight"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
    return row


def table(rows: list[dict]) -> str:
    return ppo_table(rows, "pairs", cpu=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (0: torch's default)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per (context, reply) input")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--dialogues", type=int, default=200, help="synthetic dialogues the pairs are drawn from")
    add_run_arguments(parser)
    return parser


def main() -> None:
    run(build_parser().parse_args(), {"crslight": run_crslight, "trl": run_trl}, compare, table)


if __name__ == "__main__":
    main()
