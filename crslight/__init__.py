"""crslight: RLHF from implicit feedback for conversational recommenders."""

__version__ = "0.1.0"
