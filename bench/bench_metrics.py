"""Throughput of parity.compare.metrics.pair_metrics.

    python3 bench/bench_metrics.py                 # default cases, all cores
    taskset -c 0,1 python3 bench/bench_metrics.py --threads 2

Prints, per case, the best wall time of --repeat calls, the input read rate
(bytes of a plus bytes of b per second) and the peak RSS growth during the
calls over the RSS with the inputs allocated (VmHWM after a reset).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from parity.compare.metrics import pair_metrics, summary_stats  # noqa: E402

CASES = {
    "bf16 512x7168": ((512, 7168), torch.bfloat16, torch.bfloat16),
    "bf16 64M": ((1 << 26,), torch.bfloat16, torch.bfloat16),
    "bf16 vs fp32 512x7168": ((512, 7168), torch.bfloat16, torch.float32),
    "bf16 vs fp32 64M": ((1 << 26,), torch.bfloat16, torch.float32),
    "fp32 64M": ((1 << 26,), torch.float32, torch.float32),
}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss():
    # Linux >= 4.0: "5" resets VmHWM (peak RSS) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _inputs(shape, da, db):
    # Filled in slices so that no full-size float32 temporary raises the
    # peak RSS before the measurement starts.
    g = torch.Generator().manual_seed(0)
    a, b = torch.empty(shape, dtype=da), torch.empty(shape, dtype=db)
    fa, fb = a.view(-1), b.view(-1)
    for s in range(0, fa.numel(), 1 << 22):
        ref = torch.randn(min(1 << 22, fa.numel() - s), generator=g)
        fb[s:s + ref.numel()] = ref
        fa[s:s + ref.numel()] = ref + 0.01 * torch.randn(ref.numel(), generator=g)
    return a, b


def run_case(name, shape, da, db, repeat, threads):
    a, b = _inputs(shape, da, db)
    nbytes = a.numel() * a.element_size() + b.numel() * b.element_size()
    _reset_peak_rss()
    rss0 = _status_mb("VmRSS")
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        pair_metrics(a, b, threads=threads)
        best = min(best, time.perf_counter() - t)
    t = time.perf_counter()
    summary_stats(b)
    st = time.perf_counter() - t
    print(f"{name:24s} {best * 1e3:8.1f} ms  {nbytes / best / 1e6:8.0f} MB/s  "
          f"summary_stats(b) {b.numel() * b.element_size() / st / 1e6:6.0f} MB/s  "
          f"peak RSS +{_status_mb('VmHWM') - rss0:.0f} MB (inputs {nbytes / 1e6:.0f} MB)", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; pair_metrics runs that many block workers")
    p.add_argument("--block", type=int, default=None, help="override the block size (elements)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.block:
        import parity.compare.metrics as m
        m._BLOCK = args.block
    import parity.compare.metrics as m
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, block {m._BLOCK}, "
          f"{os.cpu_count()} cpus visible, affinity {sorted(os.sched_getaffinity(0))}")
    for name in args.cases:
        run_case(name, *CASES[name], args.repeat, args.threads)


if __name__ == "__main__":
    main()
