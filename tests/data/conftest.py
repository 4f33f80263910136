import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def shared_folder(name: str) -> Path:
    """The real benchmark folder; missing is a skip on a laptop and a failure in CI (``CI=true``)."""
    folder = (SHARED_DATA / name).resolve()
    if not folder.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data folder {folder} is missing (required in CI)")
        pytest.skip(f"real data folder {folder} is missing")
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session converts into its own cache, so tests never read a stale entry."""
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path_factory.getbasetemp() / "crslight-cache"))


@pytest.fixture(scope="session")
def redial_root() -> Path:
    return shared_folder("redial")


@pytest.fixture(scope="session")
def opendialkg_root() -> Path:
    return shared_folder("opendialkg")
