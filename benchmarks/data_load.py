"""Cold and warm load times of a source (all three splits), in a fresh cache folder.

    python benchmarks/data_load.py --dataset redial --root ../shared/data/redial

Cold = convert the official files into the Arrow cache; warm = memory-map the cache in a new ``load_corpus`` call.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="redial")
    parser.add_argument("--root", default="../shared/data/redial")
    args = parser.parse_args()
    os.environ["CRSLIGHT_CACHE"] = tempfile.mkdtemp(prefix="crslight-bench-")
    from crslight.data import load_corpus

    out = {"dataset": args.dataset}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        corpora = [load_corpus(args.dataset, args.root, split) for split in ("train", "valid", "test")]
        counts = [len(c.dialogues) for c in corpora]
        out[f"{phase}_s"] = round(time.perf_counter() - start, 3)
    out["dialogues"] = dict(zip(("train", "valid", "test"), counts, strict=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
