"""Batch-invariance probe, run in a subprocess per CPU capability and thread count.

    ATEN_CPU_CAPABILITY=avx2 python tests/invariance_probe.py --threads 2 CKPT

Prints one JSON object: the capability torch actually runs with, a hash of
the batch-invariant primitives' outputs on fixed inputs (which must be the
same under every capability and thread count), and per precision the
requests whose logits differ by a single bit between a batch (ragged, slots
reused) and the same request alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

from test_engine_common import prompts, run_engine

PROMPT_LENS = (5, 40, 33)  # below and past the window (16), past the HCA ratio (16)
NEW_TOKENS = [3, 3, 2]


def primitives_hash() -> str:
    from runners.engine.ops import invariant as inv

    g = torch.Generator().manual_seed(0)

    def rand(*shape):  # integers, scaled: torch.randn's values themselves depend on the capability
        return torch.randint(-2**22, 2**22, shape, generator=g).double() / 2**20

    h = hashlib.sha256()
    for dt in (torch.float32, torch.bfloat16):
        x, w = rand(37, 45).to(dt), rand(29, 45).to(dt)
        outs = [inv.exp(x), inv.sigmoid(x), inv.silu(x), inv.softplus(x), inv.rsqrt(x.abs() + 1),
                inv.sum(x, 0), inv.sum(x, 1), inv.mean(x, 1), inv.softmax(x, -1), inv.softmax(x, 0),
                inv.linear(x, w), inv.matmul(x.view(37, 5, 9), x.view(37, 9, 5)), *inv.cos_sin(x.float() * 300)]
        for o in outs:
            h.update(o.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def engine_mismatches(ckpt: str, precision: str) -> list[str]:
    from runners.engine import Engine

    ps = prompts(PROMPT_LENS, seed=3)

    def engine(slots):
        return Engine(ckpt, precision=precision, max_num_seqs=slots, max_model_len=96)

    # two slots for three requests: the last joins a running decode in a freed slot
    batched = run_engine(engine(2), ps, NEW_TOKENS)
    together = run_engine(engine(3), ps, NEW_TOKENS)
    bad = []
    for i, p in enumerate(ps):
        alone = run_engine(engine(1), [p], NEW_TOKENS[i])[0]
        for name, run in (("slots reused", batched), ("one batch", together)):
            toks, logits = run[i]
            if toks != alone[0] or not torch.equal(logits, alone[1]):
                diff = (logits.double() - alone[1].double()).abs().max().item() if logits.shape == alone[1].shape \
                    else float("nan")
                bad.append(f"request {i} ({len(p)} tokens), {name}: max |diff| {diff:.3g}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--precisions", default="fp32,bf16,fp8")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "primitives": primitives_hash(),
           "mismatches": {p: engine_mismatches(args.ckpt, p) for p in args.precisions.split(",")}}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
