import pytest

from crslight.rl.kl_controller import AdaptiveKLController, FixedKLController


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    assert controller.update(current_kl=100.0, n_steps=1000) == 0.05
    assert controller.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        # error = clip(9 / 6 - 1 = 0.5, +-0.2) = 0.2 -> 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002
        (9.0, 0.1002),
        # error = clip(3 / 6 - 1 = -0.5) = -0.2 -> 0.1 * (1 - 0.002) = 0.0998
        (3.0, 0.0998),
        # error = 6.6 / 6 - 1 = 0.1 (inside the clip) -> 0.1 * (1 + 0.001) = 0.1001
        (6.6, 0.1001),
        # on target: unchanged
        (6.0, 0.1),
    ],
)
def test_adaptive_controller_ziegler_update(current_kl, expected):
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert controller.update(current_kl, n_steps=100) == pytest.approx(expected)
    assert controller.value == pytest.approx(expected)


def test_adaptive_controller_compounds_and_round_trips_state():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10)
    controller.update(12.0, n_steps=5)  # 0.1 * 1.1 = 0.11
    controller.update(12.0, n_steps=5)  # 0.11 * 1.1 = 0.121
    assert controller.value == pytest.approx(0.121)
    resumed = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == pytest.approx(0.121)
    assert resumed.update(0.0, n_steps=5) == pytest.approx(0.121 * 0.9)
