"""Summary statistics of one tensor on the GPU: triton one-pass kernel vs torch ops.

    python bench/bench_stats.py [--iters 50]

Times ``stats_vector_cuda`` and ``stats_vector_torch`` with CUDA events on
tensors of the sizes capture sees (a decode step's hidden state up to a large
prefill's FFN input), and checks both give the same summary.
"""

from __future__ import annotations

import argparse
import time

import torch

from parity.store.stats import stats_from_vector, stats_vector_torch
from parity.store.stats_cuda import stats_vector_cuda

CASES = [
    ("bf16 8 x 7168 (decode hidden)", (8, 7168), torch.bfloat16),
    ("bf16 512 x 7168", (512, 7168), torch.bfloat16),
    ("bf16 4096 x 4096", (4096, 4096), torch.bfloat16),
    ("bf16 4096 x 16384", (4096, 16384), torch.bfloat16),
    ("fp32 4096 x 4096", (4096, 4096), torch.float32),
    ("fp16 4096 x 4096 with nan/inf", (4096, 4096), torch.float16),
]


def timed(fn, x, iters):
    """(host us per call, GPU us per call). The GPU first sleeps long enough
    for the host to queue every call, so the events time the kernels alone."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)
    start.record()
    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    host = time.perf_counter() - t
    end.record()
    end.synchronize()
    return host / iters * 1e6, start.elapsed_time(end) / iters * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20,
                    help="calls per case (keep calls x launches under the launch queue depth, about 1000)")
    args = ap.parse_args()
    if stats_vector_cuda(torch.zeros(4, device="cuda")) is None:
        raise SystemExit("triton path unavailable on this machine")
    torch.manual_seed(0)
    print("us per call: host (launching) / GPU (kernels alone)")
    print(f"{'case':34s} {'MB':>7s} {'torch host/GPU':>15s} {'triton host/GPU':>16s} {'GPU speedup':>12s} "
          f"{'triton GB/s':>12s}  agree")
    for name, shape, dtype in CASES:
        x = torch.randn(shape, device="cuda", dtype=torch.float32).mul_(3).to(dtype)
        if "nan" in name:
            x.view(-1)[::9973] = float("nan")
            x.view(-1)[5::10007] = float("inf")
        mb = x.numel() * x.element_size() / 1e6
        t_torch = timed(stats_vector_torch, x, args.iters)
        t_tri = timed(stats_vector_cuda, x, args.iters)
        a = stats_from_vector(stats_vector_torch(x).cpu())
        b = stats_from_vector(stats_vector_cuda(x).cpu())
        agree = all(abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(a[k])) for k in a)
        print(f"{name:34s} {mb:7.1f} {t_torch[0]:7.1f}/{t_torch[1]:<7.1f} {t_tri[0]:8.1f}/{t_tri[1]:<7.1f} "
              f"{t_torch[1] / t_tri[1]:11.1f}x {mb / 1e3 / (t_tri[1] * 1e-6):12.0f}  {'yes' if agree else f'NO {a} vs {b}'}")


if __name__ == "__main__":
    main()
