"""Calibrate the noise-model verdicts: false alarms on the clean engine, and
detection and placement of planted single-op faults, per precision.

    python bench/calibrate_noise.py --out /tmp/calib [--members 4] [--plants 8] [--precisions fp32,bf16,fp8]
        [--rate R] [--sets tune,check]

Prefill-only side-by-side runs (the reference needs no forcing, so one
reference run and one ensemble serve every target of a prompt set) on the
committed tiny checkpoint. Two prompt sets: "tune" (the set the fail
multiplier was chosen on) and "check" (held out). A planted fault multiplies
one engine module's output by (1 + d) in one layer, module and layer drawn at
random (seeded); it is found when the compare fails, placed when
layer-bisect names that layer and module. Prints one table row per
(precision, set, d) and writes them to OUT/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CKPT = ROOT / "checkpoints" / "tiny-gsm8k"
PRESET = "deepseek_v4"
# engine modules a fault is planted in (their output, or output[0] for tuples)
SITES = ["input_layernorm", "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj", "self_attn.o_b_proj",
         "post_attention_layernorm", "mlp.experts", "mlp.shared_experts.down_proj", "mlp.shared_experts.up_proj",
         "self_attn.o_a_proj"]
SIZES = {"fp32": [1e-6, 1e-5, 1e-4], "bf16": [1e-2, 3e-2, 1e-1], "fp8": [3e-2, 1e-1, 3e-1]}


def _sets():
    from runners.demo import BUILTIN_QUESTIONS

    rng = random.Random(11)
    return {"tune": [f"Question: {q['question']}\nAnswer:" for q in BUILTIN_QUESTIONS[:2]],
            "check": [f"Question: {q['question']}\nAnswer:" for q in BUILTIN_QUESTIONS[2:4]]
            + [[rng.randrange(3, 4096) for _ in range(37)]]}


def _plant(layer: int, site: str, d: float):
    def patch(engine):
        mod = dict(engine.model.named_modules())[f"model.layers.{layer}.{site}"]

        def hook(m, args, out):
            if isinstance(out, tuple):
                return (out[0] * (1 + d),) + tuple(out[1:])
            return out * (1 + d)
        mod.register_forward_hook(hook, prepend=True)  # before capture's hook: the record shows it
    return patch


def _stage_matches(stage: str | None, site: str) -> bool:
    return stage is not None and stage.split(":", 1)[0] == site


def run(out: Path, precisions, members: int, plants: int, rate: float, sets) -> list[dict]:
    from parity import compare_dumps, layer_bisect
    from parity.noise import noise_model
    from runners.reference import _encode, run_reference
    from reference_models.load import load_tokenizer
    from runners.side_by_side import _REFERENCE_OF, _engine_run

    tok = load_tokenizer(CKPT)
    rows = []
    for precision in precisions:
        ref_cfg = _REFERENCE_OF[precision]
        for set_name, prompts in _sets().items():
            if set_name not in sets:
                continue
            ids = [_encode(tok, p) for p in prompts]
            base = out / precision / set_name
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            common = dict(precision=ref_cfg["precision"], quant_sim=ref_cfg["quant_sim"],
                          activations=ref_cfg["quant_sim"], max_new_tokens=1, stop_at_eos=False)
            t0 = time.perf_counter()
            run_reference(CKPT, ids, dump=base / "ref", **common)
            mem = []
            for k in range(members):
                run_reference(CKPT, ids, dump=base / f"noise-{k}", perturb_seed=k, perturb_rate=rate, **common)
                mem.append(base / f"noise-{k}")
            nm = noise_model(base / "ref", mem, preset=PRESET, check_tokens=False)
            t_noise = time.perf_counter() - t0

            def target(name, patch=None):
                dump = base / name
                _engine_run(CKPT, dump, ids, precision=precision, max_new_tokens=1, fault=None,
                            max_num_seqs=len(ids), device="cpu", full_logits=True, patch_engine=patch)
                return dump

            clean = target("clean")
            # prefill only: the prompts are the same, the generated token need not be
            res = compare_dumps(base / "ref", clean, preset=PRESET, noise=nm, check_tokens=False)
            fixed = compare_dumps(base / "ref", clean, preset=PRESET, check_tokens=False)
            profile = layer_bisect(None, None, compare=fixed)
            t = res.table
            rows.append({"precision": precision, "set": set_name, "d": 0.0, "runs": 1,
                         "fail_pairs": int((t["verdict"] == "fail").sum()),
                         "suspect_pairs": int((t["verdict"] == "warn").sum()), "pairs": len(t),
                         "fixed_fail_pairs": int((fixed.table["verdict"] == "fail").sum()),
                         "fixed_profile_alarm": profile.by_profile,
                         "noise_s": round(t_noise, 1)})
            print(json.dumps(rows[-1]), flush=True)
            rng = random.Random(f"{precision}-{set_name}")
            draws = [(rng.randrange(6), rng.choice(SITES)) for _ in range(plants)]
            for d in SIZES[precision]:
                found = placed = found_fixed = placed_fixed = 0
                misses = []
                for i, (layer, site) in enumerate(draws):
                    dump = target(f"plant-{d:g}-{i}", _plant(layer, site, d))
                    b = layer_bisect(None, None, compare=compare_dumps(base / "ref", dump, preset=PRESET, noise=nm,
                                                                       check_tokens=False))
                    bf = layer_bisect(None, None, compare=compare_dumps(base / "ref", dump, preset=PRESET,
                                                                        check_tokens=False))
                    found += b.compare.failed
                    found_fixed += bf.exit_code == 1  # a failing pair, or an entry in the error profile
                    ok = b.layer == layer and _stage_matches(b.stage, site)
                    placed += ok
                    placed_fixed += bf.layer == layer and _stage_matches(bf.stage, site)
                    if not ok:
                        misses.append(f"L{layer} {site} -> L{b.layer} {b.stage}")
                    shutil.rmtree(dump)
                rows.append({"precision": precision, "set": set_name, "d": d, "runs": plants, "found": found,
                             "placed": placed, "found_fixed": found_fixed, "placed_fixed": placed_fixed,
                             "misses": misses})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--plants", type=int, default=8)
    ap.add_argument("--precisions", default="fp32,bf16,fp8")
    ap.add_argument("--rate", type=float, default=None, help="rounding disagreement rate (default: the library's)")
    ap.add_argument("--sets", default="tune,check")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    from parity.noise import DEFAULT_RATE

    rate = DEFAULT_RATE if args.rate is None else args.rate
    rows = run(out, args.precisions.split(","), args.members, args.plants, rate, args.sets.split(","))
    for r in rows:
        r["rate"] = rate
    (out / "calibration.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
