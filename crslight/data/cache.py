"""An Arrow cache for converted corpora: built once, memory-mapped afterwards, never half-written.

The key hashes the source files' paths, sizes and modification times, the converter's version and its options, so an
edited or replaced download is converted again. A build writes into a temporary folder beside the entry and renames it
into place only when complete: a failure leaves nothing behind, and the temporary folder of a build that was killed
(``kill -9``) is removed by the next build of the same entry. An entry that cannot be read back is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa


def cache_root() -> Path:
    """``$CRSLIGHT_CACHE`` or ``~/.cache/crslight``."""
    return Path(os.environ.get("CRSLIGHT_CACHE", Path.home() / ".cache" / "crslight")).expanduser()


def cache_key(files: list[Path], **options) -> str:
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def cached(
    name: str, key: str, build: Callable[[], tuple[datasets.DatasetDict, dict]], enabled: bool = True
) -> tuple[datasets.DatasetDict, dict]:
    """Returns ``(datasets, meta)`` from the cache entry ``name/key`` or builds and stores it.

    Args:
        name: the source's name (a cache subfolder).
        key: from :func:`cache_key`.
        build: makes the ``DatasetDict`` and a JSON-serialisable ``meta`` dict (counts, report).
        enabled: False builds in memory and stores nothing.
    """
    if not enabled:
        return build()
    entry = cache_root() / "data" / name / key
    _remove_stale_builds(entry)
    if (entry / "meta.json").is_file():
        try:
            return _load(entry)
        except Exception as error:  # a damaged entry (edited, truncated): convert again rather than fail
            warnings.warn(f"the data cache entry {entry} could not be read ({type(error).__name__}: {error}); "
                          "converting the source again", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    data, meta = build()
    # datasets cannot reload a split saved with no rows: store its schema in meta and rebuild it on load
    meta = {**meta, "empty": {k: v.features.to_dict() for k, v in data.items() if len(v) == 0}}
    data = datasets.DatasetDict({k: v for k, v in data.items() if len(v)})
    datasets.disable_progress_bars()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}-"))
    try:
        if data:
            data.save_to_disk(str(tmp / "arrow"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process won the race: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(entry)


STALE_BUILD_SECONDS = 600


def _remove_stale_builds(entry: Path) -> None:
    """Removes the temporary folders of builds of ``entry`` that were killed (no conversion takes 10 minutes: one
    older than that is no other process's build in progress)."""
    if not entry.parent.is_dir():
        return
    cutoff = time.time() - STALE_BUILD_SECONDS
    for old in entry.parent.glob(f".{entry.name}-*"):
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def _load(entry: Path) -> tuple[datasets.DatasetDict, dict]:
    meta = json.loads((entry / "meta.json").read_text())
    data = datasets.load_from_disk(str(entry / "arrow")) if (entry / "arrow").exists() else datasets.DatasetDict()
    for split, features in meta.pop("empty", {}).items():
        schema = datasets.Features.from_dict(features).arrow_schema
        data[split] = datasets.Dataset(pa.Table.from_pylist([], schema=schema))
    return data, meta
