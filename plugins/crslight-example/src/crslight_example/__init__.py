"""crslight-example: a template plugin with one signal (:class:`QuestionRateSignal`) and one metric
(:class:`MeanReplyLength`). Copy this folder, rename the package, and replace the two classes."""

from crslight_example.metrics import MeanReplyLength
from crslight_example.signals import QuestionRateSignal

__all__ = ["MeanReplyLength", "QuestionRateSignal"]
__version__ = "0.1.0"
