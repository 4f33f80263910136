"""PPOModule: short runs on the synthetic scenario with a tiny policy and a tiny R_phi, and its rollout pieces."""

import functools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from crslight.data.datamodules import Synthetic
from crslight.guards import NonFiniteError
from crslight.models.engine import Generation, Reply
from crslight.models.lora import LoRAConfig
from crslight.models.retrieval import decoder_of
from crslight.models.tokenize import encode_prompt
from crslight.modules.experience import RunningMoments, turn_returns
from crslight.modules.ppo import PPOModule, allocate_adam_state
from crslight.modules.rollout import EnginePolicy, pack
from crslight.signals import AcceptanceSignal
from crslight.signals.base import SignalExtractor
from crslight.simulator import PersonaSimulator

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(module, policy, steps=2, batch_size=4):
    seed_everything(0)
    data = Synthetic(task="prompts", tokenizer=policy, n_dialogues=30, batch_size=batch_size, max_length=96)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=steps, limit_val_batches=1,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize(
    "options",
    [
        {"lora": LoRAConfig(r=4), "simulator": "PersonaSimulator", "signals": [AcceptanceSignal()],
         "item_lr": 1e-2},
        {"critic": "separate", "reward_normalization": "zscore", "reward_clip": 3.0, "missing_eos_penalty": -1.0},
        {"advantage_estimator": "grpo", "group_size": 2, "simulator": "PersonaSimulator", "kl_estimator": "k3"},
    ],
    ids=["lora-simulator", "single-turn-separate-critic", "grpo"],
)
def test_ppo_smoke(tiny_recommender, tiny_reward, options):
    tiny_policy = tiny_recommender  # recommends items from the start, so PPO's step reaches the item scores too
    module = PPOModule(model=tiny_policy, reward_model=tiny_reward, max_turns=2, max_new_tokens=8, minibatch_size=4,
                       micro_batch_size=2, ppo_epochs=2, lr=1e-3, kl_target=2.0, **options)
    module.configure_model()
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    trainer = _fit(module, tiny_policy)
    assert trainer.global_step > 0
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not change"
    metrics = {k.removeprefix("train/"): v.item() for k, v in trainer.callback_metrics.items() if "val/" not in k}
    expected = {"score", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "response_length", "policy_loss"}
    if options.get("simulator"):
        expected |= {"accept", "satisfaction", "turns"}
    if options.get("advantage_estimator") != "grpo":
        expected |= {"value_loss", "value"}
    assert expected <= metrics.keys()
    assert {f"val/{key}" for key in ("score", "kl", "response_length")} <= trainer.callback_metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0 < metrics["response_length"] <= 8
    assert metrics["learning_replies"] > 0  # R_phi scores every reply differently: every step has advantages
    assert module.iterations == 2 and metrics["kl_coef"] != 0.05


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_reference_equals_policy_at_start(tiny_policy, tiny_tokenizer, lora):
    module = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], lora=LoRAConfig(r=4) if lora else None,
                       micro_batch_size=2)
    module.configure_model()
    prompts = [tiny_tokenizer("Hi, a comedy please")["input_ids"], tiny_tokenizer("Something calm?")["input_ids"][:3]]
    replies = [[100, 200, 2], [300, 2]]
    samples = pack(prompts, replies, tiny_tokenizer.pad_token_id)
    rollout = module.rollout_logprobs(samples)
    mask = samples.response_mask[:, samples.start :].bool()
    assert torch.equal(rollout.logprobs[mask], rollout.ref_logprobs[mask])
    assert rollout.values.shape == mask.shape
    # the reference costs no second model with LoRA, and the value head rides on the policy's backbone
    policy_size = sum(p.numel() for p in module.policy.parameters())
    assert sum(p.numel() for p in module.parameters()) == policy_size + module.value_head.proj.weight.numel() + 1
    assert (module.reference is None) == lora


def test_pack_lays_replies_out_from_one_column():
    samples = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert samples.start == 3
    assert samples.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert samples.response_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert samples.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    one = samples.select([0])  # padding columns dropped on both sides
    assert one.input_ids.tolist() == [[5, 6, 7, 1, 2]] and one.start == 3
    two = samples.select([1])
    assert two.input_ids.tolist() == [[8, 3, 4, 9]] and two.start == 1


def test_turn_returns_by_hand():
    # episode 0: scores [1, 0, 2] over turns 0..2 with discount 0.5 -> G2 = 2, G1 = 1, G0 = 1.5; episode 1: one turn
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0])
    returns = turn_returns(scores, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0]), discount=0.5)
    assert returns.tolist() == [1.5, 1.0, 2.0, -1.0]


def test_running_moments_match_the_whole_sample():
    moments = RunningMoments()
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, -3.0])
    moments.update(values[:2])
    moments.update(values[2:])
    assert moments.mean == pytest.approx(values.mean().item())
    assert moments.std == pytest.approx(values.std(unbiased=False).item(), rel=1e-6)


class _FakeEngine:
    """``generate`` that answers each prompt with its length and an end-of-turn token; recommends nothing."""

    model = torch.nn.Linear(1, 1)

    def generate(self, prompts, exclude, generator, contexts=None):
        return [Generation([p[0], 2], [True, True]) for p in prompts]

    def decode(self, generation):
        return f"reply{generation.tokens[0]}"


def test_engine_policy_matches_replies_to_episode_steps():
    recorder = EnginePolicy(_FakeEngine(), encode=lambda turns: [len(turns)], item_ids=["a", "b"], record=True)
    replies = recorder([[{"items": []}], [{"items": []}, {"items": ["b"]}]])  # step 0: episodes 0 and 1
    assert replies == ["reply1", "reply2"] and all(isinstance(r, Reply) and r.items == [] for r in replies)
    recorder([[{"items": []}] * 3])  # step 1: episode 1 only
    episodes = [SimpleNamespace(index=0, transitions=[SimpleNamespace(reply="reply1")]),
                SimpleNamespace(index=1, transitions=[SimpleNamespace(reply="reply2"), SimpleNamespace(reply="reply3")])]
    steps = recorder.match(episodes)
    assert [[prompt for prompt, _, _ in s] for s in steps] == [[[1]], [[2], [3]]]
    episodes[1].transitions[1].reply = "something else"
    with pytest.raises(RuntimeError, match="does not match"):
        recorder.match(episodes)


REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(REPO.glob("configs/*/ppo.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.parent.name for p in CONFIGS])
def test_ppo_configs_instantiate(path, monkeypatch):
    from jsonargparse import set_docstring_parse_options
    from lightning.pytorch import LightningDataModule, LightningModule

    from crslight.lightning_cli import CRSLightningCLI, _import_parts
    monkeypatch.chdir(REPO)
    set_docstring_parse_options(attribute_docstrings=True)
    _import_parts()
    cli = CRSLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, auto_configure_optimizers=False, args=["-c", str(path), "--trainer.logger=false"])
    module = cli.model
    assert isinstance(module, PPOModule) and cli.datamodule.task == "prompts"
    assert module.hparams.init_from.startswith("runs/sft/") and module.hparams.reward_model.startswith("runs/reward/")
    if path.parent.name == "synthetic":  # a class path with its arguments, built with the split's catalogue in setup
        from crslight.data import load_corpus

        user = module.simulator(load_corpus("synthetic", None, "test", n_dialogues=10, n_items=40).catalogue)
        assert isinstance(user, PersonaSimulator) and (user.noise, user.leave_step) == (0.3, 0.15)
    else:
        assert module.simulator == "auto"  # the dataset's default (crslight.simulator.env.default_simulator)
    assert len(module.signals) == len(module.signal_weights)
    assert len(CONFIGS) == 4  # logs, opendialkg, redial, synthetic


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preallocated_adam_state_gives_the_same_steps(amsgrad):
    torch.manual_seed(0)
    lazy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    eager = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    eager.load_state_dict(lazy.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.01, amsgrad=amsgrad) for m in (lazy, eager)]
    allocate_adam_state(opts[1])
    assert all(opts[1].state[p]["exp_avg"].abs().sum() == 0 for p in eager.parameters())  # there before any step
    assert not opts[0].state
    for _ in range(3):
        x = torch.randn(5, 4)
        for model, opt in zip((lazy, eager), opts, strict=True):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(lazy.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opts[1].state_dict()["state"][0]["step"] == opts[0].state_dict()["state"][0]["step"] == 3


def test_optimizer_in_backward_gives_the_same_steps(tiny_policy, tiny_reward):
    """Stepping each weight inside the backward pass changes the memory peak, not the training: bit for bit."""
    modules = []
    for in_backward in (False, True):
        module = PPOModule(model=tiny_policy, reward_model=tiny_reward, max_new_tokens=8, minibatch_size=2,
                           micro_batch_size=2, ppo_epochs=2, lr=1e-3, gradient_clip_val=None, weight_decay=0.01,
                           optimizer_in_backward=in_backward)
        trainer = _fit(module, tiny_policy)
        assert trainer.global_step == 2 * 2 * 2  # 2 PPO steps x 2 epochs x 2 minibatches, counted either way
        assert all(p.grad is None for p in module.parameters())
        modules.append(module)
    plain, fused = modules
    assert len(fused._step_hooks) == len(plain.trainable_parameters()) and not plain._step_hooks
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b), name
    state = fused.trainer.optimizers[0].state_dict()["state"]
    assert all(float(s["step"]) == 8 for s in state.values())


@pytest.mark.parametrize(
    "options",
    [{"micro_batch_size": 2, "minibatch_size": 4, "gradient_clip_val": None}, {"gradient_clip_val": 1.0}],
    ids=["accumulation", "clipping"],
)
def test_optimizer_in_backward_refuses_what_it_cannot_do(options):
    with pytest.raises(ValueError, match=r"optimizer_in_backward .*micro_batch_size .*gradient_clip_val"):
        PPOModule(optimizer_in_backward=True, **options)


def test_expected_item_score_needs_item_groups():
    with pytest.raises(ValueError, match=r"expected_item_score .*item_alternatives to 1 or more \(got 0\)"):
        PPOModule(expected_item_score=True)


@pytest.mark.parametrize(("world_size", "precision"), [(2, "32-true"), (1, "16-mixed")])
def test_optimizer_in_backward_refuses_ddp_and_gradient_scaling(tiny_policy, world_size, precision):
    module = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], micro_batch_size=8, gradient_clip_val=None,
                       optimizer_in_backward=True)
    module.configure_model()
    module._trainer = SimpleNamespace(world_size=world_size, precision=precision)  # what configure_optimizers reads
    with pytest.raises(ValueError, match=rf"optimizer_in_backward needs one process.*{world_size} processes.*"
                                         rf"precision {precision}"):
        module.configure_optimizers()
    assert not module._step_hooks


def test_heap_released_before_each_update_micro_batch_and_embedding_backward(tiny_policy, tiny_reward, monkeypatch):
    import crslight.modules.ppo as ppo

    calls = []
    monkeypatch.setattr(ppo, "release_heap", lambda: calls.append(torch.is_grad_enabled()) or True)
    module = PPOModule(model=tiny_policy, reward_model=tiny_reward, max_new_tokens=4, minibatch_size=2,
                       micro_batch_size=1, ppo_epochs=1, gradient_clip_val=None)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    seed_everything(0)
    trainer.fit(module, Synthetic(task="prompts", tokenizer=tiny_policy, n_dialogues=30, batch_size=4, max_length=96))
    # 4 micro-batches of 1 reply: one release before each forward pass (grad mode on), one inside each backward pass
    # (autograd runs hooks with grad mode off); none in the rollout's no-grad passes or in validation
    assert calls == [True, False] * 4


def test_length_grouped_micro_batches_give_the_same_experience(tiny_policy, tiny_tokenizer):
    """Sorting rows by length into micro-batches (and cutting their padding) changes no row's log-probabilities, and
    an epoch's minibatches cover every row once, each of rows of similar length."""
    torch.manual_seed(0)
    lengths = [3, 30, 5, 28, 4, 31]  # short and long prompts alternate, as first and second turns do
    prompts = [torch.randint(10, 200, (n,)).tolist() for n in lengths]
    replies = [[100 + i, 2] for i in range(len(prompts))]
    samples = pack(prompts, replies, tiny_tokenizer.pad_token_id)
    grouped = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], micro_batch_size=3, minibatch_size=3,
                        group_by_length=True)
    grouped.configure_model()
    plain = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], micro_batch_size=1, minibatch_size=3,
                      group_by_length=False)
    plain.configure_model()
    plain.load_state_dict(grouped.state_dict())
    assert [len(grouped._micro_batches(samples)[0])] == [3] and sorted(grouped._micro_batches(samples)[0]) == [0, 2, 4]
    got, want = grouped.rollout_logprobs(samples), plain.rollout_logprobs(samples)
    mask = samples.response_mask[:, samples.start :].bool()
    for key in ("logprobs", "ref_logprobs", "entropy", "values"):
        torch.testing.assert_close(getattr(got, key)[mask], getattr(want, key)[mask], rtol=1e-4, atol=1e-4)
    minibatches = grouped._minibatches(samples)
    assert sorted(row for batch in minibatches for row in batch) == list(range(6))
    assert sorted(sorted(batch) for batch in minibatches) == [[0, 2, 4], [1, 3, 5]]


def test_recommendation_is_the_drawn_item_and_part_of_the_action(tiny_recommender, tiny_tokenizer):
    """The item a reply names is the one the policy's item scores drew, and its log-probability is in the action's."""
    from crslight.data.synthetic import generate
    from crslight.models.retrieval import ItemHead, decoder_of, previous_mask

    dialogues, catalogue = generate(seed=0, n_dialogues=6, n_items=20)
    names, ids = [c["name"] for c in catalogue], [c["item_id"] for c in catalogue]
    module = PPOModule(model=tiny_recommender, signals=[AcceptanceSignal()], lora=LoRAConfig(r=4), micro_batch_size=4,
                       item_temperature=0.7)
    module.configure_model()
    module.item_head = ItemHead.for_catalogue(module.policy, tiny_tokenizer, names)
    module.configure_model()  # gives the reference its copy of the item scores
    torch.manual_seed(0)
    engine = module.engine(max_new_tokens=12, item_temperature=0.7)
    assert engine.item_head is None  # no DataModule, no catalogue: the module's own engine cannot recommend
    from crslight.models.engine import Engine

    engine = Engine(module.policy, tiny_tokenizer, module.item_head, names, max_new_tokens=12, item_temperature=0.7)
    name_of = dict(zip(ids, names, strict=True))
    policy = EnginePolicy(engine, lambda turns: encode_prompt(tiny_tokenizer, turns, names=name_of), ids, seed=0,
                          record=True)
    # each context already mentions an item: it is never drawn again; four replies to each, so that some recommend
    contexts = [d["turns"][:3] for d in dialogues] * 4
    replies = policy(contexts)
    prompts, generations = [p for p, _, _ in policy.calls[0]], [g for _, g, _ in policy.calls[0]]
    recommending = [k for k, g in enumerate(generations) if g.slots]
    assert recommending, "the tiny recommender should recommend in some of 24 replies"
    for k in recommending:
        assert replies[k].items == [ids[row] for row in generations[k].items]
        for item in replies[k].items:
            assert name_of[item] in replies[k]
            assert item not in {i for turn in contexts[k] for i in turn["items"]}
    samples = pack(prompts, generations, tiny_tokenizer.pad_token_id)
    assert len(samples.slots) == sum(len(g.slots) for g in generations)
    rollout = module.rollout_logprobs(samples)
    mask = samples.response_mask[:, samples.start :].bool()
    assert torch.equal(rollout.logprobs[mask], rollout.ref_logprobs[mask])  # the reference starts as the policy
    # by hand: the slot token's log-probability plus the item's under the scores at the slot state (temperature 0.7)
    row, column, item = samples.slots[0].tolist()
    with torch.no_grad():
        part = samples.select([row])
        inputs = {"input_ids": part.input_ids, "attention_mask": part.attention_mask,
                  "position_ids": (part.attention_mask.cumsum(-1) - 1).clamp(min=0)}
        logits = module.policy(**inputs).logits[0]
        hidden = decoder_of(module.policy)(**inputs).last_hidden_state[0]
        slot_column = column - samples.start + part.start
        token = torch.log_softmax(logits[slot_column - 1].float(), -1)[part.input_ids[0, slot_column]]
        previous = samples.slot_exclude[:1]
        excluded = previous_mask(previous, len(names))
        scores = module.item_head(hidden[slot_column][None], module.policy.get_output_embeddings().weight,
                                  previous).float()
        drawn = torch.log_softmax((scores / 0.7).masked_fill(excluded, float("-inf")), -1)[0, item]
    assert rollout.logprobs[row, column - samples.start] == pytest.approx(float(token + drawn), abs=1e-4)
    assert not samples.response_mask[row, column + 1]  # the title's first token is written in, not an action


class _NamesItemSignal(SignalExtractor):
    """1 when the reply recommends ``item``, else 0: a reward that only the item choice can earn."""

    range = (0.0, 1.0)
    unit = "indicator"

    def __init__(self, item: str):
        self.item = item

    def extract(self, batch):
        return [float(self.item in items) for items in batch.items]


def _record_metric(module, key: str) -> list[float]:
    """The list that each PPO iteration of ``module`` appends its scored rollout's metric ``key`` to."""
    values = []
    score = module.score

    def recording_score(rollout):
        episodes = score(rollout)
        values.append(episodes.metrics[key])
        return episodes

    module.score = recording_score
    return values


def _recommender_run(tiny_recommender, iterations, text_turns=0, **options):
    """A tiny PPO module over the synthetic scenario's simulator, with item scores built as SFT would, its data and
    trainer."""
    from crslight.models.retrieval import ItemHead

    seed_everything(0)
    data = Synthetic(task="prompts", tokenizer=tiny_recommender, n_dialogues=40, n_items=12, batch_size=2,
                     max_length=96)
    options = {"ppo_epochs": 2, "lr": 1e-4, "item_lr": 0.3, **options}
    module = PPOModule(model=tiny_recommender, simulator="PersonaSimulator", max_turns=1, max_new_tokens=4,
                       minibatch_size=8, micro_batch_size=8, kl_coef=0.0, lora=LoRAConfig(r=4),
                       advantage_estimator="grpo", group_size=4, kl_estimator="k3", **options)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=iterations, limit_val_batches=0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    module.configure_model()
    catalogue = data.corpus("train").catalogue
    module.item_head = ItemHead.for_catalogue(module.policy, module.tokenizer, catalogue["name"],
                                              catalogue["attributes"], text_turns=text_turns).requires_grad_(True)
    return module, data, trainer


@pytest.mark.parametrize("text_turns", [0, 2], ids=["hidden-state", "with-text"])
def test_rollouts_draw_items_at_the_item_temperature(tiny_recommender, text_turns):
    """The rollout's draws (the item and its alternatives) come from the distribution PPO scores them with: at an
    item temperature near 0, each is that distribution's most likely item; also when the scores read the context's
    words (the rollout's context embeddings travel with its samples)."""
    module, data, trainer = _recommender_run(tiny_recommender, 1, text_turns, signals=[AcceptanceSignal()],
                                             item_temperature=1e-4, item_alternatives=4)
    if text_turns:
        with torch.no_grad():
            module.item_head.text_scale.fill_(20.0)  # the words weigh as much as the hidden state
    drawn = []
    collect = module.collect

    def recording_collect(batch, *args):
        episodes = collect(batch, *args)
        with torch.no_grad():
            best = module.forward(episodes.samples).item_logprobs.argmax(-1, keepdim=True)
        drawn.append((episodes.samples.slot_items, best))
        return episodes

    module.collect = recording_collect
    trainer.fit(module, data)
    items, best = drawn[0]
    assert items.shape == (len(best), 5) and len(best) >= 4
    assert (items == best).float().mean() > 0.95


@pytest.mark.parametrize("options", [{}, {"item_alternatives": 8},
                                     {"item_alternatives": 8, "item_ppo_epochs": 2, "ppo_epochs": 0}],
                         ids=["episode-return", "item-groups", "item-groups-only"])
def test_ppo_moves_the_recommendation_towards_what_is_rewarded(tiny_recommender, options):
    """A seeded tiny GRPO run whose reward is earned only by recommending one item: afterwards the policy's item scores
    draw that item far more often than before, and the reward of its last iterations is well above its first; the
    same when the item choice learns from groups of alternatives shown to the same user, and when only the item
    scores train, on the rollouts' cached slot states (the language model's weights do not move)."""
    target = "syn5"
    module, data, trainer = _recommender_run(tiny_recommender, 14, signals=[_NamesItemSignal(target)], **options)
    lora = {name: p.detach().clone() for name, p in module.policy.named_parameters() if p.requires_grad}
    row = data.corpus("train").catalogue["item_id"].index(target)

    def target_probability() -> float:
        prompts = [data.encode_prompt(turns[:1]) + [data.tokenizer.convert_tokens_to_ids("<|item|>")]
                   for turns in data.corpus("valid").dialogues["turns"][:16]]
        with torch.no_grad():
            probs = [module.item_head.log_probs(
                decoder_of(module.policy)(input_ids=torch.tensor([p])).last_hidden_state[:, -1],
                module.policy.get_output_embeddings().weight).exp()[0, row] for p in prompts]
        return float(torch.stack(probs).mean())

    rewards = _record_metric(module, f"signal/{_NamesItemSignal.__name__}")
    module.policy.eval()
    before = target_probability()
    trainer.fit(module, data)
    module.policy.eval()
    after = target_probability()
    assert after > 3 * before and after > 0.3, (before, after)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, str(rewards) + str((before, after))
    moved = [name for name, p in module.policy.named_parameters() if p.requires_grad and not torch.equal(p, lora[name])]
    assert (not moved) == (options.get("ppo_epochs") == 0), moved


def test_expected_item_scores_teach_the_words_to_recommend(tiny_recommender):
    """The item scores frozen (``item_lr: 0``) and flat over 12 items, one of which alone earns the reward: a reply
    that recommends earns it in one draw in twelve. Scored in expectation over its item group, every reply that
    recommends scores above one that does not, so the words learn to recommend nearly always; scored by its one
    draw, the same seeded run learns far less."""

    def named_per_iteration(expected: bool) -> list[float]:
        module, data, trainer = _recommender_run(tiny_recommender, 12, signals=[_NamesItemSignal("syn5")],
                                                 item_lr=0.0, item_alternatives=8, expected_item_score=expected,
                                                 lr=1e-3)
        with torch.no_grad():
            module.item_head.bias.zero_()
            module.item_head.proj.weight.zero_()
        named = _record_metric(module, "items_named")
        trainer.fit(module, data)
        return named

    expected, drawn = named_per_iteration(True), named_per_iteration(False)
    late = lambda named: sum(named[-6:]) / 6  # noqa: E731
    assert expected[0] == drawn[0] < 0.8, (expected, drawn)  # the same first rollout: about half the replies
    assert late(expected) > 0.9 and late(expected) > late(drawn) + 0.2, (expected, drawn)


def test_item_scores_fitted_on_the_context_alone_keep_their_zero_map(tiny_recommender):
    """Scores that SFT fitted without the hidden state (``item_head_fits: context``: the map W is zero) stay so under
    PPO, which moves their other parts (so the rlhf ranking, like the SFT one, needs no pass of the policy)."""
    module, data, trainer = _recommender_run(tiny_recommender, 3, signals=[_NamesItemSignal("syn5")],
                                             item_alternatives=8)
    module.item_head.proj.weight.data.zero_()
    bias = module.item_head.bias.detach().clone()
    trainer.fit(module, data)
    assert not module.item_head.reads_hidden
    assert not torch.equal(module.item_head.bias, bias)


def test_setup_builds_each_environment_once_through_the_factory(tiny_policy, monkeypatch):
    import crslight.modules.ppo as ppo

    calls = []

    def build_environment(corpus, *args, **kwargs):
        calls.append((corpus.split, args, kwargs))
        return corpus.split

    monkeypatch.setattr(ppo, "build_environment", build_environment)
    data = Synthetic(task="prompts", tokenizer=tiny_policy, n_dialogues=30)
    persona = functools.partial(PersonaSimulator, leave_step=0.5)  # what a config's class_path + init_args give
    module = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], simulator=persona, max_turns=4, env_seed=7)
    module._trainer = SimpleNamespace(datamodule=data)  # what setup reads
    module.setup("fit")
    module.setup("validate")  # built already
    options = {"root": None, "max_turns": 4, "seed": 7}
    assert calls == [(s, (persona,), options) for s in ("train", "valid")]
    assert module.environments == {"fit": "train", "validate": "valid"}
    single = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()])
    single._trainer = SimpleNamespace(datamodule=data)
    single.setup("fit")  # no simulator: one reply per prompt, no environment
    assert single.environments == {"fit": None, "validate": None} and len(calls) == 2


class _InfiniteSignal(SignalExtractor):
    """A broken signal plugin: +inf for every reply."""

    def extract(self, batch):
        return [math.inf] * len(batch)


def test_a_non_finite_reward_stops_ppo_before_it_reaches_the_weights(tiny_policy):
    module = PPOModule(model=tiny_policy, signals=[_InfiniteSignal()], reward_normalization="none", max_new_tokens=8,
                       minibatch_size=4, micro_batch_size=2, lr=1e-2)
    module.configure_model()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    with pytest.raises(NonFiniteError, match="signal _InfiniteSignal gave non-finite scores: 4 of 4 values are \\+inf"):
        _fit(module, tiny_policy, steps=1)
    assert all(torch.equal(param, before[name]) for name, param in module.named_parameters())


def test_a_non_finite_loss_stops_ppo_before_the_optimizer_steps(tiny_policy, monkeypatch):
    module = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], simulator="PersonaSimulator", max_turns=1,
                       max_new_tokens=8, minibatch_size=4, micro_batch_size=2, lr=1e-2)
    module.configure_model()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    step = module.micro_step
    monkeypatch.setattr(module, "micro_step", lambda *a: {**step(*a), "loss": step(*a)["loss"] * math.nan})
    with pytest.raises(NonFiniteError, match="PPO: the loss at optimizer step 0 is nan"):
        _fit(module, tiny_policy, steps=1)
    assert all(torch.equal(param, before[name]) for name, param in module.named_parameters())


def test_ppo_warns_when_a_step_gives_the_words_no_advantage(tiny_policy):
    # the tiny policy never recommends, so no simulated user accepts: every GRPO group's rewards are alike (all 0)
    module = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], simulator="PersonaSimulator", max_turns=1,
                       advantage_estimator="grpo", group_size=2, max_new_tokens=8, minibatch_size=4,
                       micro_batch_size=4)
    module.configure_model()
    with pytest.warns(UserWarning, match="PPO iteration 0: every reply's advantage is 0") as record:
        trainer = _fit(module, tiny_policy, steps=2)
    assert sum("advantage is 0" in str(w.message) for w in record) == 1  # once per run
    assert trainer.callback_metrics["train/learning_replies"].item() == 0.0
