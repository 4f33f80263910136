"""The LightningModules of the three stages: SFT, the reward model R_phi, and PPO."""

from crslight.modules.ppo import PPOModule
from crslight.modules.reward import RewardModule
from crslight.modules.sft import SFTModule

__all__ = ["PPOModule", "RewardModule", "SFTModule"]
