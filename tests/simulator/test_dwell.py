import math

import numpy as np
import pytest
from scipy import stats

from crslight.schema import turn
from crslight.simulator.dwell import (
    REDIAL_DWELL,
    DwellModel,
    LogNormalFit,
    condition_of,
    fit_gaps,
    real_gaps,
    redial_dwell,
)


def test_fit_recovers_zero_inflated_lognormal():
    rng = np.random.default_rng(0)
    truth = LogNormalFit(p_zero=0.05, mu=2.5, sigma=0.9, n=0)
    fit = fit_gaps(truth.sample(rng, 20_000))
    assert fit.p_zero == pytest.approx(0.05, abs=0.01)
    assert fit.mu == pytest.approx(2.5, abs=0.03)
    assert fit.sigma == pytest.approx(0.9, abs=0.03)
    assert fit.n == 20_000
    assert fit.median == pytest.approx(math.exp(fit.mu))


def test_fit_rejects_empty_or_all_zero_samples():
    with pytest.raises(ValueError):
        fit_gaps(np.array([]))
    with pytest.raises(ValueError):
        fit_gaps(np.zeros(5))


def test_condition_from_questionnaire():
    labels = {"a": {"liked": 1, "seen": 0}, "b": {"liked": 1, "seen": 1}, "c": {"liked": 0, "seen": 0}}
    assert condition_of({"items": ["a", "b"]}, labels) == "accept"
    assert condition_of({"items": ["b", "c"]}, labels) == "reject"
    assert condition_of({"items": ["zz"]}, labels) == "other"
    assert condition_of({"items": []}, labels) == "other"


def test_real_gaps_measure_reply_end_to_next_seeker_turn():
    dialogue = {
        "turns": [turn("seeker", "hi", time=0), turn("recommender", "Try A", ["a"], time=5, end_time=9),
                  turn("seeker", "love it", time=21), turn("recommender", "bye", time=30)],
        "labels": [{"item": "a", "suggested": 1, "seen": 0, "liked": 1}],
    }
    gaps = real_gaps({"turns": [dialogue["turns"]], "labels": [dialogue["labels"]]})
    assert gaps["accept"].tolist() == [12.0]
    assert gaps["reject"].size == 0 and gaps["other"].size == 0  # the last reply has no answer


def test_model_round_trips_and_samples_by_condition():
    model = DwellModel.from_dict(REDIAL_DWELL.to_dict())
    assert model == REDIAL_DWELL
    rng = np.random.default_rng(1)
    long = np.median([model.sample(rng, "accept") for _ in range(4000)])
    short = np.median([model.sample(rng, "other") for _ in range(4000)])
    assert long > short  # accepted suggestions are read longer than chit-chat, as in the real gaps
    with pytest.raises(ValueError):
        model.sample(rng, "maybe")


def test_stored_parameters_match_a_fresh_fit_and_the_real_test_gaps(redial_root):
    from crslight.data import load_corpus

    fitted = redial_dwell(redial_root)
    assert redial_dwell(redial_root) is fitted  # fitted once per process
    for condition in ("accept", "reject", "other"):
        stored, fresh = REDIAL_DWELL.fit_of(condition), fitted.fit_of(condition)
        assert fresh.mu == pytest.approx(stored.mu, abs=0.01)
        assert fresh.sigma == pytest.approx(stored.sigma, abs=0.01)
        assert fresh.p_zero == pytest.approx(stored.p_zero, abs=0.002)
    real = real_gaps(load_corpus("redial", redial_root, "test").dialogues)
    rng = np.random.default_rng(0)
    simulated = np.concatenate([fitted.fit_of(c).sample(rng, len(real[c])) for c in real])
    ks = stats.ks_2samp(np.round(simulated), np.concatenate(list(real.values()))).statistic
    assert ks < 0.08, ks
