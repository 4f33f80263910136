"""Data layer: the source loaders and the DataModules, over the canonical schema (:mod:`crslight.schema`)."""

from crslight.data.corpus import SOURCES, SPLITS, Corpus, load_corpus
from crslight.data.errors import DataError, LoadReport
from crslight.schema import RECOMMENDER, SEEKER, RecSample, rec_samples

__all__ = ["SOURCES", "SPLITS", "Corpus", "DataError", "LoadReport", "RECOMMENDER", "SEEKER", "RecSample",
           "load_corpus", "rec_samples"]
