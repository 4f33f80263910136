"""DDP on CPU (gloo, 2 processes): ranks make their own rollouts (the decoding engine needs no collective, so ranks
decode different numbers of steps freely, and their episodes may hold different numbers of replies), parameters stay
identical."""

import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModelForCausalLM

PPO_SCRIPT = """
import sys
from functools import partial
import torch
from lightning.pytorch import Trainer, seed_everything
from crslight.data.datamodules import Synthetic
from crslight.modules.ppo import PPOModule
from crslight.signals import AcceptanceSignal
from crslight.simulator import PersonaSimulator

policy, out = sys.argv[1], sys.argv[2]
seed_everything(0)  # the same seed on both ranks: only their own prompts and episodes make them differ
data = Synthetic(task="prompts", tokenizer=policy, n_dialogues=40, batch_size=2, max_length=96)
module = PPOModule(model=policy, signals=[AcceptanceSignal()], simulator=partial(PersonaSimulator, leave_step=0.5),
                   max_turns=2, max_new_tokens=6, minibatch_size=2,
                   micro_batch_size=1, ppo_epochs=1, lr=1e-3, kl_target=1.0, kl_horizon=10)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
                  limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
episodes = []
score = module.score
def recording_score(rollout):
    out = score(rollout)
    episodes.append(out.scores.tolist() + out.samples.input_ids.sum(1).tolist())
    return out
module.score = recording_score
trainer.fit(module, data)
state = {name: p.detach().clone() for name, p in module.named_parameters()}

torch.save({"params": state, "kl_coef": module.kl_controller.value, "episodes": episodes,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}},
           f"{out}/rank{trainer.global_rank}.pt")
"""


def _run(script: str, folder, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs ``script`` as a file (Lightning's DDP launcher starts rank 1 by re-running the same command)."""
    path = folder / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_ppo_ranks_stay_identical(tiny_policy, tmp_path):
    _run(PPO_SCRIPT, tmp_path, tiny_policy, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between ranks"
    # training moved the policy, from rollouts each rank made on its own, and both took the same KL decisions
    initial = AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict()
    assert not torch.equal(first["policy.model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert ranks[0]["episodes"] != ranks[1]["episodes"]
    # multi-turn episodes gave the ranks different numbers of replies; every rank still took the same backward passes
    # and optimizer steps (the update gives the rank with fewer replies empty micro-batches), or DDP would hang
    assert [len(e) for e in ranks[0]["episodes"]] != [len(e) for e in ranks[1]["episodes"]]
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"] != 0.05

