"""Percentile-bootstrap intervals of a mean and of a paired difference, on values small enough to work out by hand."""

import numpy as np
import pytest

from crslight.metrics.bootstrap import bootstrap_ci, paired_difference_ci


def test_constant_values_give_a_zero_width_interval():
    assert bootstrap_ci([2.0] * 50) == (2.0, 2.0, 2.0)  # every resample of 50 twos has mean 2


def test_two_values_hand_worked_percentiles():
    # a resample of [0, 1] is {0,0}, {0,1}, {1,0} or {1,1}: means 0, 0.5, 0.5, 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5th percentile is 0 and the 97.5th is 1 (each end holds a quarter of the mass, far above 2.5%)
    assert bootstrap_ci([0.0, 1.0], n_resamples=4000) == (0.5, 0.0, 1.0)
    # a 40% interval cuts at the 30th and 70th percentiles, both inside the half of the mass at 0.5
    assert bootstrap_ci([0.0, 1.0], n_resamples=4000, level=0.4) == (0.5, 0.5, 0.5)


def test_weights_make_the_mean_per_reply():
    # episode 1 scored 1 over one reply, episode 2 scored 3 on average over three replies: (1*1 + 3*3) / 4 = 2.5,
    # the mean over the four replies; resamples: {1,1} -> 1, {1,2} -> 2.5, {2,2} -> 3
    mean, lo, hi = bootstrap_ci([1.0, 3.0], weights=[1, 3], n_resamples=4000)
    assert (mean, lo, hi) == (2.5, 1.0, 3.0)


def test_interval_matches_the_normal_approximation_for_a_coin():
    # 400 fair coin flips: mean 0.5, standard error sqrt(0.25 / 400) = 0.025, 95% interval about 0.5 +- 0.049
    values = [0.0, 1.0] * 200
    mean, lo, hi = bootstrap_ci(values)
    assert mean == 0.5
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)


def test_deterministic_for_a_seed_and_different_across_seeds():
    values = np.random.default_rng(1).normal(size=60)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    a, b = values, values[::-1]
    assert paired_difference_ci(a, b, seed=7) == paired_difference_ci(a, b, seed=7)


def test_a_known_paired_difference():
    b = np.random.default_rng(0).normal(size=100)
    mean, lo, hi = paired_difference_ci(b + 0.25, b)  # every pair differs by exactly 0.25
    assert mean == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    # two pairs, differences 0 and 1: the same four resamples as [0, 1] above
    assert paired_difference_ci([1.0, 3.0], [1.0, 2.0], n_resamples=4000) == (0.5, 0.0, 1.0)


def test_pairing_separates_what_the_marginal_intervals_cannot():
    # the same 200 users, whose own satisfaction varies a lot; system a is better on every one of them by 0.1
    users = np.random.default_rng(0).normal(3.0, 1.0, size=200)
    a, b = users + 0.1, users
    _, a_lo, a_hi = bootstrap_ci(a)
    _, b_lo, b_hi = bootstrap_ci(b)
    assert a_lo < b_hi  # the marginal intervals overlap
    mean, lo, hi = paired_difference_ci(a, b)
    assert mean == pytest.approx(0.1) and lo > 0  # the paired difference is clearly positive


def test_weighted_paired_difference_is_the_difference_of_weighted_means():
    # a: (1*1 + 3*1) / 2 = 2; b with weights 1 and 3: (1*1 + 2*3) / 4 = 1.75; difference 0.25
    mean, _, _ = paired_difference_ci([1.0, 3.0], [1.0, 2.0], weights_a=[1, 1], weights_b=[1, 3])
    assert mean == pytest.approx(0.25)


def test_unpaired_inputs_raise():
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="not paired: position 1"):
        paired_difference_ci([1.0, 2.0], [1.0, 2.0], ids_a=[(0, "d0"), (1, "d1")], ids_b=[(0, "d0"), (1, "d7")])
    with pytest.raises(ValueError, match="episode ids"):
        paired_difference_ci([1.0, 2.0], [1.0, 2.0], ids_a=[0], ids_b=[0, 1])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], level=1.0)
    with pytest.raises(ValueError, match="weights"):
        bootstrap_ci([1.0, 2.0], weights=[1.0])
