"""``crslight data validate``: check a data source without training and without writing anything.

For ``logs`` every problem of every file is listed (each with its file, line and field) beside the counts of what
would load; for the official downloads (``redial``, ``opendialkg``) the rows a load would have to skip. The data is
usable when there is no error: warnings (no timestamps anywhere, an empty split, ...) only say what will be missing.
Nothing goes to the corpus cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from crslight.data.errors import DataError, LoadReport


@dataclass
class Validation:
    """What a check found: ``errors`` make the data unusable as it is; ``counts`` is what would load."""

    counts: dict
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    more_errors: int = 0  # errors found but not listed (the official loaders keep the first 20)

    @property
    def usable(self) -> bool:
        return not self.errors and not self.more_errors

    def lines(self) -> list[str]:
        """The report as printed: every problem, then the verdict."""
        out = [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        if self.more_errors:
            out.append(f"error: ... and {self.more_errors} more rows with errors")
        n = len(self.errors) + self.more_errors
        if n:
            out.append(f"not usable: {n} error{'s' * (n != 1)}; fix them, or skip what they are in with "
                       "--skip-bad-rows (stats, and skip_bad_rows: true in a DataModule)")
        else:
            out.append("usable" + (f" ({len(self.warnings)} warning{'s' * (len(self.warnings) != 1)})"
                                   if self.warnings else ""))
        return out


def validate(dataset: str, root, **options) -> Validation:
    """Checks ``dataset`` at ``root`` (``options``: ``load_corpus``'s source options)."""
    if dataset == "logs":
        return validate_logs(root)
    from crslight.data.corpus import SPLITS, load_corpus

    counts: dict = {"dataset": dataset}
    try:
        for split in SPLITS:
            corpus = load_corpus(dataset, root, split, skip_bad_rows=True, cache=False, **options)
            counts[split] = corpus.stats()["dialogues"]
    except (DataError, ValueError) as error:  # a bad file, or an unknown dataset or option
        return Validation(counts, [str(error)])
    report = corpus.report
    counts.update(items=len(corpus.catalogue), unknown_items=report.unknown_items, bad_rows=report.bad_rows)
    return Validation(counts, list(report.errors), more_errors=report.bad_rows - len(report.errors))


def validate_logs(root) -> Validation:
    from crslight.data.logs import read_logs

    try:
        read = read_logs(root, "collect", LoadReport())
    except DataError as error:  # no catalogue, no conversations file: nothing further can be read
        return Validation({"dataset": "logs"}, [str(error)])
    dialogues = [d for rows in read.splits.values() for d in rows]
    turns = [t for d in dialogues for t in d["turns"]]
    counts = {
        "dataset": "logs",
        "files": len(read.files),
        "conversations": read.records,
        "usable_conversations": len(dialogues),
        **{split: len(rows) for split, rows in read.splits.items()},
        "split_rule": read.split_rule,
        "turns": len(turns),
        "timed_turns": sum(not math.isnan(t["time"]) for t in turns),
        "events": sum(len(d["events"]) for d in dialogues),
        "rated_conversations": sum(not math.isnan(d["rating"]) for d in dialogues),
        "items": len(read.catalogue),
        "errors": len(read.errors),
        "warnings": len(read.warnings),
    }
    return Validation(counts, [str(e) for e in read.errors], [str(w) for w in read.warnings])
