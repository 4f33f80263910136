"""One entry point for every source: ``load_corpus(name, root, split)`` → :class:`Corpus`.

A source is converted once into the canonical schema (``crslight.schema``) with all its splits, stored as Arrow
in the cache, and memory-mapped on every later load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import datasets
import pyarrow as pa

from crslight.data import logs, opendialkg, redial, synthetic
from crslight.data.cache import cache_key, cached
from crslight.data.errors import DataError, LoadReport, require_files
from crslight.data.logrecord import LOG_FEATURES
from crslight.schema import CATALOGUE_FEATURES, DIALOGUE_FEATURES, RecSample, rec_samples

log = logging.getLogger(__name__)

SOURCES = ("redial", "opendialkg", "synthetic", "logs")
SPLITS = ("train", "valid", "test")
#: Bump when a converter's output changes, so old cache entries are not reused.
CONVERTER_VERSION = 4  # 2: empty files, duplicate or leaked dialogue ids, bad offsets and ratings are errors; 3: duplicate
# movie ids, both questionnaires checked, an empty OpenDialKG recommended catalogue; 4: entries carry checksums
#: the same for the interaction-log converter (crslight.data.logs, crslight.data.logrecord)
LOGS_CONVERTER_VERSION = 1


@dataclass
class Corpus:
    """One split of one source in the canonical schema.

    Attributes:
        name: the source (``redial``, ``opendialkg``, ``synthetic``, ``logs``).
        split: ``train``, ``valid`` or ``test``.
        dialogues: the dialogues (``datasets.Dataset``, schema in ``crslight.schema``).
        catalogue: the item catalogue (``datasets.Dataset``).
        report: rows skipped and item ids not resolved while converting (over all splits of the source).
        info: what the source adds to :meth:`stats` (``logs``: the split rule).
    """

    name: str
    split: str
    dialogues: datasets.Dataset
    catalogue: datasets.Dataset
    report: LoadReport = field(default_factory=LoadReport)
    info: dict = field(default_factory=dict)

    @cached_property
    def item_index(self) -> dict[str, int]:
        """item id → row of the catalogue (the column a ranking score refers to)."""
        return {item_id: i for i, item_id in enumerate(self.catalogue["item_id"])}

    @cached_property
    def item_names(self) -> list[str]:
        return self.catalogue["name"]

    @cached_property
    def rec_samples(self) -> list[RecSample]:
        """One sample per (recommender turn, catalogue item it mentions): the CRSLab / UniCRS protocol."""
        return [s for s in rec_samples(self.dialogues) if s.item in self.item_index]

    def stats(self) -> dict:
        turns = self.dialogues["turns"]
        mentioned = {item for ts in turns for t in ts for item in t["items"]}
        samples = self.rec_samples
        return {
            "dataset": self.name,
            "split": self.split,
            "dialogues": len(self.dialogues),
            "turns": sum(len(ts) for ts in turns),
            "recommender_turns": sum(t["role"] == "recommender" for ts in turns for t in ts),
            "rec_samples": len(samples),
            "rec_samples_new": sum(s.is_new for s in samples),
            "items": len(self.catalogue),
            "items_mentioned": len(mentioned),
            "labelled_items": sum(len(x) for x in self.dialogues["labels"]),
            "rated_dialogues": sum(r == r for r in self.dialogues["rating"]),
            "unknown_items": self.report.unknown_items,
            "bad_rows": self.report.bad_rows,
            **self._log_stats(),
            **self.info,
        }

    def _log_stats(self) -> dict:
        """Interaction logs only: their item events and how many turns carry a timestamp."""
        if "events" not in self.dialogues.column_names:
            return {}
        turns = self.dialogues["turns"]
        return {"events": sum(len(e) for e in self.dialogues["events"]),
                "timed_turns": sum(t["time"] == t["time"] for ts in turns for t in ts),
                "users": len(set(self.dialogues["user_id"]) - {""})}


def _table(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
    if not rows:  # from_list([]) would drop the columns
        return datasets.Dataset(pa.Table.from_pylist([], schema=features.arrow_schema))
    return datasets.Dataset.from_list(rows, features=features)


def _to_datasets(splits: dict[str, list[dict]], catalogue: list[dict],
                 features: datasets.Features = DIALOGUE_FEATURES) -> datasets.DatasetDict:
    out = {s: _table(rows, features) for s, rows in splits.items()}
    out["catalogue"] = _table(catalogue, CATALOGUE_FEATURES)
    return datasets.DatasetDict(out)


def dataset_plugin(name: str):
    """The loader an installed package registers as ``name`` in the ``crslight.datasets`` entry-point group.

    Raises:
        ValueError: no such dataset (the message lists the built-in and the installed ones).
    """
    from crslight import plugins

    try:
        loader = plugins.get("datasets", name)
    except plugins.UnknownPluginError as error:
        if name in plugins.load_plugins()[plugins.GROUPS["datasets"]]:  # installed, but it failed to import
            raise ValueError(str(error)) from None
        known = sorted(set(SOURCES) | set(plugins.available("datasets")))
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(known)}, or a dataset an installed "
                         "package registers in the crslight.datasets entry-point group") from None
    if not callable(getattr(loader, "load_splits", None)):
        raise ValueError(f"dataset plugin {name!r} ({loader!r}) has no load_splits(root, report, skip_bad_rows)")
    return loader


def _plugin_build(name: str, loader, root, report: LoadReport, skip_bad_rows: bool):
    """``(build, cache key)`` for a dataset plugin (the protocol: ``docs/plugins.md``): ``loader.load_splits(root,
    report, skip_bad_rows)`` returns ``({split: [dialogue dicts]}, [catalogue rows])``; the cache key hashes
    ``loader.FILES`` under ``root`` (default: every file under it) and ``loader.VERSION``."""
    if root is None:
        raise DataError("<root>", f"--root is required for the {name} dataset: its folder or file")
    root = Path(root)
    if not root.exists():
        raise DataError(str(root), f"no such file or folder for the {name} dataset")
    names = getattr(loader, "FILES", None)
    if root.is_file():
        files = [root]
    elif names:
        files = [require_files(root, list(names), name) / f for f in names]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file())

    def build():
        splits, items = loader.load_splits(root, report, skip_bad_rows)
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise DataError(str(root), f"the {name} loader returned no {', '.join(missing)} split "
                                       f"(load_splits must return all of {', '.join(SPLITS)})")
        return _to_datasets({s: splits[s] for s in SPLITS}, items), {
            "bad_rows": report.bad_rows, "unknown_items": report.unknown_items, "errors": report.errors}

    return build, cache_key(files, version=str(getattr(loader, "VERSION", "1")), skip_bad_rows=skip_bad_rows)


def load_corpus(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    skip_bad_rows: bool = False,
    cache: bool = True,
    seed: int = 0,
    n_dialogues: int = 1000,
    n_items: int = 400,
    n_eval_dialogues: int | None = None,
    catalogue: str = "recommended",
) -> Corpus:
    """Loads one split of a source in the canonical schema.

    Args:
        name: ``redial``, ``opendialkg``, ``synthetic``, ``logs``, or a dataset an installed package registers in the
            ``crslight.datasets`` entry-point group (:func:`dataset_plugin`).
        root: the folder of the official download (``redial``, ``opendialkg``); for ``logs`` a folder of interaction
            logs or one conversations file (``crslight.data.logs``, ``docs/logs.md``); unused for ``synthetic``.
        split: ``train``, ``valid`` or ``test`` (the split rules are in each loader's docstring).
        skip_bad_rows: skip malformed lines/rows instead of raising; how many is in ``corpus.report.bad_rows``.
        cache: store the conversion in the Arrow cache (``$CRSLIGHT_CACHE``, default ``~/.cache/crslight``).
        seed: synthetic only: the generator's seed.
        n_dialogues: synthetic only: dialogues in the train split.
        n_items: synthetic only: catalogue size.
        n_eval_dialogues: synthetic only: dialogues in the valid and in the test split (default: a fifth of
            ``n_dialogues``).
        catalogue: OpenDialKG only: ``recommended`` (the entities that recommender turns mention, the convention of
            published results) or ``entities`` (all 100,812 entities of the entity list).
    """
    plugin = None if name in SOURCES else dataset_plugin(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if name == "opendialkg" and catalogue not in opendialkg.CATALOGUES:
        raise ValueError(f"unknown OpenDialKG catalogue {catalogue!r}: expected one of "
                         f"{', '.join(opendialkg.CATALOGUES)}")
    report = LoadReport()
    if plugin is not None:
        build, key = _plugin_build(name, plugin, root, report, skip_bad_rows)
    elif name == "synthetic":
        n_eval = n_eval_dialogues or max(1, n_dialogues // 5)
        sizes = {"train": n_dialogues, "valid": n_eval, "test": n_eval}

        def build():
            splits = {s: synthetic.generate(seed, sizes[s], n_items, split=s)[0] for s in SPLITS}
            return _to_datasets(splits, synthetic.make_catalogue(seed, n_items)), {}

        key = f"v{CONVERTER_VERSION}-s{seed}-d{n_dialogues}-e{n_eval}-i{n_items}"
    elif name == "logs":
        if root is None:
            raise DataError("<root>", "--root is required for logs: a folder of interaction logs or one .jsonl / "
                            ".parquet file of conversations (docs/logs.md)")
        catalogue_file, files = logs.find_files(root)

        def build():
            splits, items, rule = logs.load_splits(root, report, skip_bad_rows)
            return _to_datasets(splits, items, LOG_FEATURES), {
                "bad_rows": report.bad_rows, "unknown_items": report.unknown_items, "errors": report.errors,
                "info": {"split_rule": rule}}

        key = cache_key([catalogue_file] + [f for f, _ in files], version=LOGS_CONVERTER_VERSION,
                        skip_bad_rows=skip_bad_rows, splits=[s for _, s in files])
    else:
        if root is None:
            raise DataError("<root>", f"--root is required for {name}: the folder of the official download")
        module = redial if name == "redial" else opendialkg
        root = require_files(root, module.FILES, name)

        options = {"catalogue_of": catalogue} if name == "opendialkg" else {}

        def build():
            splits, items = module.load_splits(root, report, skip_bad_rows, **options)
            return _to_datasets(splits, items), {"bad_rows": report.bad_rows, "unknown_items": report.unknown_items,
                                                      "errors": report.errors}

        key = cache_key([root / f for f in module.FILES], version=CONVERTER_VERSION, skip_bad_rows=skip_bad_rows,
                        **options)
    data, meta = cached(name, key, build, enabled=cache)
    report = LoadReport(meta.get("bad_rows", 0), meta.get("unknown_items", 0), meta.get("errors", []))
    if report.bad_rows:
        log.warning("%s: skipped %d bad rows; first: %s", name, report.bad_rows, report.errors[:1])
    return Corpus(name, split, data[split], data["catalogue"], report, meta.get("info", {}))
