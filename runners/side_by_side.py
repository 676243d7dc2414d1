"""Run the reference and the engine on the same token ids, with capture on.

    python -m runners.side_by_side --ckpt DIR (--prompts FILE | --gsm8k N [--data PATH]) --out DIR
        [--precision fp32|bf16|fp8] [--slots N] [--decode-steps N] [--fault NAME] [--floor] [--noise K]
        [--force]

Writes one dump per run into OUT and ``index.json`` saying which is which:

    target/     the engine, all prompts in one batch, greedy
    ref/        the reference, forced on the engine's tokens (teacher forcing)
    floor/      (--floor) the reference in fp64, forced on the same tokens
    noise-<k>/  (--noise K) the reference with every op perturbed at the scale
                of one rounding, seed k: a noise ensemble for the verdicts
    batched/    the engine, N sequences in N slots    } for slot invariance
                that served other requests before
    solo-<i>/   the engine, prompt i alone, fresh      }

Then, for example:

    parity ref-vs-target --ref OUT/ref --target OUT/target --preset deepseek_v4
    parity layer-bisect --ref OUT/ref --target OUT/target --preset deepseek_v4 \
        [--noise OUT/noise-0 --noise OUT/noise-1 ...]
    parity slot-invariance --dir OUT/batched --solo OUT/solo-0 --solo OUT/solo-1 ... \
        --filter SLOT_FILTER        (the regex is in index.json as slot_filter)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from parity.errors import ParityError
from parity.outdir import prepare_out

PRECISIONS = ("fp32", "bf16", "fp8")
INDEX = "index.json"
PRESET = "deepseek_v4"
# Engine records a slot-invariance check must skip: compressor:output.1 holds
# absolute rows of the paged pool (they depend on which cache blocks a
# sequence got, by design), and compressor:output.0 / the compressors' kv_norm
# hold compressed entries under the forward's token layout, which cannot be
# cut per sequence. The compressed_kv tap carries those entries with their
# own layout and stays in.
SLOT_FILTER = r"^(?!.*(?:\.compressor:output\.|\.compressor\.(?:indexer\.)?kv_norm:))"
# Folders and files this runner owns inside OUT; --force removes only these.
_OWNED = ("ref", "target", "floor", "batched", INDEX)

# The reference that computes what the engine computes at each precision:
# fp8 in the engine is bf16 arithmetic on FP8/FP4 weights and FP8 activations
# (docs/engine.md), which the reference reproduces with quant_sim.
_REFERENCE_OF = {
    "fp32": {"precision": "fp32", "quant_sim": False},
    "bf16": {"precision": "bf16", "quant_sim": False},
    "fp8": {"precision": "bf16", "quant_sim": True},
}


@dataclass
class SideBySide:
    """What ``run_side_by_side`` wrote; paths are absolute."""

    out: Path
    index: dict
    prompt_ids: list[list[int]]
    generated: list[list[int]]
    timings: dict[str, float] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.out / self.index["dumps"][name]

    @property
    def ref(self) -> Path:
        return self.path("ref")

    @property
    def target(self) -> Path:
        return self.path("target")

    @property
    def batched(self) -> Path:
        return self.path("batched")

    @property
    def solos(self) -> list[Path]:
        return [self.out / p for p in self.index["dumps"]["solo"]]

    @property
    def floor(self) -> Path | None:
        p = self.index["dumps"].get("floor")
        return self.out / p if p else None

    @property
    def noise(self) -> list[Path]:
        return [self.out / p for p in self.index["dumps"].get("noise") or []]


# ---------------------------------------------------------------- faults


def known_faults() -> list[str]:
    """Fault names of the engine's bug zoo."""
    from runners.engine import faults

    return sorted(faults.FAULTS)


def fault_precisions(name: str) -> tuple[str, ...] | None:
    """The precisions at which a fault does anything, or None for all."""
    from runners.engine import faults

    return tuple(faults.PRECISIONS.get(name, ())) or None


def check_fault(name: str | None) -> None:
    if not name:
        return
    names = known_faults()
    if name not in names:
        raise ParityError(f"unknown fault {name!r} (known: {', '.join(names) or 'none'})")


# ---------------------------------------------------------------- engine runs


def _all_prompt_logits(engine) -> None:
    """Make the engine compute logits for every prompt row, as the reference
    does, so the captured prefill logits compare row by row; sampling still
    sees each sequence's last row. lm_head is row-wise, so those rows are
    the same numbers the serving path computes."""
    forward = engine.forward

    def full(chunks, phase="prefill", step=0, all_logits=False):
        logits = forward(chunks, phase=phase, step=step, all_logits=True)
        return logits if all_logits else logits[engine.last_meta.last_rows]

    engine.forward = full


def _previous_tenants(engine, prompt_ids) -> None:
    """Serve other requests in every slot first, then free the slots: the
    batched run then sits in slots that held someone else, as in serving, so
    state a slot fails to reset shows up against the solo runs (which use a
    fresh engine). Each tenant is its slot's prompt reversed: different
    tokens, same length, so every ring and compressor window gets filled."""
    engine.generate([p[::-1] for p in prompt_ids], max_new_tokens=2, greedy=True, ignore_eos=True)


def _engine_run(ckpt, dump: Path, prompt_ids, *, precision, max_new_tokens, fault, max_num_seqs,
                device, full_logits=False, record_tokens=False, reuse_slots=False, patch_engine=None,
                prefill_chunk=None):
    """One fresh engine, capture into ``dump``, greedy over ``prompt_ids``.

    A fresh engine per run: a slot-state bug must not leak from one run into
    the next by accident; ``reuse_slots`` makes the slots' previous tenants
    explicit (and uncaptured) instead."""
    from parity import capture
    from parity.config import CaptureConfig
    from runners.engine import Engine

    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    # One prefill forward for the whole batch: step numbers then mean the
    # same thing in every run (prefill 0, decode k), which is how records meet.
    tokens = max(4096, sum(len(p) for p in prompt_ids))
    # Capture starts after the previous tenants when there are any, so the
    # dump holds the measured run only.
    cfg = CaptureConfig.from_env().replace(dump_dir=str(dump))
    engine = Engine(ckpt, precision=precision, device=device, max_num_seqs=max_num_seqs,
                    max_model_len=max(longest + 1, 64), max_num_batched_tokens=tokens, fault=fault,
                    prefill_chunk=prefill_chunk,
                    capture=None if reuse_slots else cfg)
    if patch_engine is not None:
        patch_engine(engine)
    if reuse_slots:
        _previous_tenants(engine, prompt_ids)
        engine.capture = capture.install(engine.model, cfg, run_info=engine.run_info)
    handle = engine.capture
    if handle is None or not handle.enabled:
        raise ParityError(f"engine capture into {dump} could not start (the reason is printed above)")
    try:
        if full_logits:
            _all_prompt_logits(engine)
        results = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, greedy=True, ignore_eos=True)
        generated = [list(r.token_ids) for r in results]
        extra = {"fault": fault, "previous_tenants": bool(reuse_slots)}
        if record_tokens:
            # The reference records prompt + new tokens; the compare checks
            # both runs saw the same sequence.
            extra.update(token_ids=[p + g for p, g in zip(prompt_ids, generated)],
                         prompt_lens=[len(p) for p in prompt_ids], generated=generated)
        handle.set_run_info(**extra)
    finally:
        handle.close()
    return generated


# ---------------------------------------------------------------- the run


def _prepare_out(out: Path, force: bool) -> None:
    prepare_out(out, force, lambda name: name in _OWNED or name.startswith(("solo-", "noise-")),
                hint="give --force to replace the runs in it")


def _batch_of(n_prompts: int, slots: int | None) -> list[int]:
    """Prompt index of each slot of the batched run: every prompt once, or
    cycled to fill ``slots`` (copies of one prompt test slots alone)."""
    n = n_prompts if slots is None else slots
    if n < 1:
        raise ParityError("--slots must be >= 1")
    return [i % n_prompts for i in range(n)]


def run_side_by_side(ckpt, prompts: list, out, *, precision: str = "fp32", slots: int | None = None,
                     decode_steps: int = 4, fault: str | None = None, floor: bool = False, noise: int = 0,
                     force: bool = False,
                     device: str = "cpu", on_stage: Callable[[str], None] | None = None,
                     patch_engine: Callable | None = None, prefill_chunk: int | None = None) -> SideBySide:
    """Run engine and reference on ``prompts`` (strings or token-id lists)
    and write their dumps and ``index.json`` into ``out``.

    ``decode_steps``: decode forwards after the prefill (so ``decode_steps +
    1`` new tokens). ``slots``: sequences in the batched run (default: one per
    prompt). ``fault``: engine bug-zoo fault, passed as PARITY_ENGINE_FAULT to
    the engine runs only. ``noise``: that many perturbed reference runs (a
    noise ensemble, parity.noise) into ``noise-K/``. ``on_stage(name)`` is called before each run.
    ``patch_engine(engine)`` is called on every fresh engine before it runs:
    the way to inject a fault from outside the engine (tests, notebooks)."""
    from reference_models.load import load_tokenizer
    from runners.reference import _encode, run_reference

    if precision not in PRECISIONS:
        raise ParityError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if decode_steps < 0:
        raise ParityError("--decode-steps must be >= 0")
    if noise < 0:
        raise ParityError("--noise must be >= 0")
    if not prompts:
        raise ParityError("no prompts")
    check_fault(fault)
    out = Path(out).resolve()
    _prepare_out(out, force)
    stage = on_stage or (lambda name: None)
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name):
        stage(name)
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 3)

    tokenizer = load_tokenizer(ckpt) if any(isinstance(p, str) for p in prompts) else None
    # Tokenized once here: both implementations must see the same ids,
    # whatever their own tokenizer calls would do with special tokens.
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    batch = _batch_of(len(prompt_ids), slots)
    new_tokens = decode_steps + 1
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ParityError("--prefill-chunk must be >= 1")
    # Engine runs split each prompt into chunks of prefill_chunk tokens, as
    # serving engines do; the reference runs each prompt in one forward.
    run = dict(ckpt=ckpt, precision=precision, max_new_tokens=new_tokens, fault=fault, device=device,
               patch_engine=patch_engine, prefill_chunk=prefill_chunk)

    with timed("target"):
        generated = _engine_run(dump=out / "target", prompt_ids=prompt_ids, max_num_seqs=len(prompt_ids),
                                full_logits=True, record_tokens=True, **run)
    ref_cfg = _REFERENCE_OF[precision]
    reference = dict(quant_sim=ref_cfg["quant_sim"], activations=ref_cfg["quant_sim"], device=device,
                     force_tokens=generated, stop_at_eos=False)
    # the fault lives in the engine runs only: it is passed to them, never set for the process
    with timed("ref"):
        ref = run_reference(ckpt, prompt_ids, dump=out / "ref", precision=ref_cfg["precision"], **reference)
    if floor:
        with timed("floor"):
            run_reference(ckpt, prompt_ids, dump=out / "floor", precision="fp64", **reference)
    members = []
    for k in range(noise):
        with timed(f"noise-{k}"):
            run_reference(ckpt, prompt_ids, dump=out / f"noise-{k}", precision=ref_cfg["precision"],
                          perturb_seed=k, **reference)
        members.append(f"noise-{k}")
    with timed("batched"):
        _engine_run(dump=out / "batched", prompt_ids=[prompt_ids[i] for i in batch], max_num_seqs=len(batch),
                    reuse_slots=True, **run)
    solos = []
    for i in sorted(set(batch)):
        with timed(f"solo-{i}"):
            _engine_run(dump=out / f"solo-{i}", prompt_ids=[prompt_ids[i]], max_num_seqs=1, **run)
        solos.append(f"solo-{i}")

    index = {
        "format": "parity-side-by-side",
        "version": 1,
        "checkpoint": str(Path(ckpt).resolve()),
        "precision": precision,
        "reference": {"precision": ref_cfg["precision"], "quant_sim": ref_cfg["quant_sim"],
                      "quant_sim_activations": ref_cfg["quant_sim"], "forced": True},
        "fault": fault,
        "decode_steps": decode_steps,
        "prefill_chunk": prefill_chunk,
        "preset": PRESET,
        "prompts": [{"text": p if isinstance(p, str) else None, "token_ids": ids}
                    for p, ids in zip(prompts, prompt_ids)],
        "generated": generated,
        "reference_greedy": ref.greedy,
        # Paths are relative to this file's folder, so the folder can move.
        "dumps": {"ref": "ref", "target": "target", "floor": "floor" if floor else None,
                  "batched": "batched", "solo": solos, "noise": members},
        "batched_prompts": batch,
        "slot_filter": SLOT_FILTER,
        "patched": patch_engine is not None,
        "timings_s": timings,
    }
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return SideBySide(out, index, prompt_ids, generated, timings)


def load_index(out) -> SideBySide:
    """Read back what ``run_side_by_side`` wrote into ``out``."""
    out = Path(out).resolve()
    p = out / INDEX if out.is_dir() else out
    if not p.is_file():
        raise ParityError(f"{p}: no such file (run python -m runners.side_by_side first)")
    index = json.loads(p.read_text(encoding="utf-8"))
    return SideBySide(p.parent, index, [x["token_ids"] for x in index["prompts"]], index["generated"],
                      index.get("timings_s", {}))


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from runners.reference import add_prompt_args

    ap = argparse.ArgumentParser(prog="python -m runners.side_by_side", description=__doc__.splitlines()[0])
    add_prompt_args(ap, "the first N GSM8K test questions (0-shot)")
    ap.add_argument("--out", required=True, help="folder for the dumps and index.json")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--slots", type=int, help="sequences in the batched run (default: one per prompt)")
    ap.add_argument("--decode-steps", type=int, default=4, help="decode forwards after the prefill (default 4)")
    ap.add_argument("--fault", help="engine fault to inject (docs/bug-zoo.md)")
    ap.add_argument("--floor", action="store_true", help="also write floor/: the reference in fp64")
    ap.add_argument("--noise", type=int, default=0, metavar="K",
                    help="also write noise-0..K-1/: perturbed reference runs, a noise ensemble (default 0)")
    ap.add_argument("--force", action="store_true", help="replace the runs in a non-empty --out")
    ap.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                    help="engine runs compute each prompt in chunks of N tokens (default: in one forward)")
    ap.add_argument("--device", default="cpu")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from runners.reference import prompts_from_args

    try:
        prompts = prompts_from_args(args)
        res = run_side_by_side(args.ckpt, prompts, args.out, precision=args.precision, slots=args.slots,
                               decode_steps=args.decode_steps, fault=args.fault, floor=args.floor,
                               noise=args.noise, force=args.force, device=args.device,
                               prefill_chunk=args.prefill_chunk,
                               on_stage=lambda s: print(f"running {s}", file=sys.stderr, flush=True))
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    solos = " ".join(f"--solo {p}" for p in res.solos)
    noise = "".join(f" --noise {p}" for p in res.noise)
    print(f"wrote {res.out / INDEX}\n"
          f"  parity ref-vs-target --ref {res.ref} --target {res.target} --preset {PRESET}{noise}\n"
          f"  parity slot-invariance --dir {res.batched} {solos} --filter '{SLOT_FILTER}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
