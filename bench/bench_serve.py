"""Requests/s and latency of the engine's server at several concurrencies.

    python bench/bench_serve.py --ckpt checkpoints/tiny-gsm8k [--tokens 32] [--requests 64]
        [--concurrency 1,8,32,64] [--threads 1] [--max-num-seqs 8] [--device cpu]

Starts the server (runners.server.run.Serving, in this process, on loopback),
then for each concurrency C sends ``--requests`` greedy requests of
``--tokens`` tokens each (``ignore_eos``: fixed length), C at a time, each
on its own connection, and prints one markdown row: requests/s, generated
tokens/s, latency p50/p90/max, and connection errors (resets, refusals).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(host, port, i, tokens):
    body = json.dumps({"prompt": f"Question: Sam has {i % 50 + 2} boxes of 4 pens. How many pens?\nAnswer:",
                       "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        reply = json.loads(r.read())
        ok = r.status == 200
        return time.perf_counter() - t0, reply["usage"]["completion_tokens"] if ok else 0, None if ok else r.status
    except OSError as exc:
        return time.perf_counter() - t0, 0, type(exc).__name__
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from runners.engine import Engine
    from runners.server.run import Serving

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(args.ckpt, device=args.device, max_num_seqs=args.max_num_seqs,
                    max_model_len=args.max_model_len)
    srv = Serving(engine).start()
    host, port = srv.sock.getsockname()[:2]
    one(host, port, 0, args.tokens)   # warm-up
    print(f"{args.requests} requests x {args.tokens} tokens, max-num-seqs {args.max_num_seqs}, "
          f"torch threads {torch.get_num_threads()}, {args.device}")
    print("| concurrent | requests/s | tokens/s | latency p50 | p90 | max | errors |")
    print("|---|---|---|---|---|---|---|")
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                res = list(pool.map(lambda i: one(host, port, i, args.tokens), range(args.requests)))
            wall = time.perf_counter() - t0
            lat = sorted(r[0] for r in res)
            errors = [r[2] for r in res if r[2] is not None]
            p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
            print(f"| {c} | {len(res) / wall:.2f} | {sum(r[1] for r in res) / wall:.0f} | "
                  f"{statistics.median(lat):.2f} s | {p90:.2f} s | {lat[-1]:.2f} s | {len(errors)} |", flush=True)
    finally:
        srv.close()


if __name__ == "__main__":
    main()
