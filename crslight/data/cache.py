"""An Arrow cache for converted corpora: built once, memory-mapped afterwards, never half-written.

The key hashes the source files' paths, sizes and modification times, the converter's version and its options, so an
edited or replaced download is converted again. A build writes into a temporary folder beside the entry and renames it
into place only when complete: a failure leaves nothing behind, and the temporary folder of a build that was killed
(``kill -9``) is removed by the next build of the same entry.

An entry holds the sha256 of each of its files (``checksums.json``, written last), checked on every read (a few
milliseconds for ReDial's 5 MB): an entry whose files are missing, unreadable or edited since the conversion (even by
hand, keeping their sizes and times) is converted again, with a warning.
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
            warnings.warn(f"the data cache entry {entry} is damaged ({type(error).__name__}: {error}); "
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
        (tmp / CHECKSUMS).write_text(json.dumps(_checksums(tmp, sorted(_files(tmp)))))
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


CHECKSUMS = "checksums.json"


class DamagedEntry(Exception):
    """A cache entry's files differ from what the conversion wrote."""


def _files(folder: Path) -> list[str]:
    """The files under ``folder`` as POSIX paths relative to it (the checksums' own file left out)."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS]


def _checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each named file under ``folder``."""
    out = {}
    for name in names:
        h = hashlib.sha256()
        with (folder / name).open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def _verify(entry: Path) -> None:
    """Raises :class:`DamagedEntry` unless every file the conversion wrote is there with its bytes unchanged. Files
    added later are not checked: what an entry loads is named in files that are (``meta.json``, ``state.json``)."""
    if not (entry / CHECKSUMS).is_file():
        raise DamagedEntry(f"no {CHECKSUMS}")
    expected = json.loads((entry / CHECKSUMS).read_text())
    missing = [name for name in expected if not (entry / name).is_file()]
    if missing:
        raise DamagedEntry(f"missing {', '.join(missing)}")
    changed = [name for name, digest in _checksums(entry, list(expected)).items() if digest != expected[name]]
    if changed:
        raise DamagedEntry(f"changed since the conversion: {', '.join(changed)}")


def _load(entry: Path) -> tuple[datasets.DatasetDict, dict]:
    _verify(entry)
    meta = json.loads((entry / "meta.json").read_text())
    data = datasets.load_from_disk(str(entry / "arrow")) if (entry / "arrow").exists() else datasets.DatasetDict()
    for split, features in meta.pop("empty", {}).items():
        schema = datasets.Features.from_dict(features).arrow_schema
        data[split] = datasets.Dataset(pa.Table.from_pylist([], schema=schema))
    return data, meta
