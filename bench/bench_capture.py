"""Capture overhead and write throughput.

    python bench/bench_capture.py [--device cpu|cuda] [--hidden 1024] [--tokens 512] [--layers 8]

Measures, on a residual MLP stack (the shape of a transformer's FFN path):
  1. forward time, capture installed but filtered out, vs no capture (goal: within 1%)
  2. forward time in `stats` mode on every block output (goal: under 10% overhead)
  3. `full` mode write throughput vs writing the same bytes with a plain file write (goal: >= 70%)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn

from parity import capture
from parity.config import CaptureConfig


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_forward(model, x, device, iters, handle=None):
    times = []
    with torch.no_grad():
        for i in range(iters):
            if handle is not None:
                handle.set_context(phase="prefill", step=i)
            sync(device)
            t = time.perf_counter()
            model(x)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", default=None, help="where to write dumps (default: a temp dir)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = args.device
    torch.manual_seed(0)
    model = Stack(args.hidden, args.layers).to(dev, dtype).eval()
    x = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype)
    base = tempfile.mkdtemp(dir=args.dir)
    print(f"device={dev} dtype={args.dtype} hidden={args.hidden} tokens={args.tokens} layers={args.layers} "
          f"threads={torch.get_num_threads()}")

    time_forward(model, x, dev, 3)
    # Interleave the variants so drift (thermal, other load) hits them alike.
    t_none, t_filtered, t_stats = [], [], []
    h_f = None
    for rep in range(3):
        t_none.append(time_forward(model, x, dev, args.iters))
        h_f = capture.install(model, CaptureConfig(dump_dir=os.path.join(base, f"f{rep}"),
                                                   classes=frozenset({"NoSuchModule"}), stages=frozenset({"outputs"})))
        t_filtered.append(time_forward(model, x, dev, args.iters, h_f))
        h_f.close()
        h_s = capture.install(model, CaptureConfig(dump_dir=os.path.join(base, f"s{rep}"), classes=frozenset({"Block"}),
                                                   mode="stats", calls=None))
        t_stats.append(time_forward(model, x, dev, args.iters, h_s))
        h_s.close()
    none, filt, stats = min(t_none), min(t_filtered), min(t_stats)
    print(f"forward, no capture:            {none * 1e3:8.3f} ms")
    print(f"forward, installed+filtered:    {filt * 1e3:8.3f} ms  ({(filt / none - 1) * 100:+.2f}%)")
    print(f"forward, stats on {args.layers} blocks:    {stats * 1e3:8.3f} ms  ({(stats / none - 1) * 100:+.2f}%)")

    # Full mode: every block output of `iters` forwards, until on disk.
    h = capture.install(model, CaptureConfig(dump_dir=os.path.join(base, "full"), classes=frozenset({"Block"}),
                                             calls=None))
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(args.iters):
            h.set_context(phase="prefill", step=i)
            model(x)
    h.close()
    t_full = time.perf_counter() - t0
    nbytes = args.iters * args.layers * x.numel() * x.element_size()
    # The same bytes through a plain write (+fsync, the same durability), in shards of similar size.
    payload = torch.randn(args.layers * x.numel(), dtype=torch.float32).to(dtype).view(torch.uint8).numpy()
    t0 = time.perf_counter()
    t_fwd_only = none * args.iters
    for i in range(args.iters):
        with open(os.path.join(base, f"plain{i}.bin"), "wb") as fh:
            fh.write(memoryview(payload))
            fh.flush()
            os.fsync(fh.fileno())
    t_plain = time.perf_counter() - t0
    mb = nbytes / 1e6
    print(f"full mode: {mb:.0f} MB in {t_full:.2f} s incl. {t_fwd_only:.2f} s of forward "
          f"-> {mb / t_full:.0f} MB/s end to end, {mb / max(t_full - t_fwd_only, 1e-9):.0f} MB/s beyond the forward")
    print(f"plain write+fsync of the same bytes: {t_plain:.2f} s -> {mb / t_plain:.0f} MB/s")
    print(f"capture write throughput / plain: {(t_plain / max(t_full - t_fwd_only, 1e-9)) * 100:.0f}%")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
