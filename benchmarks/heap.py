"""Training-step time with glibc's default heap against the heap the ``crslight`` command keeps (``keep_heap``).

Each mode runs in a fresh subprocess (``mallopt`` settings hold for the process): ``--steps`` forward and backward
passes of the policy under bf16 autocast on ``--batch`` x ``--tokens`` random tokens, timed one by one with the page
faults and kernel time each caused (``getrusage``), plus the process's peak RSS. Prints each mode's median step time
after the first ``--warmup`` steps, and the ratio default / kept.

    python benchmarks/heap.py                                  # SmolLM2-135M, 4 x 200 tokens, 8 steps
    python benchmarks/heap.py --model tiny --steps 3 --warmup 1

``--trim`` measures :func:`crslight.models.memory.release_heap` instead: 400 one-MiB blocks on glibc's heap, every
other one freed, leave about 200 MiB of holes that stay resident; it prints the RSS the holes hold (the baseline,
measured first in the same process) and how much of it one ``release_heap`` hands back.

    python benchmarks/heap.py --trim
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(model_name: str, batch: int, tokens: int, steps: int) -> dict:
    import resource
    import time

    import torch

    from crslight.models.loading import load_causal_lm, load_tokenizer, tiny_causal_lm
    from crslight.models.memory import keep_heap

    kept = keep_heap()
    torch.manual_seed(0)
    model = (tiny_causal_lm(load_tokenizer("smollm2", item_token=False), seed=0) if model_name == "tiny"
             else load_causal_lm(model_name))
    ids = torch.randint(0, 1000, (batch, tokens))
    times, faults, kernel = [], [], []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        after = resource.getrusage(resource.RUSAGE_SELF)
        times.append(time.perf_counter() - start)
        faults.append(after.ru_minflt - before.ru_minflt)
        kernel.append(after.ru_stime - before.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kept": kept, "seconds": times, "faults": faults, "kernel_seconds": kernel, "peak_rss_mib": peak}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trim() -> int:
    """RSS handed back by one ``release_heap`` over a heap of holes, against the RSS the holes hold."""
    import torch

    from crslight.models.memory import release_heap

    big = torch.empty(16 * 2**20, dtype=torch.uint8)
    del big  # an mmapped block freed: glibc raises its mmap threshold to 16 MiB, so 1 MiB blocks come from the heap
    start = rss_mib()
    blocks = [torch.ones(2**18) for _ in range(400)]  # 400 x 1 MiB, touched
    filled = rss_mib()
    del blocks[::2]  # holes in the middle of the heap: free, but still resident
    holes = rss_mib()
    if not release_heap():
        print("release_heap did nothing: the C library is not glibc")
        return 1
    after = rss_mib()
    assert all(float(b[0]) == 1.0 for b in blocks)
    freed = (filled - start) / 2  # the baseline: what the freed blocks held
    print(f"400 blocks: {filled - start:.0f} MiB RSS; every other one freed ({freed:.0f} MiB): "
          f"{filled - holes:.0f} MiB went back by free alone")
    print(f"release_heap: {holes - after:.0f} MiB handed back, {(holes - after) / freed:.2f}x the freed blocks")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, a transformers folder, or tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--trim", action="store_true", help="measure release_heap's RSS drop instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trim:
        return trim()
    if args.child:
        print(json.dumps(child(args.model, args.batch, args.tokens, args.steps)))
        return 0
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    results = {}
    for mode in ("release", "keep"):  # release: glibc's defaults, as a Python program without the crslight command
        env = {**os.environ, "CRSLIGHT_HEAP": mode}
        out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch),
                              "--tokens", str(args.tokens), "--steps", str(args.steps)],
                             env=env, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        steady = slice(args.warmup, None)
        results[mode] = {"median_step_s": statistics.median(result["seconds"][steady]),
                         "median_faults": statistics.median(result["faults"][steady]),
                         "kernel_s": sum(result["kernel_seconds"]), "peak_rss_mib": result["peak_rss_mib"],
                         "kept": result["kept"]}
        r = results[mode]
        print(f"{'glibc default' if mode == 'release' else 'kept heap':>13}: median step {r['median_step_s']:.2f} s, "
              f"{r['median_faults']:.0f} page faults a step, {r['kernel_s']:.1f} s in the kernel over "
              f"{args.steps} steps, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    ratio = results["release"]["median_step_s"] / results["keep"]["median_step_s"]
    print(f"default / kept step time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
