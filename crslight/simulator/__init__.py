"""User simulators, the conversation environment, baseline policies and the item linker (see docs/simulator.md)."""

from crslight.simulator.base import Reaction, UserSimulator, UserState, satisfaction
from crslight.simulator.dwell import REDIAL_DWELL, DwellModel, LogNormalFit, fit_dwell, redial_dwell
from crslight.simulator.env import (
    ConversationEnv,
    Episode,
    Transition,
    signal_fields,
    simulator_class,
    summarise,
    to_signal_batch,
)
from crslight.simulator.grounded import GroundedSimulator
from crslight.simulator.linker import ItemLinker, Link
from crslight.simulator.lm import LMSimulator, generate_chat
from crslight.simulator.persona import PersonaSimulator
from crslight.simulator.policies import (
    AttributeOraclePolicy,
    LMPolicy,
    PopularityPolicy,
    RandomPolicy,
    interaction_counts,
)

__all__ = [
    "REDIAL_DWELL", "AttributeOraclePolicy", "ConversationEnv", "DwellModel", "Episode", "GroundedSimulator",
    "ItemLinker", "LMPolicy", "LMSimulator", "Link", "LogNormalFit", "PersonaSimulator", "PopularityPolicy",
    "RandomPolicy", "Reaction",
    "Transition", "UserSimulator", "UserState", "fit_dwell", "generate_chat", "redial_dwell", "satisfaction",
    "interaction_counts", "signal_fields", "simulator_class", "summarise", "to_signal_batch",
]
