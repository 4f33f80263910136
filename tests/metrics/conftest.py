"""Shared fixtures for the metric tests."""

import pytest


@pytest.fixture(scope="session")
def minilm():
    """The MiniLM sentence model, loaded once for the whole session (metrics share it through the cache)."""
    from crslight.metrics.encoder import load_sentence_model

    return load_sentence_model("minilm")
