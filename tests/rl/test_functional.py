import math
import random

import pytest
import torch

from crslight.rl.functional import (
    entropy_from_logits,
    gae,
    group_normalized_advantages,
    kl_penalty,
    last_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_masked_positions_even_nan():
    # (1 + 3) / 2 = 2; the NaN under the mask must not leak in
    assert masked_mean(t(1.0, float("nan"), 3.0), torch.tensor([1, 0, 1])) == pytest.approx(2.0)
    assert masked_sum(t(1.0, float("inf"), 3.0), torch.tensor([True, False, True])) == pytest.approx(4.0)


def test_masked_mean_per_row_and_empty_mask():
    values = t(1.0, 2.0, 3.0).repeat(2, 1) + t(0.0, 3.0).unsqueeze(1)  # [[1, 2, 3], [4, 5, 6]]
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    # row 0: (1 + 2) / 2 = 1.5; row 1: 6 / 1 = 6
    torch.testing.assert_close(masked_mean(values, mask, dim=1), t(1.5, 6.0))
    # an empty mask gives 0, not NaN
    assert masked_mean(t(1.0, 2.0, 3.0), torch.zeros(3)) == 0.0


def test_masked_var():
    # [1, 2, 4]: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    # biased 42/27 = 14/9, unbiased 42/18 = 7/3
    values = t(1.0, 2.0, 4.0)
    assert masked_var(values, torch.ones(3), unbiased=False) == pytest.approx(14 / 9)
    assert masked_var(values, torch.ones(3)) == pytest.approx(7 / 3)
    # mask [1, 0, 1]: values 1 and 4, mean 2.5, deviations +-1.5 -> biased 2.25, unbiased 4.5
    assert masked_var(values, torch.tensor([1, 0, 1])) == pytest.approx(4.5)
    # one element: no Bessel blow-up, variance 0
    assert masked_var(values, torch.tensor([0, 1, 0])) == 0.0


def test_masked_whiten():
    # [2, 4, 6]: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> [-1, 0, 1]
    values, ones = t(2.0, 4.0, 6.0), torch.ones(3)
    torch.testing.assert_close(masked_whiten(values, ones), t(-1.0, 0.0, 1.0))
    # shift_mean=False keeps the mean 4: [3, 4, 5]
    torch.testing.assert_close(masked_whiten(values, ones, shift_mean=False), t(3.0, 4.0, 5.0))
    # [2, 100, 6] with the middle masked: mean 4, unbiased var 8 -> (+-2) / sqrt(8) = +-1/sqrt(2); masked -> 0
    whitened = masked_whiten(t(2.0, 100.0, 6.0), torch.tensor([1, 0, 1]))
    torch.testing.assert_close(whitened, t(-(0.5**0.5), 0.0, 0.5**0.5))


# ----------------------------------------------------------------------------- log-probs, entropy, KL


def test_logprobs_from_logits_hand_worked():
    # logits log([1, 2, 1]) -> softmax [1/4, 1/2, 1/4]; labels 1, 0 -> log 1/2, log 1/4
    logits = torch.log(t(1.0, 2.0, 1.0)).repeat(1, 2, 1)  # (1, 2, 3)
    torch.testing.assert_close(
        logprobs_from_logits(logits, torch.tensor([[1, 0]])), t(math.log(0.5), math.log(0.25))[None]
    )
    # temperature 2 on log([1, 4, 1]) gives log([1, 2, 1]) again: label 1 -> log 1/2
    hot = torch.log(t(1.0, 4.0, 1.0)).view(1, 1, 3)
    assert logprobs_from_logits(hot, torch.tensor([[1]]), temperature=2.0).item() == pytest.approx(math.log(0.5))


def test_logprobs_from_logits_matches_log_softmax_and_upcasts_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    got = logprobs_from_logits(logits, labels)
    torch.testing.assert_close(got, expected)
    got.sum().backward()  # differentiable
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    low = logprobs_from_logits(logits.detach().bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected.detach(), atol=0.05, rtol=0.0)
    # the -100 ignore index does not crash (value is meaningless and must be masked by the caller)
    assert logprobs_from_logits(logits, torch.full((3, 5), -100)).shape == (3, 5)


def test_entropy_from_logits():
    # uniform over 3 -> ln 3; [1/4, 1/2, 1/4] -> -(2 * 1/4 * ln 1/4 + 1/2 * ln 1/2) = 1.5 ln 2
    logits = torch.stack([torch.zeros(3), torch.log(t(1.0, 2.0, 1.0))]).unsqueeze(0)  # (1, 2, 3)
    torch.testing.assert_close(entropy_from_logits(logits), t(math.log(3), 1.5 * math.log(2))[None])


def test_kl_penalty_estimators():
    logprobs, ref_logprobs = t(-1.0, -2.0, -3.0), t(-2.0, -2.0, -1.0)
    # d = logprobs - ref = [1, 0, -2]
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), t(1.0, 0.0, -2.0))
    # k3 = exp(-d) - 1 + d = [e^-1, 0, e^2 - 3], never negative
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), t(math.exp(-1), 0.0, math.exp(2) - 3))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, ref_logprobs, "k2")


def test_kl_estimators_are_unbiased_for_sampled_tokens():
    # sampling from p, both E[k1] and E[k3] equal KL(p || q)
    p, q = t(0.5, 0.3, 0.2), t(0.2, 0.3, 0.5)
    exact = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        assert kl_penalty(logp, logq, estimator).mean() == pytest.approx(exact.item(), abs=0.01)


# ----------------------------------------------------------------------------- rewards and GAE


def test_last_index():
    # left-padded, right-padded, interleaved, empty
    mask = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 1], [0, 0, 0]])
    assert last_index(mask).tolist() == [2, 1, 2, 0]


def test_per_token_rewards():
    # row 0: prompt then two reply tokens, d = [-, 1, 0.5]; row 1: right padded, d = [2, -1, -]
    scores = t(1.0, -2.0)
    ref = torch.zeros(2, 3)
    logprobs = torch.tensor([[7.0, 1.0, 0.5], [2.0, -1.0, 9.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    rewards, kl = per_token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # row 0: [0, -0.1 * 1, -0.1 * 0.5 + 1] = [0, -0.1, 0.95]
    # row 1: [-0.1 * 2, -0.1 * -1 - 2, 0] = [-0.2, -1.9, 0]
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, 0.95], [-0.2, -1.9, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([[0.0, 1.0, 0.5], [2.0, -1.0, 0.0]]))
    # a row without response tokens gets nothing, not its score at position 0
    rewards, _ = per_token_rewards(t(5.0), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), kl_coef=0.1)
    assert rewards.abs().sum() == 0


def test_gae_hand_worked():
    # gamma 0.9, lam 0.5, rewards [1, 0, 2], values [1, 2, 3], V after the end = 0
    # t=2: delta = 2 + 0 - 3 = -1;          A2 = -1
    # t=1: delta = 0 + 0.9*3 - 2 = 0.7;     A1 = 0.7 + 0.45 * -1 = 0.25
    # t=0: delta = 1 + 0.9*2 - 1 = 1.8;     A0 = 1.8 + 0.45 * 0.25 = 1.9125
    advantages, returns = gae(t(1.0, 0.0, 2.0)[None], t(1.0, 2.0, 3.0)[None], torch.ones(1, 3), gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, t(1.9125, 0.25, -1.0)[None])
    torch.testing.assert_close(returns, t(2.9125, 2.25, 2.0)[None])  # A + V


def test_gae_skips_masked_positions():
    # mask [1, 0, 1]: the middle (a user turn) is skipped, so token 0's next state is token 2
    # t=2: A2 = 2 - 3 = -1;  t=0: delta = 1 + 0.9*3 - 1 = 2.7, A0 = 2.7 + 0.45 * -1 = 2.25
    advantages, returns = gae(t(1.0, 99.0, 2.0)[None], t(1.0, 99.0, 3.0)[None], torch.tensor([[1, 0, 1]]), 0.9, 0.5)
    torch.testing.assert_close(advantages, t(2.25, 0.0, -1.0)[None])
    torch.testing.assert_close(returns, t(3.25, 0.0, 2.0)[None])


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain python: standard GAE on the list of response positions of each row."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        steps = [i for i, m in enumerate(mask[b]) if m]
        last = 0.0
        for k in reversed(range(len(steps))):
            i = steps[k]
            next_value = values[b][steps[k + 1]] if k + 1 < len(steps) else 0.0
            delta = rewards[b][i] + gamma * next_value - values[b][i]
            last = delta + gamma * lam * last
            advantages[b][i] = last
    return advantages


@pytest.mark.parametrize("layout", ["right_padded", "random"])
def test_gae_matches_python_loop(layout):
    rng = random.Random(0)
    b, length = 6, 12
    mask = torch.zeros(b, length, dtype=torch.bool)
    for row in range(b):
        if layout == "right_padded":
            start, end = rng.randrange(0, 4), rng.randrange(5, length + 1)
            mask[row, start:end] = True
        else:
            mask[row] = torch.tensor([rng.random() < 0.6 for _ in range(length)])
    gen = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(b, length, generator=gen), torch.randn(b, length, generator=gen)
    advantages, returns = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    expected = torch.tensor(reference_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.97, 0.9))
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.where(mask, expected + values, 0.0))
    if layout == "right_padded":  # TRL's recursion over the whole row with zeroed rewards/values agrees
        last, trl = torch.zeros(b), torch.zeros(b, length)
        r, v = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
        for i in reversed(range(length)):
            next_v = v[:, i + 1] if i + 1 < length else torch.zeros(b)
            last = r[:, i] + 0.97 * next_v - v[:, i] + 0.97 * 0.9 * last
            trl[:, i] = last
        torch.testing.assert_close(advantages, torch.where(mask, trl, 0.0))


# ----------------------------------------------------------------------------- PPO losses


def test_ppo_policy_loss_hand_worked():
    # ratios [1.5, 0.5, 1.0], advantages [1, 1, -1], clip 0.2
    # t0: -1 * 1.5 = -1.5 vs -1 * 1.2 = -1.2 -> max -1.2 (clip active)
    # t1: -1 * 0.5 = -0.5 vs -1 * 0.8 = -0.8 -> max -0.5
    # t2:  1 * 1.0 =  1.0 vs  1 * 1.0 =  1.0 -> 1.0
    # loss = (-1.2 - 0.5 + 1) / 3 = -0.7 / 3; clipfrac 1/3
    old = t(-1.0, -1.0, -1.0)
    logprobs = (old + torch.log(t(1.5, 0.5, 1.0))).requires_grad_()
    advantages, mask = t(1.0, 1.0, -1.0), torch.ones(3)
    loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(-0.7 / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    # k3 of KL(old || new): ratio - 1 - log ratio = [0.5 - ln 1.5, -0.5 + ln 2, 0], mean over 3
    assert approx_kl.item() == pytest.approx((0.5 - math.log(1.5) - 0.5 + math.log(2)) / 3)
    assert not clipfrac.requires_grad and not approx_kl.requires_grad
    # d loss / d logprob = -A * ratio / 3 where unclipped, 0 where clipped: [0, -0.5/3, 1/3]
    loss.backward()
    torch.testing.assert_close(logprobs.grad, t(0.0, -0.5 / 3, 1 / 3))


def test_ppo_policy_loss_masks_and_clips_negative_advantages():
    # ratio 0.5 with A = -1: 0.5 vs 0.8 -> 0.8 (clip active); the masked token is ignored
    old = torch.zeros(3)
    logprobs = torch.log(t(0.5, 1.0, 3.0))
    loss, clipfrac, _ = ppo_policy_loss(logprobs, old, t(-1.0, 2.0, 100.0), torch.tensor([1, 1, 0]), clip=0.2)
    # (0.8 + -2.0) / 2 = -0.6; one of two tokens clipped
    assert loss.item() == pytest.approx(-0.6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_ppo_value_loss_hand_worked():
    # values [1, 2, 3], old [1.5, 1.5, 3], returns [2, 3, 0], clip 0.2
    # t0: clipped 1.5 - 0.2 = 1.3: (1 - 2)^2 = 1    vs (1.3 - 2)^2 = 0.49 -> 1
    # t1: clipped 1.5 + 0.2 = 1.7: (2 - 3)^2 = 1    vs (1.7 - 3)^2 = 1.69 -> 1.69
    # t2: clipped 3:               (3 - 0)^2 = 9    vs 9                 -> 9
    # loss = 0.5 * (1 + 1.69 + 9) / 3
    values = t(1.0, 2.0, 3.0).requires_grad_()
    loss = ppo_value_loss(values, t(1.5, 1.5, 3.0), t(2.0, 3.0, 0.0), torch.ones(3), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 11.69 / 3)
    # gradient only through unclipped terms: t0: (1 - 2) / 3, t1: 0 (clipped branch is flat), t2: (3 - 0) / 3
    loss.backward()
    torch.testing.assert_close(values.grad, t(-1 / 3, 0.0, 1.0))


# ----------------------------------------------------------------------------- GRPO


def test_group_normalized_advantages():
    # group [1, 3, 5]: mean 3, unbiased std 2 -> [-1, 0, 1]; group [5, 5, 5] -> zeros
    scores = t(1.0, 3.0, 5.0, 5.0, 5.0, 5.0)
    torch.testing.assert_close(
        group_normalized_advantages(scores, 3), t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0), atol=1e-5, rtol=0
    )
    # centring only (Dr. GRPO): [-2, 0, 2]
    torch.testing.assert_close(group_normalized_advantages(scores, 3, scale_by_std=False), t(-2.0, 0.0, 2.0, 0, 0, 0))
    with pytest.raises(ValueError):
        group_normalized_advantages(scores, 4)
    with pytest.raises(ValueError):
        group_normalized_advantages(scores, 1)
