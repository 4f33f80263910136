"""Peak RSS of crslight's PPO with its memory measures switched off one at a time (an ablation; no TRL needed).

Runs crslight's side of ``benchmarks/ppo_vs_trl.py`` (same settings, same prompts, same policy folder: see that
script) ``--runs`` times per variant, each in a fresh subprocess, and prints every run's peak RSS and their median:

- ``default``: crslight as it is (lean MLPs, heap released before each update micro-batch and before the input
  embedding's backward pass, AdamW moments pre-allocated);
- ``no-release``: without the heap release (``crslight.modules.ppo.release_heap`` replaced by a no-op);
- ``no-lean``: without the lean MLPs (``crslight.modules.policy.lean_mlps`` replaced by a no-op);
- ``neither``: without both;
- ``in-backward``: the default plus ``optimizer_in_backward=True``.

Peak RSS on glibc depends on how freed heap blocks are reused, and it moved by up to ~450 MiB between identical
single runs here, hence the repeated runs.

``--trace`` also samples, every 10 ms from a thread, the process's RSS (``/proc/self/statm``) and glibc's heap
statistics (``mallinfo2``: heap size, bytes in use, free bytes kept in the heap, bytes in mmapped blocks), and prints
their values at the RSS peak of each phase of the PPO steps: rollout (``collect``; R_phi's and the signals' ``score``
falls in the gap after it), scoring (``rollout_logprobs``: the rollout-time log-probabilities), each update
micro-batch's forward and backward pass, and the gaps between them.

    python benchmarks/ppo_memory.py --runs 3                  # SmolLM2-135M, all variants
    python benchmarks/ppo_memory.py --variants neither default --runs 1 --trace
    python benchmarks/ppo_memory.py --model tiny --variants default neither --runs 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_vs_trl  # noqa: E402

VARIANTS = ("default", "no-release", "no-lean", "neither", "in-backward")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class PhaseTrace:
    """RSS and heap statistics at the RSS peak of each phase (see the module docstring)."""

    def __init__(self, module_class) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        self.mallinfo = libc.mallinfo2
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.phase = "start"
        self.rows: dict[str, dict] = {}
        for name, label in (("collect", "rollout"), ("rollout_logprobs", "scoring"), ("micro_step", "forward"),
                            ("manual_backward", "backward")):
            self._wrap(module_class, name, label)
        threading.Thread(target=self._sample, daemon=True).start()

    def _wrap(self, cls, name: str, label: str) -> None:
        method = getattr(cls, name)

        def wrapped(module, *args, **kwargs):
            self.phase = f"{len(self.rows) + 1:02d} {label}"
            try:
                return method(module, *args, **kwargs)
            finally:
                self.phase = f"{len(self.rows) + 1:02d} after {label}"

        setattr(cls, name, wrapped)

    def _sample(self) -> None:
        mib = 2**20
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * self.page / mib
            row = self.rows.setdefault(self.phase, {"rss": 0.0})
            if rss > row["rss"]:
                info = self.mallinfo()
                row.update(rss=rss, heap=info.arena / mib, in_use=info.uordblks / mib, free=info.fordblks / mib,
                           mmapped=info.hblkhd / mib)
            time.sleep(0.01)


def run_variant(variant: str, spec: dict, trace: bool = False) -> dict:
    """crslight's side of the benchmark with ``variant``'s measures switched off (runs in the child process)."""
    import crslight.modules.policy
    import crslight.modules.ppo

    if variant in ("no-release", "neither"):
        crslight.modules.ppo.release_heap = lambda: False
    if variant in ("no-lean", "neither"):
        crslight.modules.policy.lean_mlps = lambda model: 0
    tracer = PhaseTrace(crslight.modules.ppo.PPOModule) if trace else None
    result = ppo_vs_trl.run_crslight({**spec, "optimizer_in_backward": variant == "in-backward"})
    if tracer is not None:
        result["trace"] = {phase: {k: round(v) for k, v in row.items()} for phase, row in tracer.rows.items()}
    return result


def trace_table(variant: str, trace: dict) -> str:
    lines = [f"| phase ({variant}) | RSS | heap | in use | free in heap | mmapped |", "|---|---:|---:|---:|---:|---:|"]
    for phase, row in trace.items():
        if "heap" in row:
            lines.append(f"| {phase} | {row['rss']} | {row['heap']} | {row['in_use']} | {row['free']} "
                         f"| {row['mmapped']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=ppo_vs_trl.MODELS, default="smollm2")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--steps", type=int, default=1, help="timed PPO steps per run (after one warm-up step)")
    parser.add_argument("--trace", action="store_true", help="print RSS and heap statistics per phase (glibc only)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_variant(args.child, json.loads(args.spec.read_text()), args.trace)
        args.child_out.write_text(json.dumps(result))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = ppo_vs_trl.build_parser().parse_args(["--steps", str(args.steps)])  # ppo_vs_trl's defaults
    results = {}
    with tempfile.TemporaryDirectory(prefix="ppo_memory-") as tmp:
        folder = Path(tmp)
        spec_path, out_path = folder / "spec.json", folder / "out.json"
        spec_path.write_text(json.dumps(ppo_vs_trl.prepare(args.model, settings, folder)))
        for variant in args.variants:
            runs = []
            for _ in range(args.runs):
                command = [sys.executable, __file__, "--child", variant, "--spec", str(spec_path), "--child-out",
                           str(out_path), *(["--trace"] if args.trace else [])]
                subprocess.run(command, check=True, stdout=sys.stderr)
                runs.append(json.loads(out_path.read_text()))
            peaks = [round(r["peak_rss_mb"]) for r in runs]
            results[variant] = {"peak_rss_mb": peaks, "median_peak_rss_mb": statistics.median(peaks),
                                "step_s": [r["step_s"] for r in runs]}
            if args.trace:
                results[variant]["trace"] = [r["trace"] for r in runs]
            print(json.dumps({variant: results[variant]}), file=sys.stderr, flush=True)
    for variant, r in results.items():
        for trace in r.get("trace", []):
            print(trace_table(variant, trace) + "\n")
    print(f"| variant ({args.model}) | peak RSS MiB, each run | median |\n|---|---|---:|")
    for variant, r in results.items():
        print(f"| {variant} | {', '.join(map(str, r['peak_rss_mb']))} | {r['median_peak_rss_mb']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
