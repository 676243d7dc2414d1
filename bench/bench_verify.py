"""What verifying tensor hashes costs the commands that read dumps.

Writes a reference and a target dump (RECORDS x [ROWS, COLS] fp32, about
--mb MB each, page-cached) and times, best of --repeat in this process:

- sha256 of the stored bytes alone (the manifest hash);
- compare_dumps with and without hash verification;
- slot_invariance --same-prompt (the cheapest reader: memcmp) with and without;
- opening every shard of a dump of many small shards and loading its tensors
  (with --old-reader, also through another version's reader).

    git show 26f22ff:parity/store/reader.py > /tmp/old_reader.py
    python3 bench/bench_verify.py --dir /tmp/bverify --mb 1024 --repeat 3 --old-reader /tmp/old_reader.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time

import torch

from parity.compare.api import compare_dumps
from parity.slots import slot_invariance
from parity.store import DumpWriter, Record, open_dump
from parity.store.stats import tensor_stats


def _write(root: str, tensors: list[torch.Tensor], meta: dict) -> str:
    w = DumpWriter(root, fsync=False, run_info={"precision": "fp32"})
    for i, t in enumerate(tensors):
        rec = Record(key=f"model.layers.{i}:output", module=f"model.layers.{i}", stage="output", layer=i,
                     seq=w.next_seq(), meta=dict(meta), stats=tensor_stats(t))
        w.write_batch([(rec, t)])
    w.close()
    return w.root


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cat(root: str) -> None:
    # Read every file once so that all timings start from the page cache.
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--small-shards", type=int, default=2000)
    ap.add_argument("--old-reader", default=None,
                    help="A reader.py of another version (e.g. git show 26f22ff:parity/store/reader.py) to time too.")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    rows, cols = 2048, 4096                       # 32 MiB per fp32 record
    n = max(1, a.mb * (1 << 20) // (rows * cols * 4))
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(rows, cols, generator=g) for _ in range(n)]
    tgt = [t + 1e-7 * torch.randn(rows, cols, generator=g) for t in ref]
    rd = _write(os.path.join(a.dir, "ref"), ref, {"seq_ids": [0]})
    td = _write(os.path.join(a.dir, "target"), tgt, {"seq_ids": [0]})
    # One batch of 4 copies of one prompt, ragged and bitwise equal: slot-invariance's fast path.
    batched = _write(os.path.join(a.dir, "batched"), [t[: rows // 4].repeat(4, 1) for t in ref],
                     {"seq_ids": [0, 1, 2, 3], "cu_seqlens": [0, rows // 4, rows // 2, 3 * rows // 4, rows]})
    del ref, tgt
    for d in (rd, td, batched):
        _cat(d)
    gb = n * rows * cols * 4 / 1e9
    print(f"{n} records of {rows}x{cols} fp32 per dump: {gb:.2f} GB each; best of {a.repeat}")

    d = open_dump(rd)
    bufs = [d.load(r, verify=False) for r in d.records()]
    hash_s = _best(lambda: [hashlib.sha256(t.numpy()).digest() for t in bufs], a.repeat)
    print(f"sha256 of one dump's bytes: {hash_s:.2f} s ({gb / hash_s:.2f} GB/s)")
    del bufs, d

    for verify in (False, True):
        s = _best(lambda: compare_dumps(open_dump(rd, verify=verify), open_dump(td, verify=verify),
                                        decisions=False), a.repeat)
        print(f"compare_dumps, verify={verify}: {s:.2f} s")
    for verify in (False, True):
        s = _best(lambda: slot_invariance(open_dump(batched, verify=verify), same_prompt=True), a.repeat)
        print(f"slot_invariance --same-prompt, verify={verify}: {s:.2f} s")

    small = os.path.join(a.dir, "small")
    w = DumpWriter(small, fsync=False)
    for i in range(a.small_shards):
        t = torch.full((16, 16), float(i))
        w.write_batch([(Record(key=f"m{i}:output", module=f"m{i}", stage="output", seq=w.next_seq()), t)])
    w.close()
    _cat(small)

    readers = {"this reader (safe_open)": open_dump}
    if a.old_reader:
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_reader", a.old_reader)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        readers[f"{a.old_reader} (hand parser)"] = mod.open_dump
    for name, opener in readers.items():
        for verify in (False, True):
            def open_all():
                dd = opener(small)
                for r in dd.records():
                    dd.load(r, verify=verify)

            s = _best(open_all, a.repeat)
            print(f"{name}: {a.small_shards} shards of one 16x16 tensor, manifest + open + load, verify={verify}: "
                  f"{s:.2f} s ({s / a.small_shards * 1e6:.0f} us per shard)")


if __name__ == "__main__":
    main()
