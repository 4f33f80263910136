"""crslight-example: a template plugin with one signal (:class:`QuestionRateSignal`), one metric
(:class:`MeanReplyLength`) and one dataset loader (``chat_csv``, :mod:`crslight_example.datasets`, with its DataModule
:class:`ChatCSV`). Copy this folder, rename the package, and replace what you need."""

from crslight_example.datasets import ChatCSV
from crslight_example.metrics import MeanReplyLength
from crslight_example.signals import QuestionRateSignal

__all__ = ["ChatCSV", "MeanReplyLength", "QuestionRateSignal"]
__version__ = "0.1.0"
