"""The canonical schema's former home, kept importable for code written against it: the schema lives in
:mod:`crslight.schema`, below both the data layer and the signals (which read schema turns), so neither imports the
other to reach it. Nothing inside crslight imports this module."""

from crslight.schema import (
    CATALOGUE_FEATURES,
    DIALOGUE_FEATURES,
    LABEL_FEATURES,
    NOT_SAID,
    RECOMMENDER,
    SEEKER,
    TURN_FEATURES,
    RecSample,
    Role,
    context_lines,
    rec_samples,
    rec_samples_of,
    turn,
)

__all__ = ["CATALOGUE_FEATURES", "DIALOGUE_FEATURES", "LABEL_FEATURES", "NOT_SAID", "RECOMMENDER", "SEEKER",
           "TURN_FEATURES", "RecSample", "Role", "context_lines", "rec_samples", "rec_samples_of", "turn"]
