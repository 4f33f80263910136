"""Evaluation metrics (``torchmetrics.Metric``; every state reduces across DDP ranks).

Ranking (CRSLab / UniCRS protocol): :class:`RecallAtK`, :class:`NDCGAtK`, :class:`MRRAtK`, :class:`ItemCoverage`.
Generation: :class:`DistinctN`, :class:`Coherence`. Feedback: :class:`Satisfaction`.
"""

from crslight.metrics.encoder import SentenceEncoder
from crslight.metrics.ranking import ItemCoverage, MRRAtK, NDCGAtK, RecallAtK, target_ranks
from crslight.metrics.satisfaction import Satisfaction
from crslight.metrics.text import Coherence, DistinctN

__all__ = ["Coherence", "DistinctN", "ItemCoverage", "MRRAtK", "NDCGAtK", "RecallAtK", "Satisfaction",
           "SentenceEncoder", "target_ranks"]
