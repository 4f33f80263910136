"""Every data test converts into the session's own corpus cache."""

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(isolated_cache):
    """The root conftest's ``isolated_cache`` for every test here."""
