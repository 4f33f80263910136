"""Implicit-feedback signals and the composite weak label.

Built-ins: :class:`DwellTimeSignal`, :class:`SentimentShiftSignal`, :class:`EngagementSignal`,
:class:`AcceptanceSignal`, :class:`SemanticRelevanceSignal`. Plugins subclass :class:`SignalExtractor` and declare an
entry point in the ``crslight.signals`` group (see ``docs/plugins.md``).
"""

from crslight.signals.acceptance import AcceptanceSignal
from crslight.signals.base import SignalBatch, SignalExtractor, coverage, transitions
from crslight.signals.composite import CompositeLabel
from crslight.signals.dwell import DwellTimeSignal
from crslight.signals.engagement import EngagementSignal
from crslight.signals.semantic import SemanticRelevanceSignal
from crslight.signals.sentiment import SentimentShiftSignal

__all__ = ["AcceptanceSignal", "CompositeLabel", "DwellTimeSignal", "EngagementSignal", "SemanticRelevanceSignal",
           "SentimentShiftSignal", "SignalBatch", "SignalExtractor", "coverage", "transitions"]
