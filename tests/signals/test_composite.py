"""CompositeLabel: fitted normalisation, NaN-aware weighting, state_dict, and building it from YAML."""

import math

import pytest
import torch

from crslight.signals import CompositeLabel, EngagementSignal, SentimentShiftSignal, SignalExtractor

nan = math.nan


class Column(SignalExtractor):
    """Returns the ``values`` given at construction (one per transition)."""

    def __init__(self, values: list[float]):
        self.values = values

    def extract(self, batch):
        return self.values[: len(batch)]


def two_signals(**kwargs) -> CompositeLabel:
    return CompositeLabel([Column([]), Column([])], **kwargs)


def test_zscore_weights_and_missing_signals():
    raw = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [nan, 1.0]])
    label = two_signals(weights=[1.0, 2.0]).fit(raw)
    # A: mean 2, population std sqrt(2/3); B: mean 0.5, std 0.5
    assert label.mean.tolist() == pytest.approx([2.0, 0.5])
    assert label.std.tolist() == pytest.approx([math.sqrt(2 / 3), 0.5])
    z_a = 1 / math.sqrt(2 / 3)  # 1.2247
    expected = [(-z_a - 2) / 3, (0 - 2) / 3, (z_a + 2) / 3, (2 * 1) / 2]  # row 4: A missing, B's weight alone
    assert label(raw).tolist() == pytest.approx(expected, abs=1e-6)


def test_all_missing_is_nan_and_negative_weights_flip():
    raw = torch.tensor([[0.0, 0.0], [2.0, 2.0], [nan, nan]])
    label = two_signals(weights=[-1.0, 1.0]).fit(raw)
    out = label(raw)
    assert out[0] == pytest.approx(0.0) and out[1] == pytest.approx(0.0)  # -z + z over |w| = 2
    assert math.isnan(out[2])
    flipped = two_signals(weights=[-1.0, 0.0]).fit(raw)(raw)
    assert flipped[:2].tolist() == pytest.approx([1.0, -1.0])  # z = -1, +1, turned around


def test_rank_normalisation_is_centred_empirical_cdf():
    label = CompositeLabel([Column([])], normalization="rank", n_quantiles=5).fit(torch.tensor([[1.0], [2.0], [3.0],
                                                                                                  [4.0]]))
    # quantiles 1, 1.75, 2.5, 3.25, 4: 2.5 is the median, 1.375 halfway between the first two (CDF 0.125)
    x = torch.tensor([[1.0], [2.5], [4.0], [100.0], [-5.0], [1.375], [nan]])
    z = label.normalize(x)[:, 0]
    assert z[:6].tolist() == pytest.approx([-1.0, 0.0, 1.0, 1.0, -1.0, -0.75])
    assert math.isnan(z[6])


def test_rank_of_a_binary_signal_uses_mid_ranks():
    label = CompositeLabel([Column([])], normalization="rank", n_quantiles=5).fit(torch.tensor([[0.0], [0.0], [0.0],
                                                                                                  [1.0]]))
    # quantiles 0, 0, 0, 0.25, 1: the zeros occupy positions 0..2 (mid 1 → CDF 0.25), 1 sits at position 4
    assert label.normalize(torch.tensor([[0.0], [1.0]]))[:, 0].tolist() == pytest.approx([-0.5, 1.0])


def test_fit_on_a_batch_state_dict_round_trip(make_batch):
    batch = make_batch(reaction=["I love it!", "meh", None, "Great, thanks a lot!"],
                       continues=[True, False, False, True])
    signals = [SentimentShiftSignal(mode="polarity"), EngagementSignal()]
    label = CompositeLabel(signals, weights=[1.0, 1.0]).fit(batch)
    values = label(batch)
    assert values.shape == (4,) and not values.isnan().any()  # engagement is defined for every transition
    assert values[3] > values[1]  # warm and engaged beats curt and leaving
    restored = CompositeLabel(signals, weights=[1.0, 1.0])
    with pytest.raises(RuntimeError, match="fit"):
        restored(batch)
    restored.load_state_dict(label.state_dict())
    assert torch.equal(restored(batch), values)


def test_constructor_checks():
    with pytest.raises(ValueError, match="weights"):
        CompositeLabel([Column([])], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="normalization"):
        CompositeLabel([Column([])], normalization="minmax")
    with pytest.raises(ValueError, match="signal"):
        CompositeLabel([])


def test_built_from_yaml_with_short_class_names(make_batch):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--label", type=CompositeLabel)
    cfg = parser.parse_string("""
label:
  class_path: crslight.signals.CompositeLabel
  init_args:
    signals:
      - class_path: SentimentShiftSignal
        init_args:
          mode: polarity
      - class_path: EngagementSignal
    weights: [1.0, 0.5]
    normalization: rank
""")
    label = parser.instantiate(cfg).label
    assert [type(s).__name__ for s in label.signals] == ["SentimentShiftSignal", "EngagementSignal"]
    assert label.signals[0].mode == "polarity" and label.normalization == "rank"
    assert label.weights.tolist() == [1.0, 0.5]
