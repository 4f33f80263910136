"""Data layer: the canonical schema, the source loaders, and the DataModules."""

from crslight.data.corpus import SOURCES, SPLITS, Corpus, load_corpus
from crslight.data.errors import DataError, LoadReport
from crslight.data.schema import RECOMMENDER, SEEKER, RecSample, rec_samples

__all__ = ["SOURCES", "SPLITS", "Corpus", "DataError", "LoadReport", "RECOMMENDER", "SEEKER", "RecSample",
           "load_corpus", "rec_samples"]
