"""Slot-invariance throughput: 61 layers x 4 slots x 512 tokens x 7168 bf16.

    python3 bench/bench_slots.py [--dir DIR] [--baseline] [--repeat 3]

Writes one batched engine-style dump (ragged [2048, 7168] bf16 per layer,
cu_seqlens of four 512-token slots holding the same prompt; about 1.8 GB)
through DumpWriter, reads it once so it is page-cached, then times
``parity.slot_invariance(dir, same_prompt=True)`` in a fresh process and
prints wall time and that process's peak RSS. ``--diverge-slot`` makes one
slot differ by one ULP from ``--diverge-layer`` on, so the float path runs too.
``--baseline`` also times the approach being replaced: torch.save pickles,
torch.load per layer, float64 cosine for every slot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def generate(root, layers, slots, tokens, hidden, diverge_slot, diverge_layer, pickles):
    from parity.store import DumpWriter, Record

    w = DumpWriter(os.path.join(root, "batched"), run_info={"impl": "engine", "bench": "slots"}, fsync=False)
    g = torch.Generator().manual_seed(0)
    cu = [i * tokens for i in range(slots + 1)]
    for L in range(layers):
        one = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
        t = one.repeat(slots, 1)
        if diverge_slot is not None and L >= diverge_layer:
            row = t[diverge_slot * tokens:(diverge_slot + 1) * tokens]
            row.view(torch.int16)[:, ::97] += 1  # one ULP on a sparse set of elements
        rec = Record(key=f"model.layers.{L}:output", module=f"model.layers.{L}", stage="output", layer=L,
                     phase="prefill", step=0, meta={"seq_ids": list(range(slots)), "cu_seqlens": cu},
                     seq=w.next_seq())
        w.write_batch([(rec, t)])  # one shard per layer, as a 64 MB flush would give
        if pickles:
            torch.save(t, os.path.join(root, f"layer{L:03d}.pt"))
    w.close()
    return w.root


def _warm(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while fh.read(64 << 20):
                    pass


def run_parity(root):
    from parity.slots import slot_invariance  # imports (torch, pandas) are not timed, as for the baseline

    t0 = time.perf_counter()
    res = slot_invariance(os.path.join(root, "batched"), same_prompt=True)
    wall = time.perf_counter() - t0
    bad = int((~res.table["invariant"]).sum())
    return {"wall_s": wall, "rows": len(res.table), "not_invariant": bad,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_baseline(root, slots, tokens):
    t0 = time.perf_counter()
    n = 0
    for f in sorted(x for x in os.listdir(root) if x.endswith(".pt")):
        t = torch.load(os.path.join(root, f))
        base = t[:tokens].double().reshape(-1)
        for s in range(1, slots):
            x = t[s * tokens:(s + 1) * tokens].double().reshape(-1)
            cos = torch.dot(x, base) / (x.norm() * base.norm())
            n += int(cos.item() < 1.0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(what, root, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--dir", root,
           "--slots", str(args.slots), "--tokens", str(args.tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="where to write the dumps (default: a temporary folder, removed after)")
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--diverge-slot", type=int, default=None)
    ap.add_argument("--diverge-layer", type=int, default=0)
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", choices=["parity", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = run_parity(args.dir) if args.child == "parity" else run_baseline(args.dir, args.slots, args.tokens)
        print(json.dumps(fn))
        return
    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-slots-")
        root = tmp.name
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(root, "batched", "run.json")):
        t0 = time.perf_counter()
        generate(root, args.layers, args.slots, args.tokens, args.hidden, args.diverge_slot,
                 args.diverge_layer, args.baseline)
        print(f"generated in {time.perf_counter() - t0:.1f} s under {root}")
    _warm(root)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "batched")) for f in fs)
    print(f"dump: {size / 1e9:.2f} GB, {args.layers} layers x {args.slots} slots x {args.tokens} tokens x "
          f"{args.hidden}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    for what in (["parity"] + (["baseline"] if args.baseline else [])):
        runs = [_child(what, root, args) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["wall_s"])
        extra = f", {best['rows']} rows, {best['not_invariant']} not invariant" if what == "parity" else ""
        print(f"{what}: best wall {best['wall_s']:.3f} s of {args.repeat} "
              f"({', '.join('%.3f' % r['wall_s'] for r in runs)}), peak RSS {best['peak_rss_mb']:.0f} MB{extra}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
