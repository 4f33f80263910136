"""Controllers of beta, the weight of the KL penalty in the PPO reward.

A fixed beta is simple but its right value depends on the reward model's scale. The adaptive
controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", eq. 2)
instead steers the measured KL toward a target::

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

so beta grows while the policy drifts further from the reference than wanted and shrinks while it
stays closer; the clip bounds any one update to a 20% proportional error. ``KL_t`` is the mean over
the batch of the *summed* per-token KL of each reply (a sequence-level KL, in nats).

Each controller is a small object with ``value``, ``update``, ``state_dict`` and ``load_state_dict``;
the PPO module saves its state in checkpoints so that a resumed run continues with the same beta.
"""

from __future__ import annotations

from typing import Any


class KLController:
    """Base class: holds the current coefficient ``value``; ``update`` does nothing.

    Args:
        kl_coef: The coefficient beta.
    """

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Takes the KL measured on the latest rollout batch and returns the coefficient to use next.

        Args:
            current_kl: Mean sequence-level KL of the batch.
            n_steps: Number of samples (episodes) the batch held.

        Returns:
            The new ``value``.
        """
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The mutable state, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.value = float(state_dict["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value:.6g})"


class FixedKLController(KLController):
    """A constant beta.

    Args:
        kl_coef: The coefficient beta.
    """


class AdaptiveKLController(KLController):
    """Adapts beta so that the measured KL tracks ``target`` (Ziegler et al. 2019).

    Args:
        init_kl_coef: Initial beta.
        target: Desired sequence-level KL per reply, in nats.
        horizon: Number of samples over which a proportional error is corrected (10000 in the paper).
    """

    def __init__(self, init_kl_coef: float = 0.05, target: float = 6.0, horizon: int = 10000) -> None:
        super().__init__(init_kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Multiplies beta by ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``.

        Args:
            current_kl: Mean sequence-level KL of the batch.
            n_steps: Number of samples (episodes) the batch held.

        Returns:
            The new ``value``.
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value
