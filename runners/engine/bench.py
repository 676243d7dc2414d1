"""Time a prefill + decode run of the engine, optionally checked against the reference.

    python -m runners.engine.bench --preset tiny --prompts 3 --prompt-len 64 --new 8 [--compare]
    python -m runners.engine.bench --ckpt DIR --precision bf16 --device cuda

--compare runs transformers' model on each prompt alone (same precision;
fp8 under reference_models.quant_sim; teacher-forced with the engine's tokens) and prints the worst relative L2
error per decoder layer and of the logits, over the prefill and every decode.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runners.engine.bench")
    ap.add_argument("--ckpt")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from runners.engine import Engine, SamplingParams

    ckpt = args.ckpt
    if ckpt is None:
        from reference_models.synth import synthesize

        tmp = tempfile.TemporaryDirectory(prefix=f"engine-{args.preset}-")
        ckpt = tmp.name
        synthesize(args.preset, seed=0, out=ckpt, dtype="fp32" if args.precision == "fp32" else "bf16", force=True)
    eng = Engine(ckpt, precision=args.precision, device=args.device, max_num_seqs=args.prompts,
                 max_model_len=args.prompt_len + args.new + 8, max_num_batched_tokens=args.prompts * args.prompt_len)
    g = torch.Generator().manual_seed(0)
    # prompts of different lengths, the longest args.prompt_len
    lens = [max(1, args.prompt_len - 7 * i) for i in range(args.prompts)]
    prompts = [torch.randint(3, eng.config.vocab_size, (n,), generator=g).tolist() for n in lens]

    names = [f"model.layers.{i}" for i in range(eng.config.num_layers)]
    rec, handles = {n: [] for n in names}, []
    if args.compare:
        mods = dict(eng.model.named_modules())
        for n in names:
            handles.append(mods[n].register_forward_hook(
                lambda m, a, o, n=n: rec[n].append((eng.last_meta.cu_seqlens, o.float().clone()))))
    logits = []
    orig = eng.forward
    eng.forward = lambda chunks, **kw: logits.append(orig(chunks, **kw)) or logits[-1]

    rids = [eng.add_request(p, SamplingParams(max_new_tokens=args.new, ignore_eos=True)) for p in prompts]
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    times = []
    while eng.has_unfinished():
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        eng.step()
        sync()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    for h in handles:
        h.remove()
    tokens = [eng.requests[r].output_ids for r in rids]
    pw, pc = times[0]
    dw = sum(t[0] for t in times[1:])
    dc = sum(t[1] for t in times[1:])
    print(f"checkpoint {ckpt} precision {args.precision} device {args.device} threads {torch.get_num_threads()}")
    print(f"prefill {sum(lens)} tokens ({lens}): {pw * 1e3:.1f} ms wall, {pc * 1e3:.1f} ms CPU")
    print(f"decode {len(times) - 1} forwards x {len(prompts)} seqs: {dw * 1e3:.1f} ms wall, {dc * 1e3:.1f} ms CPU "
          f"({dw / max(1, len(times) - 1) * 1e3:.1f} ms/step)")

    if args.compare:
        from transformers import DynamicCache

        from reference_models.load import load_reference

        import contextlib

        from reference_models.quant_sim import quant_sim

        ref = load_reference(ckpt, args.precision if args.precision != "fp8" else "bf16", args.device)
        # fp8: the reference under the same FP8/FP4 quantization simulation
        sim = (lambda: quant_sim(ref, weights=True, activations=True)) if args.precision == "fp8" \
            else contextlib.nullcontext
        worst = {n: 0.0 for n in names + ["logits"]}
        same_tokens = True
        for b, (p, toks) in enumerate(zip(prompts, tokens)):
            out = {n: [] for n in names}
            hs = [dict(ref.named_modules())[n].register_forward_hook(
                lambda m, a, o, n=n: out[n].append(o[0].float())) for n in names]
            cache = DynamicCache(config=ref.config)
            ref_logits = []
            with torch.no_grad(), sim():
                ids = torch.tensor([p], device=args.device)
                for step in range(len(toks)):
                    r = ref(input_ids=ids, past_key_values=cache, use_cache=True)
                    ref_logits.append(r.logits[0, -1].float())
                    ids = torch.tensor([[toks[step]]], device=args.device)
            for h in hs:
                h.remove()
            same_tokens &= [int(x.argmax()) for x in ref_logits] == toks
            for step in range(len(toks)):
                for n in names:
                    cu, e = rec[n][step]
                    worst[n] = max(worst[n], _rel(e[cu[b]:cu[b + 1]], out[n][step]))
                worst["logits"] = max(worst["logits"], _rel(logits[step][b], ref_logits[step]))
        print(f"vs reference ({len(prompts)} seqs x {len(tokens[0])} forwards), worst relative L2:")
        for n, v in worst.items():
            print(f"  {n:18s} {v:.2e}")
        print(f"greedy tokens identical: {same_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
