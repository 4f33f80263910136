"""Evaluation metrics (``torchmetrics.Metric``; every state reduces across DDP ranks).

Ranking (CRSLab / UniCRS protocol): :class:`RecallAtK`, :class:`NDCGAtK`, :class:`MRRAtK`, :class:`ItemCoverage`.
Generation: :class:`DistinctN`, :class:`Coherence`. Feedback: :class:`Satisfaction`. Intervals over episodes (plain
functions): :func:`bootstrap_ci`, :func:`paired_difference_ci`.
"""

from crslight.metrics.bootstrap import bootstrap_ci, paired_difference_ci
from crslight.metrics.ranking import ItemCoverage, MRRAtK, NDCGAtK, RecallAtK, target_ranks
from crslight.metrics.satisfaction import Satisfaction
from crslight.metrics.text import Coherence, DistinctN
from crslight.models.encoder import SentenceEncoder

__all__ = ["Coherence", "DistinctN", "ItemCoverage", "MRRAtK", "NDCGAtK", "RecallAtK", "Satisfaction",
           "SentenceEncoder", "bootstrap_ci", "paired_difference_ci", "target_ranks"]
