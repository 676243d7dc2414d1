"""Routed experts: the torch op against the triton FusedMoE, bf16 / FP8 / FP4 weights.

    python bench/bench_moe.py [--tokens 1,32,512,16384] [--formats bf16,fp8,fp4] [--reps 50]

The shapes are DeepSeek-V4-Flash's experts (the ``flash-shape`` preset:
hidden 4096, intermediate 2048, 256 experts, top-6), bf16 activations. For
each token count and weight format both implementations run on the same
inputs, alternately, one CUDA-event-timed call at a time, cycling through
several routings (uniform top-k, so that repeated calls do not find the same
experts' weights in L2); the table gives medians. The triton path is also
timed as CUDA-graph replays (it has no host sync), which leaves out Python's
launch cost; expert-weight bandwidth is the bytes of the experts a call
touches over that time.

bf16: ``torch_ops.fused_moe`` vs ``triton_moe.fused_moe``; fp8 (e4m3, 128x128
UE8M0 scales) and fp4 (e2m1, per-32 UE8M0 scales): ``quant.fused_moe_quant``
(decodes each expert's weights, then bf16 matmuls) vs
``triton_moe.fused_moe_quant`` (decodes tiles inside the GEMMs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from parity import quant as pq  # noqa: E402
from runners.engine.ops import quant, torch_ops, triton_moe  # noqa: E402

D, I, E, K_TOP, LIMIT = 4096, 2048, 256, 6, 10.0  # flash-shape preset; swiglu_limit 10


def make_weights(fmt: str, g: torch.Generator):
    """Expert weights of one format, made and quantized one expert at a time (bounded memory)."""
    w13s, s13s, w2s, s2s = [], [], [], []
    for _ in range(E):
        w13 = (torch.randn(2 * I, D, device="cuda", generator=g) * D**-0.5).to(torch.bfloat16)
        w2 = (torch.randn(D, I, device="cuda", generator=g) * I**-0.5).to(torch.bfloat16)
        if fmt == "bf16":
            w13s.append(w13), w2s.append(w2)
            continue
        qz = pq.quantize_fp4_weight if fmt == "fp4" else pq.quantize_fp8_weight
        (q13, s13), (q2, s2) = qz(w13), qz(w2)
        w13s.append(q13), s13s.append(s13), w2s.append(q2), s2s.append(s2)
    st = lambda xs: torch.stack(xs) if xs else None  # noqa: E731
    return st(w13s), st(s13s), st(w2s), st(s2s)


def expert_bytes(ws) -> int:
    return sum(t[0].numel() * t.element_size() for t in ws if t is not None)


def impls(fmt: str, ws):
    w13, s13, w2, s2 = ws
    if fmt == "bf16":
        return {"torch": lambda x, ids, wt: torch_ops.fused_moe(x, ids, wt, w13, w2, LIMIT),
                "triton": lambda x, ids, wt: triton_moe.fused_moe(x, ids, wt, w13, w2, LIMIT)}
    return {"torch": lambda x, ids, wt: quant.fused_moe_quant(x, ids, wt, w13, s13, w2, s2, LIMIT, fmt),
            "triton": lambda x, ids, wt: triton_moe.fused_moe_quant(x, ids, wt, w13, s13, w2, s2, LIMIT, fmt)}


def inputs(T: int, n: int, g: torch.Generator):
    out = []
    for _ in range(n):
        x = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16)
        ids = torch.rand(T, E, device="cuda", generator=g).topk(K_TOP, dim=1).indices
        wt = torch.rand(T, K_TOP, device="cuda", generator=g).to(torch.bfloat16)
        out.append((x, ids, wt))
    return out


def bench_one(fns: dict, ins: list, reps: int) -> dict[str, list[float]]:
    for fn in fns.values():  # compile and warm up
        for args in ins[:2]:
            fn(*args)
    torch.cuda.synchronize()
    events = {name: [] for name in fns}
    for r in range(reps):
        args = ins[r % len(ins)]
        names = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate which goes first
        for name in names:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fns[name](*args)
            e.record()
            events[name].append((s, e))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) for s, e in evs] for name, evs in events.items()}


# --sweep: tile choices tried against the default heuristic (triton only)
SWEEP = {
    "decode": [dict(BK=32), dict(BN_down=128, BK=128, warps=4), dict(BN_up=128, BN_down=128, BK=128, warps=8)],
    "prefill": [dict(BK=32, stages=4), dict(BM=64, BN_down=128, warps=4, stages=4),
                dict(BM=128, BN_down=64, warps=8, stages=4)],
}


def sweep(fmt: str, ws, T: int, g, reps: int) -> None:
    w13, s13, w2, s2 = ws
    f = {"bf16": triton_moe.DENSE, "fp8": triton_moe.FP8, "fp4": triton_moe.FP4}[fmt]
    ins = inputs(T, 4, g)
    fns = {}
    for i, cfg in enumerate([{}] + SWEEP["decode" if T <= 64 else "prefill"]):
        if f != triton_moe.DENSE and cfg.get("BN_up", 128) != 128:
            continue
        fns[f"{i}:{cfg}"] = (lambda c: lambda x, ids, wt: triton_moe._moe(x, ids, wt, w13, s13, w2, s2, LIMIT, f,
                                                                          c))(cfg)
    for name, ts in bench_one(fns, ins, reps).items():
        print(f"  sweep {fmt:>4} T={T:<6} {statistics.median(ts):8.3f} ms  {name}", flush=True)


def graphed(fn, ins: list):
    """``fn`` on each input set captured in a CUDA graph (the triton path has no host
    sync, so it can be): a replay shows the GPU time without Python's launch cost."""
    graphs = {}
    for args in ins:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        graphs[id(args)] = g
    return lambda *args: graphs[id(args)].replay()


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,32,512,16384")
    ap.add_argument("--formats", default="bf16,fp8,fp4")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per implementation (fewer for long calls)")
    ap.add_argument("--json", help="write the raw timings here")
    ap.add_argument("--sweep", help="token counts at which to also time other triton tile choices")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, raw = [], []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; experts {E} x (2x{I} x {D} + {D} x {I}), "
          f"top-{K_TOP}, bf16 activations", flush=True)
    for fmt in args.formats.split(","):
        ws = make_weights(fmt, g)
        per_expert = expert_bytes(ws)
        fns = impls(fmt, ws)
        for T in tokens:
            ins = inputs(T, 8 if T <= 512 else 2, g)
            x, ids, wt = ins[0]
            err = rel_l2(fns["triton"](x, ids, wt), fns["torch"](x, ids, wt))
            # long calls: fewer repetitions (prefill of 16k tokens runs the torch op for ~0.1-1 s)
            reps = args.reps if T <= 512 else max(5, args.reps // 10)
            t = bench_one({**fns, "graph": graphed(fns["triton"], ins)}, ins, reps)
            med = {k: statistics.median(v) for k, v in t.items()}
            touched = statistics.mean(torch.unique(a[1]).numel() for a in ins)
            gbs = touched * per_expert / (med["graph"] * 1e-3) / 1e9
            rows.append((fmt, T, med["torch"], med["triton"], med["graph"], med["torch"] / med["triton"], gbs, err,
                         reps))
            raw.append({"format": fmt, "tokens": T, "reps": reps, "rel_l2": err, **{k: v for k, v in t.items()}})
            print(f"  {fmt:>4} T={T:<6} torch {med['torch']:9.3f} ms  triton {med['triton']:8.3f} ms  "
                  f"graph {med['graph']:8.3f} ms  x{med['torch'] / med['triton']:6.1f}  "
                  f"({gbs:6.0f} GB/s expert weights in the graph, rel_l2 {err:.1e})", flush=True)
            torch.cuda.empty_cache()
        for T in [int(t) for t in args.sweep.split(",")] if args.sweep else []:
            sweep(fmt, ws, T, g, args.reps if T <= 512 else max(5, args.reps // 10))
        del ws, fns
        torch.cuda.empty_cache()
    print("\n| weights | tokens | torch op (ms) | triton (ms) | triton in a CUDA graph (ms) | speedup (eager) "
          "| expert-weight GB/s (graph) | rel. L2 | reps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt, T, a, b, c, s, gbs, err, reps in rows:
        print(f"| {fmt} | {T} | {a:.3f} | {b:.3f} | {c:.3f} | {s:.1f}x | {gbs:.0f} | {err:.1e} | {reps} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    main()
