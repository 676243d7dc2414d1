"""Set the noise model's rate from natural variants: correct executions of
the reference that differ from it only in how they round.

    python bench/calibrate_rate.py --out /tmp/rate [--rates 0.001,0.003,0.01,0.03] [--members 4]

Natural variants of the tiny DeepSeek-V4 reference (transformers, prefill of
two GSM8K questions, the committed checkpoint), fp32 and bf16:
  - another kernel capability (ATEN_CPU_CAPABILITY=default against the
    machine's best), one process each;
  - two intra-op threads against one;
and of a transformers Llama (random weights, 4 layers): sdpa attention
against eager.

For each rate, an ensemble of perturbed reference runs gives the envelopes;
each variant is then judged as a target would be. A rate is safe when no
variant fails (2x the envelope); the smaller the safe rate, the tighter the
envelopes and the smaller the faults found (bench/calibrate_noise.py). Prints
one row per (model, precision, variant, rate): failing and suspect pairs and
the largest score (rel_l2 minus the record's last rounding, over its
envelope); writes OUT/rate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CKPT = ROOT / "checkpoints" / "tiny-gsm8k"
PRESET = "deepseek_v4"


def _prompts():
    from runners.demo import BUILTIN_QUESTIONS

    return [f"Question: {q['question']}\nAnswer:" for q in BUILTIN_QUESTIONS[:2]]


def _reference(dump: Path, precision: str, *, env: dict | None = None, threads: int = 1, seed=None, rate=None):
    """One prefill of the reference, in its own process (a kernel capability
    is fixed when torch loads)."""
    args = {"dump": str(dump), "precision": precision, "threads": threads, "seed": seed, "rate": rate}
    subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], check=True, cwd=ROOT,
                   env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dump


def _one(spec: str) -> None:
    from reference_models.load import load_tokenizer
    from runners.reference import _encode, run_reference

    a = json.loads(spec)
    torch.set_num_threads(a["threads"])
    tok = load_tokenizer(CKPT)
    ids = [_encode(tok, p) for p in _prompts()]
    kw = {} if a["seed"] is None else {"perturb_seed": a["seed"], "perturb_rate": a["rate"]}
    run_reference(CKPT, ids, dump=a["dump"], precision=a["precision"], quant_sim=False, activations=False,
                  max_new_tokens=1, stop_at_eos=False, **kw)


def _llama(path: Path, attn: str, dtype, seed=None, rate=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from parity import capture
    from parity.config import CaptureConfig
    from parity.noise import perturbed

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, attn_implementation=attn)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    h = capture.install(model, CaptureConfig(dump_dir=str(path), classes=frozenset(
        {"LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "Linear"})))
    h.set_context(phase="prefill", step=0, seq_ids=[0, 1])
    with torch.no_grad():
        if seed is None:
            model(ids)
        else:
            with perturbed(model, seed, rate=rate):
                model(ids)
    h.set_run_info(token_ids=ids.tolist(), precision="bf16" if dtype == torch.bfloat16 else "fp32")
    h.close()
    return path


def _judge(ref, target, model, preset, filt) -> dict:
    from parity import compare_dumps
    from parity.compare.verdict import THRESHOLDS, _key_for

    res = compare_dumps(ref, target, preset=preset, noise=model, check_tokens=False, filter=filt)
    t = res.table
    worst = 0.0
    for r in t.itertuples(index=False):
        env = getattr(r, "noise_env", None)
        if r.rel_l2 is None or env is None or env != env or not env:
            continue
        dt = getattr(torch, str(r.dtype).split("/")[0], torch.float32)
        if not dt.is_floating_point:
            continue
        atol = THRESHOLDS[_key_for(dt)].floor_atol
        worst = max(worst, (float(r.rel_l2) - atol) / float(env))
    return {"pairs": len(t), "fail": int((t["verdict"] == "fail").sum()), "suspect": int((t["verdict"] == "warn").sum()),
            "max_score": round(worst, 3)}


def run(out: Path, rates, members: int) -> list[dict]:
    from parity.noise import noise_model

    rows = []
    for precision in ("fp32", "bf16"):
        base = out / "dsv4" / precision
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        ref = _reference(base / "ref", precision)
        variants = {"capability default": _reference(base / "cap", precision, env={"ATEN_CPU_CAPABILITY": "default"}),
                    "2 threads": _reference(base / "threads", precision, threads=2)}
        for rate in rates:
            mem = [_reference(base / f"noise-{rate:g}-{k}", precision, seed=k, rate=rate) for k in range(members)]
            nm = noise_model(ref, mem, preset=PRESET, check_tokens=False)
            for name, dump in variants.items():
                rows.append({"model": "deepseek_v4 tiny", "precision": precision, "variant": name, "rate": rate,
                             **_judge(ref, dump, nm, PRESET, None)})
                print(json.dumps(rows[-1]), flush=True)
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        lb = out / "llama" / precision
        shutil.rmtree(lb, ignore_errors=True)
        lb.mkdir(parents=True)
        lref, sdpa = _llama(lb / "eager", "eager", dtype), _llama(lb / "sdpa", "sdpa", dtype)
        keep = r"^(?!.*self_attn:output\.1$)"  # eager attention also returns its weights
        for rate in rates:
            mem = [_llama(lb / f"noise-{rate:g}-{k}", "eager", dtype, seed=k, rate=rate) for k in range(members)]
            nm = noise_model(lref, mem, filter=keep)
            rows.append({"model": "llama", "precision": precision, "variant": "sdpa vs eager", "rate": rate,
                         **_judge(lref, sdpa, nm, None, keep)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--rates", default="0.001,0.003,0.01,0.03")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        _one(args.one)
        return 0
    if not args.out:
        ap.error("--out is required")
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = run(out, [float(r) for r in args.rates.split(",")], args.members)
    (out / "rate.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
