"""Capture overhead and write throughput.

    python bench/bench_capture.py [--device cpu|cuda] [--hidden 1024] [--tokens 512] [--layers 8]

Measures, on a residual MLP stack (the shape of a transformer's FFN path):
  1. forward time, capture installed but filtered out, vs no capture (goal: within 1%)
  2. forward time in `stats` mode on every block output (goal: under 10% overhead)
  3. `full` mode write throughput vs writing the same bytes with a plain file write (goal: >= 70%)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn

import parity
from parity import capture
from parity.capture import session
from parity.store import stats_cuda
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


def plain_write(base, payload, iters, file_bytes):
    t0 = time.perf_counter()
    view = memoryview(payload)
    k = 0
    for _ in range(iters):
        for start in range(0, len(view), file_bytes):
            with open(os.path.join(base, f"plain{k}.bin"), "wb") as fh:
                fh.write(view[start:start + file_bytes])
                fh.flush()
                os.fsync(fh.fileno())
            k += 1
    t = time.perf_counter() - t0
    for i in range(k):
        os.remove(os.path.join(base, f"plain{i}.bin"))
    return t


class Clock:
    """Where the writer thread's time goes: device-to-host copies, hashing,
    file writes and fsyncs (wall time inside each call)."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed

    @contextlib.contextmanager
    def watching(self, handle):
        sess = handle._session
        saved = (os.fsync, sess._to_host, sess.writer._write_shard, sess.writer.append_manifest)
        os.fsync = self.wrap("fsync", os.fsync)
        sess._to_host = self.wrap("device-to-host", sess._to_host)
        sess.writer._write_shard = self.wrap("shard (write+fsync+rename)", sess.writer._write_shard)
        sess.writer.append_manifest = self.wrap("manifest", sess.writer.append_manifest)
        try:
            yield
        finally:
            os.fsync = saved[0]

    def report(self):
        return ", ".join(f"{k} {v:.2f} s/{self.calls[k]}" for k, v in self.spent.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--flush-mb", type=lambda v: [int(x) for x in v.split(",")], default=[session._FLUSH_BYTES >> 20],
                    help="shard sizes (MB, comma-separated) the writer batches up to in full mode")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the pipeline-alone measurement (best is kept)")
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
    t_none, t_filtered, t_stats, t_stats_torch = [], [], [], []
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
        if dev == "cuda":  # the same with summaries in torch ops instead of the one-pass kernel
            saved, stats_cuda.stats_vector_cuda = stats_cuda.stats_vector_cuda, lambda t: None
            h_s = capture.install(model, CaptureConfig(dump_dir=os.path.join(base, f"st{rep}"),
                                                       classes=frozenset({"Block"}), mode="stats", calls=None))
            t_stats_torch.append(time_forward(model, x, dev, args.iters, h_s))
            h_s.close()
            stats_cuda.stats_vector_cuda = saved
    none, filt, stats = min(t_none), min(t_filtered), min(t_stats)
    print(f"forward, no capture:            {none * 1e3:8.3f} ms")
    print(f"forward, installed+filtered:    {filt * 1e3:8.3f} ms  ({(filt / none - 1) * 100:+.2f}%)")
    print(f"forward, stats on {args.layers} blocks:    {stats * 1e3:8.3f} ms  ({(stats / none - 1) * 100:+.2f}%)")
    if t_stats_torch:
        st = min(t_stats_torch)
        print(f"  same, summaries in torch ops: {st * 1e3:8.3f} ms  ({(st / none - 1) * 100:+.2f}%)")

    nbytes = args.iters * args.layers * x.numel() * x.element_size()
    mb = nbytes / 1e6
    t_fwd_only = none * args.iters
    # The same bytes through a plain write (+fsync, the same durability): one
    # file per forward, and again in files of each shard size.
    payload = torch.randn(args.layers * x.numel(), dtype=torch.float32).to(dtype).view(torch.uint8).numpy()
    plain = [plain_write(base, payload, args.iters, len(payload))]
    print(f"plain write+fsync, one file per forward: {plain[0]:.2f} s -> {mb / plain[0]:.0f} MB/s")
    for flush_mb in args.flush_mb:
        plain.append(plain_write(base, payload, args.iters, flush_mb << 20))
        print(f"plain write+fsync in {flush_mb} MB files:  {plain[-1]:.2f} s -> {mb / plain[-1]:.0f} MB/s")
    t_plain = min(plain)  # the baseline is the best plain write: the first one may pay for a cold disk

    # Full mode: every block output of `iters` forwards, until on disk.
    for flush_mb in args.flush_mb:
        session._FLUSH_BYTES = flush_mb << 20
        clock = Clock()
        h = capture.install(model, CaptureConfig(dump_dir=os.path.join(base, f"full{flush_mb}"),
                                                 classes=frozenset({"Block"}), calls=None))
        t0 = time.perf_counter()
        with clock.watching(h), torch.no_grad():
            for i in range(args.iters):
                h.set_context(phase="prefill", step=i)
                model(x)
            t_host = time.perf_counter() - t0
            h.close()
        t_full = time.perf_counter() - t0
        shards = len([f for f in os.listdir(os.path.join(base, f"full{flush_mb}", "rank0")) if f.endswith(".safetensors")])
        print(f"full mode, shards up to {flush_mb} MB: {mb:.0f} MB in {t_full:.2f} s ({shards} shards; the forwards "
              f"returned after {t_host:.2f} s, {t_fwd_only:.2f} s without capture) -> {mb / t_full:.0f} MB/s end to end, "
              f"{mb / max(t_full - t_fwd_only, 1e-9):.0f} MB/s beyond the forward")
        print(f"  writer thread: {clock.report()}")
        print(f"  capture write throughput / plain: {(t_plain / max(t_full - t_fwd_only, 1e-9)) * 100:.0f}%")
        shutil.rmtree(os.path.join(base, f"full{flush_mb}"), ignore_errors=True)
    # The pipeline alone (copy, summary, hash, write, fsync), with no model
    # competing for the cores: the same bytes recorded as taps of ready
    # tensors, against a plain write in the same round (best of --repeat).
    outs = [torch.randn_like(x) for _ in range(args.layers)]
    session._FLUSH_BYTES = args.flush_mb[0] << 20
    t_taps, t_plain2 = [], []
    for rep in range(args.repeat):
        t_plain2.append(plain_write(base, payload, args.iters, len(payload)))
        h = capture.install(nn.Identity(), CaptureConfig(dump_dir=os.path.join(base, f"taps{rep}"), calls=None))
        t0 = time.perf_counter()
        for i in range(args.iters):
            h.set_context(phase="prefill", step=i)
            for j, o in enumerate(outs):
                parity.tap(f"layers.{j}.out", o)
        h.close()
        t_taps.append(time.perf_counter() - t0)
        shutil.rmtree(os.path.join(base, f"taps{rep}"), ignore_errors=True)
    best_taps, best_plain = min(t_taps), min(t_plain, *t_plain2)
    print(f"full mode, capture pipeline alone: {mb:.0f} MB in {best_taps:.2f} s -> {mb / best_taps:.0f} MB/s, "
          f"{best_plain / best_taps * 100:.0f}% of the best plain write ({mb / best_plain:.0f} MB/s); "
          f"runs {' '.join(f'{t:.2f}' for t in t_taps)} s, plain {' '.join(f'{t:.2f}' for t in t_plain2)} s")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
