"""PPO on conversations with a simulated user, against the reward model R_phi learned from implicit feedback.

**What one step does.** Sample replies (the decoding engine, :mod:`crslight.models.engine`) — for
multi-turn episodes inside the simulator's :class:`~crslight.simulator.ConversationEnv`, where the user answers every
reply and may accept a suggestion or leave; without a simulator, one reply to each prompt of the batch. Score every
reply, compute the per-token KL to the reference policy, turn that into advantages, and take ``ppo_epochs`` passes
of clipped minibatch updates over the batch. Then adapt beta, the KL weight.

**The reward** of reply ``k`` of an episode is ``s_k = w_R * R_phi(context_k, reply_k) + sum_j w_j * signal_j`` — the
reward model, plus optional direct signals of the user's reaction (``AcceptanceSignal``, ``DwellTimeSignal``, ...: what
the simulator reports, NaN counted as 0). R_phi was trained on weak labels from users' implicit feedback, so it carries
that feedback to replies no user has seen; the direct signals are the same kind of implicit feedback, read from the
simulated user's reaction itself, free and exact in simulation. With no signals (the default) PPO only ever sees
R_phi; with ``reward_weight`` (w_R) 0, only the signals, and R_phi judges. Which serves best is measured per scenario
(docs/results.md: on the synthetic one, the user's acceptance alone moves acceptance most). Scores may be
normalised by running statistics and clipped (``reward_normalization``, ``reward_clip``): R_phi's scale is arbitrary
and one outlier reply should not dominate a batch.

**The action includes the recommendation.** Where a reply recommends, the policy emits the slot token and its item
scores (the same scores ``crslight test`` ranks the catalogue with) draw the item, whose title is then written into the
reply. The slot token's log-probability in the ratio, the KL and the entropy is ``log pi(slot) + log pi(item | slot)``
(items already mentioned excluded, as when drawing), so the advantage, the clipping and the KL reach the item scores
as well as the words; the title's tokens are not actions. The item scores train at their own rate (``item_lr``), and
the reference keeps the starting policy's item scores. With **item groups** (``item_alternatives: K``) the engine
draws K more items at each slot and the environment shows each to a copy of the same user in the same state
(:meth:`~crslight.simulator.ConversationEnv.item_groups`); the item choice then has its own clipped surrogate over
that group, each item's advantage its immediate score standardised within the group, and the exact KL of the item
distribution to the reference's, while the slot token's action is the token alone. A group costs K simulator
reactions, not K decoded episodes.

**Turns.** Each reply is its own sample (the exact token ids the policy saw and sampled); the episode links them by the
turn-level return ``G_k = s_k + turn_discount * G_{k+1}``, which is the terminal reward of reply ``k``. The value head
therefore learns the expected return-to-go of a dialogue state. We do not bootstrap across the user's turn with the
value of the next state: episodes are at most a handful of turns, Monte-Carlo returns across them are cheap and
unbiased, and within a reply GAE (``gamma``, ``lam``) does the token-level credit assignment.

**The KL term.** ``r_t = -beta * KL_t`` on every reply token (k1 ``log pi - log pi_ref``, or the non-negative k3),
``G_k`` on the last one (:func:`crslight.rl.per_token_rewards`). pi_ref is the starting (SFT) policy: with LoRA the
same weights with the adapters switched off, without LoRA a frozen copy. This is what keeps PPO near the dialogues R_phi
was trained on; without it the policy finds the replies R_phi over-scores. A fixed beta, or the adaptive controller of
Ziegler et al. steering the per-reply KL to ``kl_target``.

**The update.** Advantages by GAE, whitened over the batch's reply tokens; the clipped surrogate and the clipped value
loss (``vf_coef``), token means, minibatches of ``minibatch_size`` replies split into micro-batches for gradient
accumulation, gradient clipping, one AdamW for policy and value head. The value head reads the policy's last hidden
state (shared backbone, no second model in memory) unless ``critic: separate``. Dropout stays off throughout, so the
first minibatch's ratios are exactly 1.

**GRPO** (``advantage_estimator: grpo``): no critic. Each start (prompt, or episode start with the same simulated
user) is sampled ``group_size`` times; a reply's advantage is its episode's return standardised within the group, and
the KL enters the loss (k3, weight beta) rather than the reward, as in DeepSeekMath.

**Left out on purpose.** An entropy bonus (entropy is logged: a collapse shows), a reward for the simulator's rating
beyond what signals give, value bootstrapping at truncated replies (``missing_eos_penalty`` instead), and per-token
length normalisation. Each is a knob whose effect on a 135M recommender we have not measured.

**The step** (:meth:`PPOModule.training_step`) reads top to bottom: collect the episodes (:meth:`PPOModule.collect`),
score them (:meth:`PPOModule.score`), make the experience (:meth:`PPOModule.rollout_logprobs`, then
:func:`~crslight.modules.experience.make_experience`), update (:meth:`PPOModule.update`, then beta adapts), log. The
data flow lives in :mod:`crslight.modules.experience` as pure functions over explicit arguments (the environment, the
engine policy, the :class:`~crslight.modules.experience.Scorer`, the hyper-parameters, a gather function) that return
typed records (``Rollout`` → ``Episodes`` → ``Experience``); this module wires them and holds the optimisation. The
environments are built once in ``setup`` (:func:`~crslight.simulator.env.build_environment`, the same factory as
``crslight simulate`` and ``crslight test``).

**DDP.** Every rank makes its own rollouts: step ``n``'s ``b * world`` episodes follow those of the steps before, and a
``DistributedSampler`` deals them out (rank ``r`` takes every ``world``-th from ``r``,
:func:`~crslight.modules.experience.episode_indices`), so no user is met twice across ranks and steps, and one process
runs episodes ``n * b + i``; ranks decode independently (the engine runs no collective operation); gradients are
averaged by DDP at every backward, and since multi-turn episodes give ranks different numbers of replies, every rank
takes as many minibatches and micro-batches as the one with the most (empty ones where it has none left); statistics
that steer training (KL, reply counts, reward moments) are reduced over ranks so every rank takes the same decisions;
logs use ``sync_dist``.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.hooks import RemovableHandle

from crslight.data.datamodules import PromptBatch
from crslight.guards import check_loss, require_non_negative, require_positive
from crslight.models.heads import ScalarHead
from crslight.models.lora import LoRAConfig, apply_lora, disabled_adapters, lora_config, lora_hparam
from crslight.models.memory import release_heap
from crslight.modules.evaluation import EvalConfig, eval_config
from crslight.modules.experience import (
    Episodes,
    Experience,
    ExperienceConfig,
    Rollout,
    RolloutLogprobs,
    RunningMoments,
    Scorer,
    collect_episodes,
    collect_replies,
    episode_indices,
    make_experience,
    score_episodes,
)
from crslight.modules.optim import lr_multiplier, optimizer_step
from crslight.modules.policy import Hidden, PolicyModule
from crslight.modules.rollout import EnginePolicy, Samples, position_ids
from crslight.rl import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    ppo_value_loss,
)
from crslight.signals.base import SignalExtractor
from crslight.simulator.env import ConversationEnv, SimulatorFactory, build_environment


def allocate_adam_state(opt: torch.optim.Optimizer) -> None:
    """Gives Adam(W) its moment buffers now, as zeros, instead of at its first step: the same update, less memory.

    Created lazily, the buffers (twice the trainable weights) take the heap space the first minibatch's activations
    just freed, and the next minibatch's activations need new memory on top: with full fine-tuning of SmolLM2 on a
    CPU that added about 0.4 GB to the peak RSS of PPO (docs/benchmarks.md). Allocated before any forward pass, they
    sit below the activations, which then reuse their own freed space. A checkpoint's optimizer state, loaded after
    ``configure_optimizers`` on resume, replaces these zeros.
    """
    state = {}
    for index, (param, group) in enumerate((p, g) for g in opt.param_groups for p in g["params"]):
        buffers = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                   "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
        if group.get("amsgrad"):
            buffers["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state[index] = buffers
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def step_in_backward(optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
    """Steps ``optimizer`` on each parameter as soon as the backward pass has its gradient, then frees that gradient.

    The full set of gradients (as large as the trainable weights) then never exists at once: torchtune's
    ``optimizer_in_bwd``. A hook fires once per parameter per backward pass, after autograd has summed every
    contribution (tied weights included), when no other parameter holds a gradient; ``optimizer.step()`` skips
    parameters without one, so each call updates exactly one parameter, with the update the whole step would give it.
    That holds only with one backward pass per step (no gradient accumulation), no clipping by the global norm, no
    gradient scaler and one process (DDP averages the gradients after this hook). Returns the hooks' handles.
    """

    def step(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    return [p.register_post_accumulate_grad_hook(step) for group in optimizer.param_groups for p in group["params"]]


def _release_heap_before_backward(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook of the input embedding: on a CPU, releases the heap when the backward pass reaches it."""
    if output.requires_grad and output.device.type == "cpu":
        output.register_hook(_release_heap_hook)


def _release_heap_hook(grad: torch.Tensor) -> None:
    release_heap()


class PolicyOutput(NamedTuple):
    """What :meth:`PPOModule.forward` returns (see there)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None
    item_logprobs: torch.Tensor | None
    slot_hidden: torch.Tensor | None = None


def item_kl_divergence(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over slots of the exact KL(pi || pi_ref) between two item distributions ``(s, n_items)`` (log-probs;
    items impossible under pi contribute nothing)."""
    terms = logprobs.exp() * (logprobs.clamp(min=-1e4) - ref_logprobs.clamp(min=-1e4))
    return terms.sum(-1).mean()


#: AdamW's epsilon for the item scores' per-item bias: every item gets a gradient through the softmax, a tiny one when
#: it was not drawn; Adam would scale those up to full-size steps (every bias moving by ``item_lr`` each step, noise),
#: while with an epsilon well above them the drawn items move by about ``item_lr`` and the others hardly at all.
ITEM_EPS = 1e-2


class PPOModule(PolicyModule):
    """PPO (or GRPO) fine-tuning of the policy against R_phi in simulated conversations; see the module docstring.

    The item scores are part of the policy here (``trains_item_head``): PPO moves what users are recommended.

    Args:
        model: Policy: an alias (``smollm2``), a transformers folder or a hub id. Also the tokenizer's source.
        init_from: The SFT policy to start from (and the KL reference): an ``SFTModule`` checkpoint or a folder.
        reward_model: A ``RewardModule`` checkpoint (R_phi). ``None``: the reward is the direct signals alone.
        reward_weight: R_phi's weight in the score; 0 keeps R_phi as a judge only (``train/reward`` logs its mean,
            ``train/score`` the signals' score).
        reward_device: Device for R_phi (``cpu``, ``cuda:1``); ``None`` puts it with the policy.
        signals: Direct reward signals by class name (``AcceptanceSignal`` ...), read from the simulated reactions.
        signal_weights: One weight per signal (1.0 each when ``None``).
        simulator: The user simulator, given like ``signals`` by class path and its arguments beside the catalogue
            (which the DataModule supplies): ``{class_path: GroundedSimulator, init_args: {leave_step: 0.2}}``, or
            the class name alone (``PersonaSimulator``); any ``crslight.simulators`` entry point. ``auto``: the
            dataset's default (:func:`~crslight.simulator.env.default_simulator`). ``None`` trains single replies to
            the DataModule's prompts. In Python also a class name or a callable taking the catalogue.
        max_turns: Replies per simulated episode at most.
        env_seed: Seed of the episodes' draws (which dialogue, which user decisions).
        max_new_tokens: Longest reply, in tokens.
        temperature: Sampling temperature (the log-probs are those of the tempered distribution).
        top_k: Top-k sampling, 0 for off. Log-probs ignore the truncation, so keep it off for exact PPO.
        item_temperature: Temperature of the item draw at a recommendation slot (the log-probs are the tempered ones).
        item_lr: Learning rate of the item scores' per-item bias and context weights (``None``: ``lr``): one number
            per item that PPO moves directly, so it can take a far larger rate than the language model's weights (the
            scores' ``hidden x hidden`` map, which moves every item at once, keeps ``lr``).
        item_alternatives: At each recommendation of a rollout, draw this many more items at the same slot state and
            show each (the same words, that item's title) to a copy of the same user in the same state: the item
            choice then learns from that group (its advantage: the item's immediate score standardised within the
            group, clipped ratio and the exact KL of the item distribution to the reference's), instead of from the
            episode's return. 0: the item's log-probability is part of the slot token's action.
        expected_item_score: With item alternatives: a reply that recommends scores the mean of its slots' groups, an
            unbiased estimate of its expected score over the item draw (:func:`~crslight.modules.experience.
            expected_item_scores`), instead of the one draw's outcome. The words then learn what they control
            (whether, where and how many items a reply names) from every reply whose group holds an item the user
            would take, not only from the one whose own draw was taken; with ``item_lr: 0`` the item scores stay as
            they are and the alternatives serve only this.
        item_ppo_epochs: With item alternatives: full-batch steps of the item scores alone on the rollout's slot states
            (cached, so the language model does not run) before the ``ppo_epochs`` passes: cheap extra updates of the
            item choice, each clipped to the rollout's distribution.
        ppo_epochs: Passes over each rollout batch (0: the language model and its words stay as they are; with item
            alternatives and ``item_ppo_epochs``, only the item choice is optimised).
        minibatch_size: Replies per optimizer step.
        micro_batch_size: Replies per forward/backward (gradient accumulation over ``minibatch_size``).
        group_by_length: Minibatches of replies of similar length (prompt and reply; ties in random order, the
            minibatches in random order), as ``transformers``' ``group_by_length``: each micro-batch is cut to its
            longest row, so a second-turn prompt no longer pads seven first-turn ones (the synthetic config's update
            3.5x faster), but the minibatches differ from random ones, and so does the run (docs/results.md). With or
            without it, the rows of a minibatch and of a rollout's forward passes go into micro-batches sorted by
            length, which changes no gradient.
        clip_range: Epsilon of the policy ratio clip.
        value_clip: Largest move of a value from its rollout estimate that still lowers the value loss.
        vf_coef: Weight of the value loss.
        gamma: Discount per reply token.
        lam: GAE lambda.
        turn_discount: Discount of later turns' rewards in a reply's return.
        whiten_advantages: Whiten GAE advantages over the batch's reply tokens (GRPO advantages are standardised already).
        advantage_estimator: ``gae`` (PPO with a value head) or ``grpo`` (group-normalised, no critic).
        group_size: GRPO: samples per start.
        kl_estimator: Per-token KL estimator in the reward, ``k1`` or ``k3``.
        kl_coef: Beta, the KL weight (the initial one when adaptive).
        kl_target: Target KL per reply in nats; set it to adapt beta (Ziegler et al.), ``None`` for a fixed beta.
        kl_horizon: Adaptive controller horizon, in replies.
        reward_normalization: ``none``; ``scale`` divides scores by their running std; ``zscore`` also centres them.
        reward_clip: Clip (normalised) scores to ``[-reward_clip, reward_clip]``; ``None`` for no clipping.
        missing_eos_penalty: Added to the score of a reply cut at ``max_new_tokens`` (e.g. -1.0); ``None`` for none.
        critic: ``shared``: the value head reads the policy's hidden states; ``separate``: a copy of the backbone.
        lr: Learning rate (AdamW, after ``warmup_steps`` optimizer steps of linear warmup, then constant).
        weight_decay: AdamW weight decay.
        warmup_steps: Optimizer steps of linear warmup.
        gradient_clip_val: Clip the gradients' global norm; ``None`` or 0 for no clipping.
        optimizer_in_backward: Update each weight as soon as the backward pass has its gradient and free that
            gradient (:func:`step_in_backward`): the same steps, with one set of gradients less at the memory peak.
            Needs ``micro_batch_size == minibatch_size``, ``gradient_clip_val: null`` and one process.
        dtype: Parameter dtype of the policy; for bf16 autocast use ``trainer.precision: bf16-mixed``.
        lora: Train LoRA adapters (``r``, ``alpha``, ``dropout``: keep 0, PPO ratios need a deterministic policy;
            ``target_modules``; ``true`` for the defaults); the reference is then the same model with adapters off.
        gradient_checkpointing: Recompute activations in the backward pass.
        trust_remote_code: Allow custom modelling code from the model folder.
        item_text_model: The sentence encoder of the item scores' text part, when ``init_from``'s scores have one.
        evaluation: ``test``'s simulator episodes after the ranking (:class:`~crslight.modules.evaluation.EvalConfig`:
            ``episodes``, ``max_turns``, ``max_new_tokens``, ``reward_model``: None judges with ``reward_model``).
    """

    def __init__(
        self,
        model: str = "smollm2",
        init_from: str | None = None,
        reward_model: str | None = None,
        reward_weight: float = 1.0,
        reward_device: str | None = None,
        signals: list[SignalExtractor] | None = None,
        signal_weights: list[float] | None = None,
        simulator: Literal["auto"] | SimulatorFactory | None = None,
        max_turns: int = 3,
        env_seed: int = 0,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_k: int = 0,
        item_temperature: float = 1.0,
        item_lr: float | None = None,
        item_alternatives: int = 0,
        expected_item_score: bool = False,
        item_ppo_epochs: int = 0,
        ppo_epochs: int = 2,
        minibatch_size: int = 8,
        micro_batch_size: int = 8,
        group_by_length: bool = False,
        clip_range: float = 0.2,
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        turn_discount: float = 1.0,
        whiten_advantages: bool = True,
        advantage_estimator: Literal["gae", "grpo"] = "gae",
        group_size: int = 4,
        kl_estimator: Literal["k1", "k3"] = "k1",
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        reward_normalization: Literal["none", "scale", "zscore"] = "none",
        reward_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        critic: Literal["shared", "separate"] = "shared",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        gradient_clip_val: float | None = 1.0,
        optimizer_in_backward: bool = False,
        dtype: str = "float32",
        lora: LoRAConfig | bool | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        item_text_model: str = "minilm",
        evaluation: EvalConfig | None = None,
    ) -> None:
        require_positive(lr=lr, max_new_tokens=max_new_tokens, item_temperature=item_temperature)
        require_non_negative(kl_coef=kl_coef, warmup_steps=warmup_steps, ppo_epochs=ppo_epochs, temperature=temperature)
        lora = lora_hparam(lora)  # a plain dict in the hyper-parameters (weights-only checkpoints)
        super().__init__(model, init_from, dtype, lora, gradient_checkpointing, trust_remote_code,
                         item_text_model=item_text_model)
        if micro_batch_size < 1 or minibatch_size < micro_batch_size:
            raise ValueError(f"need 1 <= micro_batch_size <= minibatch_size, got {micro_batch_size}, {minibatch_size}")
        if signal_weights is not None and len(signal_weights) != len(signals or []):
            raise ValueError(f"got {len(signal_weights)} signal_weights for {len(signals or [])} signals")
        if expected_item_score and item_alternatives < 1:
            raise ValueError("expected_item_score averages each slot's item group: set item_alternatives to 1 or more "
                             f"(got {item_alternatives})")
        if advantage_estimator == "grpo" and group_size < 2:
            raise ValueError("grpo needs group_size >= 2")
        if optimizer_in_backward and (micro_batch_size != minibatch_size or gradient_clip_val):
            raise ValueError(
                "optimizer_in_backward steps each weight during the backward pass, so it needs one backward pass per "
                "optimizer step and no clipping by the global norm: set micro_batch_size equal to minibatch_size "
                f"(got {micro_batch_size} and {minibatch_size}) and gradient_clip_val to null (got {gradient_clip_val})")
        # signals and simulator are objects (the CLI saves the config beside the run); the test's settings are the
        # command's, never the checkpoint's
        self.save_hyperparameters(ignore=["signals", "simulator", "evaluation"])
        self.evaluation = eval_config(evaluation)
        self.signals = list(signals or [])
        self.simulator = simulator
        self.signal_weights = list(signal_weights) if signal_weights is not None else [1.0] * len(self.signals)
        self.kl_controller = (AdaptiveKLController(kl_coef, kl_target, kl_horizon) if kl_target is not None
                              else FixedKLController(kl_coef))
        self.reward_moments = RunningMoments()
        self.iterations = 0
        self._warned_no_signal = False  # warns once per run when a step had no advantage at all
        self.value_head: ScalarHead | None = None
        self.critic_backbone: torch.nn.Module | None = None
        self._reference = Hidden()
        self._reward = Hidden()
        self._reference_head = Hidden()
        self.corpora: dict[str, Any] = {}  # per stage (fit, validate): the split episodes and prompts come from
        self.environments: dict[str, ConversationEnv | None] = {}  # per stage: its simulator environment, or None
        self._step_hooks: list[RemovableHandle] = []

    trains_item_head = True

    # -- parts ------------------------------------------------------------------------------------------------------
    @property
    def uses_critic(self) -> bool:
        return self.hparams.advantage_estimator == "gae"

    def build_extra(self) -> None:
        """Value head (and separate critic), the reference when there is no LoRA to switch off, and the heap release
        before the input embedding's backward pass (:meth:`update`)."""
        base = self.policy.get_base_model() if self.hparams.lora else self.policy
        self.policy.get_input_embeddings().register_forward_hook(_release_heap_before_backward)
        if self.uses_critic:
            self.value_head = ScalarHead(base.config.hidden_size)
            if self.hparams.critic == "separate":
                backbone = copy.deepcopy(getattr(base, base.base_model_prefix))
                if self.hparams.lora:
                    backbone = apply_lora(backbone, lora_config(self.hparams.lora))
                self.critic_backbone = backbone
        if not self.hparams.lora:
            reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
            self._reference = Hidden(reference)

    def configure_model(self) -> None:
        super().configure_model()
        if self.item_head is not None and self._reference_head.module is None:
            # the starting policy's item scores (from init_from), before any PPO step or checkpoint restores them
            self._reference_head = Hidden(copy.deepcopy(self.item_head).requires_grad_(False))

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference policy (``None`` with LoRA: the policy with adapters off is the reference)."""
        module = self._reference.module
        if module is not None and next(module.parameters()).device != self.device:
            module.to(self.device)
        return module

    @property
    def reward_model(self):
        """R_phi, loaded once from ``reward_model`` onto ``reward_device`` (``None`` when not configured)."""
        if self._reward.module is None and self.hparams.reward_model:
            from crslight.modules.reward import RewardModule

            device = self.hparams.reward_device or self.device
            with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG (exact resume)
                self._reward.module = RewardModule.load(self.hparams.reward_model, map_location=device).eval()
        return self._reward.module

    @property
    def scorer(self) -> Scorer:
        """R_phi and the direct signals with their weights: what scores a reply."""
        return Scorer(self.reward_model, self.hparams.reward_weight, self.signals, self.signal_weights,
                      self.hparams.expected_item_score)

    def setup(self, stage: str) -> None:
        """The splits of ``fit`` (training and validation) or ``validate``, and with a simulator their environments,
        built once (:func:`~crslight.simulator.env.build_environment`)."""
        if stage not in ("fit", "validate"):
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "corpus"):
            raise TypeError("PPOModule needs a crslight DataModule (ReDial, OpenDialKG, Synthetic) with task: prompts")
        hp = self.hparams
        for split in ("fit", "validate") if stage == "fit" else ("validate",):
            if split in self.corpora:
                continue
            corpus = datamodule.corpus(datamodule.splits[split])
            self.corpora[split] = corpus
            self.environments[split] = None if self.simulator is None else build_environment(
                corpus, self.simulator, root=getattr(datamodule, "root", None),
                max_turns=hp.max_turns, seed=hp.env_seed)

    # -- forward passes ---------------------------------------------------------------------------------------------
    def forward(self, samples: Samples, values: bool = False, reference: bool = False,
                entropy: bool = False) -> PolicyOutput:
        """Log-probabilities ``(b, w)`` of the actions at columns ``start..t-1`` (``w = t - start``) at
        ``temperature``; without item alternatives, the drawn items' log-probabilities are added at their slot tokens;
        the token entropy ``(b, w)`` (``None`` unless ``entropy``); values ``(b, w)`` of the states before them
        (``None`` unless ``values``); the item distribution ``(s, n_items)`` at each slot (``None`` without slots)."""
        hp = self.hparams
        ids, mask = samples.input_ids.to(self.device), samples.attention_mask.to(self.device)
        actions = ids[:, samples.start :]
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "use_cache": False,
                  "logits_to_keep": ids.shape[1] - samples.start + 1}
        slots = samples.slots.to(self.device)
        need_hidden = len(slots) > 0 or (values and self.critic_backbone is None and not reference)
        model = (self.reference or self.policy) if reference else self.policy
        if reference and self.reference is None:
            with disabled_adapters(self.policy):
                out = self.policy(**kwargs, output_hidden_states=need_hidden)
        else:
            out = model(**kwargs, output_hidden_states=need_hidden)
        logits = out.logits[:, :-1]
        logprobs = logprobs_from_logits(logits, actions, hp.temperature)
        entropy = entropy_from_logits(logits / hp.temperature) if entropy else None
        del logits
        item_logprobs = hidden = None
        if len(slots):
            head = self._reference_head.module if reference else self.item_head
            if head is not None and next(head.parameters()).device != self.device:
                head.to(self.device)
            hidden = out.hidden_states[-1][slots[:, 0], slots[:, 1]]
            item_logprobs = self._item_logprobs(head, hidden, samples, model.get_output_embeddings().weight)
            if not samples.slot_alternatives.shape[1]:
                drawn = item_logprobs.gather(1, slots[:, 2:3]).squeeze(1)
                logprobs = logprobs.index_put((slots[:, 0], slots[:, 1] - samples.start), drawn, accumulate=True)
        value = None
        if values and not reference:
            if self.critic_backbone is None:
                states = out.hidden_states[-1]
            else:
                states = self.critic_backbone(input_ids=ids, attention_mask=mask,
                                              position_ids=kwargs["position_ids"]).last_hidden_state
            with torch.autocast(self.device.type, enabled=False):  # values in float32 even under bf16 autocast
                value = self.value_head(states[:, samples.start - 1 : -1].float())
        return PolicyOutput(logprobs, entropy, value, item_logprobs, hidden)

    def _item_logprobs(self, head, hidden: torch.Tensor, samples: Samples, table: torch.Tensor) -> torch.Tensor:
        """``head``'s item distribution ``(s, n_items)`` at the slot states ``hidden`` of ``samples`` (their exclusions,
        ``item_temperature``), over the title table ``table`` (output embeddings)."""
        text = samples.slot_text.to(self.device) if samples.slot_text.numel() else None
        return head.log_probs(hidden, table, samples.slot_exclude.to(self.device), self.hparams.item_temperature,
                              text)

    def _micro_batches(self, samples: Samples, rows: list[int] | None = None) -> list[list[int]]:
        """``rows`` of ``samples`` (default: all) in micro-batches of ``micro_batch_size``, sorted by real length first
        (stable), so each micro-batch's padding is cut by :meth:`Samples.select`."""
        rows = list(range(samples.input_ids.shape[0])) if rows is None else list(rows)
        lengths = samples.attention_mask.sum(1).tolist()
        rows.sort(key=lambda row: lengths[row])
        size = self.hparams.micro_batch_size
        return [rows[lo : lo + size] for lo in range(0, len(rows), size)]

    def _minibatches(self, samples: Samples) -> list[list[int]]:
        """One epoch's minibatches of ``minibatch_size`` rows: a random order, or with ``group_by_length`` rows of
        similar length together (ties broken at random) in minibatches taken in random order."""
        n, size = samples.input_ids.shape[0], self.hparams.minibatch_size
        order = torch.randperm(n).tolist()
        if self.hparams.group_by_length:
            lengths = samples.attention_mask.sum(1).tolist()
            order.sort(key=lambda row: lengths[row])
            chunks = [order[lo : lo + size] for lo in range(0, n, size)]
            return [chunks[i] for i in torch.randperm(len(chunks)).tolist()]
        return [order[lo : lo + size] for lo in range(0, n, size)]

    @torch.no_grad()
    def rollout_logprobs(self, samples: Samples) -> RolloutLogprobs:
        """The policy's and the reference's forward passes over a rollout's samples, micro-batch by micro-batch:
        log-probabilities, the policy's entropy and values, and with item alternatives the slot terms
        (:class:`~crslight.modules.experience.RolloutLogprobs`)."""
        width = samples.input_ids.shape[1] - samples.start
        out = defaultdict(list)
        groups = samples.slot_alternatives.shape[1] > 0
        batches = self._micro_batches(samples)
        for rows in batches:
            part = samples.select(rows)
            pad = width - (part.input_ids.shape[1] - part.start)
            own = self.forward(part, values=self.uses_critic, entropy=True)
            if self.hparams.ppo_epochs:
                ref = self.forward(part, reference=True)
            else:  # the language model never trains: the reference differs in its item scores alone
                ref = own._replace(item_logprobs=None if own.slot_hidden is None else self._item_logprobs(
                    self._reference_head.module.to(self.device), own.slot_hidden, part,
                    self.policy.get_output_embeddings().weight))
            entries = {"logprobs": own.logprobs, "entropy": own.entropy, "ref_logprobs": ref.logprobs}
            if own.values is not None:
                entries["values"] = own.values.float()
            for key, value in entries.items():
                out[key].append(torch.nn.functional.pad(value, (0, pad)))
            if groups and len(part.slots):
                out["slot_logprobs"].append(own.item_logprobs.gather(1, part.slot_items.to(self.device)))
                out["slot_ref_logprobs"].append(ref.item_logprobs)
                out["slot_hidden"].append(own.slot_hidden.float())
        rows = torch.tensor([row for part in batches for row in part]).argsort()
        slots = torch.cat([samples.slots_of(part) for part in batches]).argsort()
        result = {key: torch.cat(value) for key, value in out.items()}
        for key, value in result.items():  # back to the samples' row order, and slot order
            result[key] = value[(slots if key.startswith("slot_") else rows).to(value.device)]
        return RolloutLogprobs(**result)

    # -- rollouts ---------------------------------------------------------------------------------------------------
    def collect(self, batch: PromptBatch, stage: str = "fit", step: int = 0) -> Rollout:
        """The current policy's replies for ``batch``: with a simulator, this rank's share of step ``step``'s episodes
        in ``stage``'s environment (:func:`~crslight.modules.experience.episode_indices`, one per prompt;
        :func:`~crslight.modules.experience.collect_episodes`); without, one reply to each prompt
        (:func:`~crslight.modules.experience.collect_replies`). GRPO repeats each start ``group_size`` times in
        training; item alternatives are drawn in training only."""
        hp, tokenizer = self.hparams, self.tokenizer
        corpus, env = self.corpora[stage], self.environments[stage]
        engine = self.engine(max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_k=hp.top_k,
                             item_temperature=hp.item_temperature,
                             item_alternatives=hp.item_alternatives if stage == "fit" else 0)
        policy = EnginePolicy(engine, self.trainer.datamodule.encode_prompt, corpus.catalogue["item_id"], record=True)
        repeat = hp.group_size if hp.advantage_estimator == "grpo" and stage == "fit" else 1
        if env is None:
            contexts = [corpus.dialogues[int(d)]["turns"][: int(t)]
                        for d, t in zip(batch.dialogue_index, batch.turn_index, strict=True) for _ in range(repeat)]
            names = dict(zip(corpus.catalogue["item_id"], corpus.catalogue["name"], strict=True))
            return collect_replies(policy, contexts, names, tokenizer.pad_token_id, tokenizer.eos_token_id)
        share = episode_indices(step, len(batch.input_ids), self.trainer.world_size, self.trainer.global_rank)
        indices = [i for i in share for _ in range(repeat)]
        return collect_episodes(policy, env, indices, tokenizer.pad_token_id, tokenizer.eos_token_id)

    def score(self, rollout: Rollout) -> Episodes:
        """The rollout's replies scored by R_phi and the direct signals (:func:`~crslight.modules.experience.
        score_episodes` with :attr:`scorer`)."""
        return score_episodes(rollout, self.scorer)

    def gather_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Every rank's ``scores`` ``(b,)`` concatenated, on the CPU (for the reward statistics)."""
        return self.all_gather(scores.to(self.device)).reshape(-1).cpu()

    # -- training ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One PPO iteration: collect, score, make the experience, update, log (see the module docstring)."""
        self.eval()  # no dropout anywhere: the first minibatch's ratios are exactly 1
        # 1. collect: episodes with the simulated users (or one reply per prompt)
        start = time.perf_counter()
        rollout = self.collect(batch, "fit", self.iterations)
        seconds = {"seconds_rollout": time.perf_counter() - start}
        # 2. score: R_phi and the direct signals, per reply and per item alternative
        episodes = self.score(rollout)
        # 3. experience: the rollout-time log-probabilities and values, then KL, shaped returns and advantages
        start = time.perf_counter()
        logprobs = self.rollout_logprobs(episodes.samples)
        seconds["seconds_logprobs"] = time.perf_counter() - start
        exp = make_experience(episodes, logprobs, ExperienceConfig.from_hparams(self.hparams), self.kl_controller.value,
                              self.reward_moments, self.gather_scores)
        # 4. update: the clipped minibatch passes, then beta adapts to the step's KL
        start = time.perf_counter()
        stats = self.update(episodes.samples, exp)
        seconds["seconds_update"] = time.perf_counter() - start
        kl_per_reply = self.adapt_kl(exp)
        if not bool((exp.advantages * exp.mask).any()) and not self._warned_no_signal:
            self._warned_no_signal = True
            rank_zero_warn(f"PPO iteration {self.iterations}: every reply's advantage is 0 (all its rewards alike, e.g. "
                           "no episode accepted), so the words got no policy gradient: a reward this sparse teaches "
                           "nothing (train/learning_replies is the share of replies that had an advantage)")
        self.iterations += 1
        # 5. log
        self.log_step(episodes, exp, kl_per_reply, {**stats, **seconds})

    def adapt_kl(self, exp: Experience) -> torch.Tensor:
        """Feeds the step's mean KL per reply (averaged over ranks) and its number of replies (summed over ranks: with
        multi-turn episodes each rank has its own) to the KL controller; returns this rank's KL per reply ``(b,)``."""
        kl_per_reply = masked_sum(exp.kl, exp.mask, 1)
        mean_kl = self.trainer.strategy.reduce(kl_per_reply.mean(), reduce_op="mean")
        replies = exp.mask.shape[0]
        if self.trainer.world_size > 1:
            replies = int(self.trainer.strategy.reduce(torch.tensor(replies, device=self.device), reduce_op="sum"))
        self.kl_controller.update(float(mean_kl), replies)
        return kl_per_reply

    def log_step(self, episodes: Episodes, exp: Experience, kl_per_reply: torch.Tensor,
                 stats: dict[str, torch.Tensor | float]) -> None:
        """Logs a training step under ``train/`` (docs/training.md lists the keys)."""
        mask = exp.mask
        metrics = {
            **episodes.metrics,
            "kl": kl_per_reply.mean(),
            "kl_coef": torch.tensor(self.kl_controller.value),
            "entropy": masked_mean(exp.entropy, mask),
            "response_length": mask.sum(1).float().mean(),
            "return": exp.returns_per_reply.mean(),
            "advantage_std": exp.advantages[mask].std() if mask.sum() > 1 else torch.tensor(0.0),
            "learning_replies": (exp.advantages.abs() * mask).amax(1).gt(0).float().mean(),
            **stats,
        }
        if self.uses_critic:
            metrics["value"] = masked_mean(exp.values, mask)
        progress = {"score", "kl", "accept"}
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=self.device)
            self.log(f"train/{key}", value, prog_bar=key in progress, sync_dist=True, batch_size=mask.shape[0])

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Episodes of the current policy on the eval split (the same episodes at every validation): ``val/score``,
        ``val/reward`` (mean R_phi, with R_phi), ``val/accept``, ``val/satisfaction``, ``val/kl`` (per reply, to the reference) and more."""
        episodes = self.score(self.collect(batch, "validate", batch_idx))
        logprobs = self.rollout_logprobs(episodes.samples)
        mask = episodes.samples.response_mask[:, episodes.samples.start :].to(self.device).bool()
        kl = masked_sum(kl_penalty(logprobs.logprobs, logprobs.ref_logprobs, "k1"), mask, 1)
        metrics = {**episodes.metrics, "kl": kl.mean(), "response_length": mask.sum(1).float().mean(),
                   "entropy": masked_mean(logprobs.entropy, mask)}
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=self.device)
            self.log(f"val/{key}", value, prog_bar=key in ("score", "accept"), sync_dist=True,
                     batch_size=len(batch.input_ids))

    def update(self, samples: Samples, exp: Experience) -> dict[str, torch.Tensor]:
        """``item_ppo_epochs`` steps of the item scores on the cached slot states, then ``ppo_epochs`` passes of
        clipped minibatch updates; returns the mean losses and diagnostics.

        On a CPU the heap's free pages go back to the operating system (:func:`~crslight.models.memory.release_heap`)
        before each micro-batch's forward pass, which follows a rollout or a backward pass that freed a lot, and when
        the backward pass reaches the input embedding: every activation is freed by then, and what is left is the
        embedding's gradient (with tied weights, two vocabulary-sized tensors) and, with ``optimizer_in_backward``,
        its AdamW step, which would otherwise be new memory on top of a heap full of freed pages.
        """
        hp = self.hparams
        opt = self.optimizers()
        n = samples.input_ids.shape[0]
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        if hp.item_ppo_epochs and exp.slot_advantages is not None:
            for key, value in self.update_items(samples, exp, opt.optimizer).items():
                sums[key] += value
                counts[key] += 1
        # DDP averages the gradients at every backward pass, so every rank takes as many minibatches and micro-batches
        # as the rank with the most replies (multi-turn episodes give ranks different numbers); a rank out of replies
        # takes empty ones
        most = n if self.trainer.world_size == 1 else int(
            self.trainer.strategy.reduce(torch.tensor(n, device=self.device), reduce_op="max"))
        for _ in range(hp.ppo_epochs):
            minibatches = self._minibatches(samples)
            if most > n:  # this rank's replies run out first: empty minibatches
                minibatches += [[] for _ in range(math.ceil(most / hp.minibatch_size) - len(minibatches))]
            for minibatch in minibatches:
                micro = self._micro_batches(samples, minibatch)
                if self.trainer.world_size > 1:  # as many micro-batches on every rank
                    micro += [[] for _ in range(math.ceil(hp.minibatch_size / hp.micro_batch_size) - len(micro))]
                for rows in micro:
                    if not rows:  # a zero loss on every trainable weight: this rank's share of DDP's gradient sync
                        self.manual_backward(0.0 * sum(p.sum() for p in self.trainable_parameters()))
                        continue
                    if self.device.type == "cpu":
                        release_heap()
                    losses = self.micro_step(samples, exp, rows)
                    check_loss(losses["loss"], "PPO", self.iterations, losses)
                    self.manual_backward(losses["loss"] * len(rows) / len(minibatch))
                    for key, value in losses.items():
                        sums[key] += float(value.detach())
                        counts[key] += 1
                # with optimizer_in_backward opt.step() is a no-op (no gradients are left) that Lightning counts
                optimizer_step(self, opt, hp.gradient_clip_val)
        return {key: torch.tensor(value / counts[key]) for key, value in sums.items()}

    def item_loss(self, item_logprobs: torch.Tensor, items: torch.Tensor, exp: Experience,
                  slots: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The item choice's loss at slots ``slots`` (indices into ``exp``'s ``slot_*`` rows) from their item
        distributions ``(s, n_items)``: the clipped surrogate of the item drawn and its alternatives (``items``
        ``(s, 1 + k)``) with their group advantages, plus beta times the exact KL to the reference's items."""
        new = item_logprobs.gather(1, items.to(self.device))
        loss, clipfrac, _ = ppo_policy_loss(new, exp.slot_logprobs[slots], exp.slot_advantages[slots],
                                            torch.ones_like(new), self.hparams.clip_range)
        kl = item_kl_divergence(item_logprobs, exp.slot_ref_logprobs[slots])
        stats = {"item_loss": loss.detach(), "item_clipfrac": clipfrac, "item_kl": kl.detach()}
        return loss + self.kl_controller.value * kl, stats

    def update_items(self, samples: Samples, exp: Experience, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """``item_ppo_epochs`` full-batch steps of the item scores alone on the rollout's slot states (cached by
        :meth:`rollout_logprobs`; the language model does not run). Returns the first step's statistics."""
        hp = self.hparams
        head = self.item_head
        table = self.policy.get_output_embeddings().weight.detach()  # the titles' rows: not trained here
        slots = torch.arange(len(samples.slots), device=self.device)
        first: dict[str, float] = {}
        for _ in range(hp.item_ppo_epochs):
            logprobs = self._item_logprobs(head, exp.slot_hidden, samples, table)
            loss, stats = self.item_loss(logprobs, samples.slot_items, exp, slots)
            optimizer.zero_grad()
            loss.backward()
            if self.trainer.world_size > 1:  # DDP does not see this backward pass: average the gradients here
                for param in head.parameters():
                    if param.grad is not None:
                        torch.distributed.all_reduce(param.grad)
                        param.grad /= self.trainer.world_size
            optimizer.step()  # only the item scores have gradients: nothing else moves
            optimizer.zero_grad()
            first = first or {key: float(value) for key, value in stats.items()}
        return first

    def micro_step(self, samples: Samples, exp: Experience, rows: list[int]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch (with grad)."""
        hp = self.hparams
        part = samples.select(rows)
        pick = exp.select(rows, part.input_ids.shape[1] - part.start)
        mask = pick.mask
        logprobs, _, values, item_logprobs, _ = self.forward(part, values=self.uses_critic)
        policy_loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, pick.logprobs, pick.advantages, mask,
                                                           hp.clip_range)
        out = {"policy_loss": policy_loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl}
        loss = policy_loss
        if exp.slot_advantages is not None and len(part.slots):  # the item choice, from its group of alternatives
            item_loss, stats = self.item_loss(item_logprobs, part.slot_items, exp,
                                              samples.slots_of(rows).to(self.device))
            loss = loss + item_loss
            out.update(stats)
        if self.uses_critic:
            value_loss = ppo_value_loss(values, pick.values, pick.returns, mask, hp.value_clip)
            loss = loss + hp.vf_coef * value_loss
            out["value_loss"] = value_loss.detach()
        elif self.kl_controller.value > 0:
            kl = masked_mean(kl_penalty(logprobs, pick.ref_logprobs, "k3"), mask)
            loss = loss + self.kl_controller.value * kl
        if self.item_head is not None and not len(part.slots):  # keeps DDP's gradient buckets complete
            loss = loss + 0.0 * sum(p.sum() for p in self.item_head.parameters())
        out["loss"] = loss
        return out

    def configure_optimizers(self):
        hp = self.hparams
        if self.item_head is not None and not self.item_head.reads_hidden:
            # scores fitted on the context alone (SFT's item_head_fits: context) stay so: their map W is not trained
            self.item_head.proj.weight.requires_grad_(False)
        # the item scores' per-item bias and context weights at item_lr; their map W (hidden x hidden) moves every
        # item's score at once and trains at the policy's rate
        head = ({id(p) for name, p in self.item_head.named_parameters() if not name.startswith("proj.")}
                if self.item_head is not None else set())
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in head]},
                  {"params": [p for p in self.trainable_parameters() if id(p) in head],
                   "lr": hp.item_lr if hp.item_lr is not None else hp.lr, "eps": ITEM_EPS}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, weight_decay=hp.weight_decay)
        allocate_adam_state(opt)
        for handle in self._step_hooks:  # from an earlier fit of this module
            handle.remove()
        self._step_hooks = []
        if hp.optimizer_in_backward:
            if self.trainer.world_size > 1 or str(self.trainer.precision).startswith("16"):
                raise ValueError(
                    "optimizer_in_backward needs one process and 32- or bf16 precision (DDP averages the gradients "
                    "and 16-bit precision unscales them after the backward pass, when the weights have moved): got "
                    f"--trainer.devices/num_nodes for {self.trainer.world_size} processes and precision "
                    f"{self.trainer.precision}")
            self._step_hooks = step_in_backward(opt)
        sched = LambdaLR(opt, lr_multiplier(hp.warmup_steps, 1, 1.0, "constant"))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_controller.state_dict(), "reward_moments": self.reward_moments.state_dict(),
                "iterations": self.iterations}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.reward_moments.load_state_dict(state["reward_moments"])
            self.iterations = int(state["iterations"])

