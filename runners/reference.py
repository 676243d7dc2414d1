"""Run the transformers reference with capture on.

    python -m runners.reference --ckpt DIR (--prompts FILE | --gsm8k N [--data PATH])
        --dump DIR [--precision fp32|bf16|fp64] [--quant-sim]
        [--max-new-tokens N] [--force-tokens FILE]

One sequence per forward (no padding can creep into the reference), the
context (phase, step, seq_ids=[i]) set before every forward, greedy decoding
with the transformers cache. With ``--force-tokens`` the reference is fed
given continuation tokens instead of its own argmax (teacher forcing), so
its decode steps line up with another implementation's token for token.
The token ids that went in are written to the dump's run info.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parity.errors import ParityError

PRECISIONS = ("fp32", "bf16", "fp64")


@dataclass
class ReferenceRun:
    """What ``run_reference`` produced, per sequence."""

    prompt_ids: list[list[int]]
    generated: list[list[int]]
    # The reference's own argmax after each forward (equal to ``generated``
    # unless tokens were forced).
    greedy: list[list[int]]
    dump_dir: str | None = None
    # Logits of the last position of every forward, per sequence, when asked.
    logits: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def token_ids(self) -> list[list[int]]:
        return [p + g for p, g in zip(self.prompt_ids, self.generated)]


# ---------------------------------------------------------------- inputs


def read_prompts(path) -> list:
    """Prompts from a file: ``.jsonl`` (objects with prompt / question / text
    / input_ids, or bare strings), ``.json`` (a list of those), else one prompt
    per non-empty line. An entry is a string or a list of token ids."""
    p = Path(path)
    if not p.is_file():
        raise ParityError(f"--prompts {p}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif p.suffix == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ParityError(f"--prompts {p}: expected a JSON list")
        else:
            rows = [line for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ParityError(f"--prompts {p}: not valid JSON: {exc}") from None
    prompts = [_prompt_of(row, p, i) for i, row in enumerate(rows)]
    if not prompts:
        raise ParityError(f"--prompts {p}: no prompts")
    return prompts


def _prompt_of(row, path, i):
    if isinstance(row, dict):
        for key in ("input_ids", "prompt", "question", "text"):
            if key in row:
                row = row[key]
                break
    if isinstance(row, str) and row:
        return row
    if isinstance(row, list) and row and all(isinstance(t, int) for t in row):
        return row
    raise ParityError(f"--prompts {path}: entry {i} is neither a string nor a list of token ids")


def gsm8k_prompts(n: int, data=None, num_fewshot: int = 0) -> list[str]:
    """The first ``n`` GSM8K test prompts, built like the gate builds them."""
    from parity.gate.task import load_task

    return load_task(data, num_fewshot=num_fewshot, limit=n).prompts


def read_forced_tokens(path, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Continuations to force, from a JSON list of token-id lists, or from a
    run info (a dump directory or its run.json) whose ``token_ids`` hold
    whole sequences; a row that starts with its prompt has the prompt cut."""
    p = Path(path)
    if p.is_dir():
        p = p / "run.json"
    if not p.is_file():
        raise ParityError(f"--force-tokens {p}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ParityError(f"--force-tokens {p}: not valid JSON: {exc}") from None
    rows = data.get("token_ids") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ParityError(f"--force-tokens {p}: expected a list of token-id lists (or a run.json with token_ids)")
    if len(rows) < len(prompt_ids):
        raise ParityError(f"--force-tokens {p}: {len(rows)} sequences for {len(prompt_ids)} prompts")
    forced = []
    for prompt, row in zip(prompt_ids, rows):
        row = [int(t) for t in row]
        forced.append(row[len(prompt):] if row[: len(prompt)] == prompt and len(row) > len(prompt) else row)
    return forced


# ---------------------------------------------------------------- running


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ParityError(f"prompt {prompt[:40]!r} tokenizes to nothing")
    return list(ids)


def _capture_config(dump):
    from parity.config import CaptureConfig

    cfg = CaptureConfig.from_env()
    return cfg.replace(dump_dir=str(dump)) if dump is not None else cfg


@torch.inference_mode()
def _run_one(model, handle, seq: int, prompt: list[int], forced, max_new_tokens: int, eos: set[int],
             keep_logits: bool, device):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    generated: list[int] = []
    greedy: list[int] = []
    logits: list[torch.Tensor] = []
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    pos = 0
    budget = len(forced) if forced is not None else max_new_tokens
    for step in range(budget + 1):
        handle.set_context(phase="prefill" if step == 0 else "decode", step=step, seq_ids=[seq])
        positions = torch.arange(pos, pos + ids.shape[1], device=device)[None]
        out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
        pos += ids.shape[1]
        last = out.logits[0, -1]
        if keep_logits:
            logits.append(last.detach().float().cpu())
        choice = int(last.argmax())
        greedy.append(choice)
        if step == budget:
            break
        token = forced[step] if forced is not None else choice
        generated.append(token)
        if forced is None and token in eos:
            break
        if len(generated) == budget:
            break  # the last token needs no forward (as transformers' generate)
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
    return generated, greedy, logits


def run_reference(
    ckpt,
    prompts: list,
    dump=None,
    precision: str = "fp32",
    quant_sim: bool = False,
    max_new_tokens: int = 16,
    force_tokens: list[list[int]] | None = None,
    device: str = "cpu",
    model=None,
    tokenizer=None,
    keep_logits: bool = False,
    stop_at_eos: bool = True,
    activations: bool = False,
    rounding: str = "ceil",
    perturb_seed: int | None = None,
    perturb_rate: float | None = None,
) -> ReferenceRun:
    """Run the reference over ``prompts`` (strings or token-id lists).

    ``dump`` turns capture on into that directory (other PARITY_* settings
    still apply); without it capture follows the environment. ``model`` and
    ``tokenizer`` skip loading (tests, side-by-side runs). ``perturb_seed``:
    a member of a noise ensemble, every op's output off by one rounding on a
    share ``perturb_rate`` of its elements (``parity.noise.perturbed``)."""
    import contextlib

    from parity import capture
    from parity.noise import DEFAULT_RATE, perturbed
    from reference_models.load import load_reference, load_tokenizer
    from reference_models.quant_sim import quant_sim as _quant_sim
    from reference_models.taps import reference_taps

    if precision not in PRECISIONS:
        raise ParityError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if model is None:
        model = load_reference(ckpt, precision=precision, device=device)
    device = next(model.parameters()).device
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        tokenizer = load_tokenizer(ckpt)
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    if force_tokens is not None and len(force_tokens) < len(prompt_ids):
        raise ParityError(f"{len(force_tokens)} forced continuations for {len(prompt_ids)} prompts")
    eos_id = model.config.eos_token_id
    eos = set() if not stop_at_eos else set(eos_id if isinstance(eos_id, list) else [eos_id] if eos_id is not None else [])

    if perturb_seed is not None and perturb_rate is None:
        perturb_rate = DEFAULT_RATE
    info = {"impl": "reference", "model": str(ckpt), "precision": precision, "quant_sim": bool(quant_sim),
            "quant_sim_activations": bool(activations), "rounding": rounding, "perturb_seed": perturb_seed,
            "perturb_rate": perturb_rate, "mapping_preset": "deepseek_v4"}
    with contextlib.ExitStack() as outer:  # the perturbation's hooks go on every way out
        if perturb_seed is not None:
            # before capture's hooks, so that the records are the perturbed outputs
            outer.enter_context(perturbed(model, perturb_seed, rate=perturb_rate))
        handle = capture.install(model, _capture_config(dump), run_info=info)
        if dump is not None and not handle.enabled:
            raise ParityError(f"capture into {dump} could not start (the reason is printed above)")
        run = ReferenceRun(prompt_ids=prompt_ids, generated=[], greedy=[], dump_dir=handle.dump_dir)
        try:
            with contextlib.ExitStack() as stack:
                if quant_sim:
                    stack.enter_context(_quant_sim(model, weights=True, activations=activations, rounding=rounding))
                if handle.enabled:
                    stack.enter_context(reference_taps(model))
                for i, prompt in enumerate(prompt_ids):
                    forced = force_tokens[i] if force_tokens is not None else None
                    gen, greedy, logits = _run_one(model, handle, i, prompt, forced, max_new_tokens, eos,
                                                   keep_logits, device)
                    run.generated.append(gen)
                    run.greedy.append(greedy)
                    if keep_logits:
                        run.logits.append(logits)
            handle.set_run_info(token_ids=run.token_ids, prompt_lens=[len(p) for p in prompt_ids],
                                generated=run.generated, greedy=run.greedy, forced=force_tokens is not None, **info)
        finally:
            handle.close()
        return run


# ---------------------------------------------------------------- CLI


def add_prompt_args(ap: argparse.ArgumentParser, gsm8k_help: str = "the first N GSM8K test questions") -> None:
    """--ckpt and where the prompts come from (--prompts FILE | --gsm8k N [--data FILE])."""
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (config, weights, tokenizer)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts file (.txt, .json or .jsonl)")
    src.add_argument("--gsm8k", type=int, metavar="N", help=gsm8k_help)
    ap.add_argument("--data", help="GSM8K test jsonl (default: the gate's default location)")


def prompts_from_args(args, num_fewshot: int = 0) -> list:
    """The prompts ``add_prompt_args`` options name; ParityError on bad input."""
    if args.gsm8k is not None:
        if args.gsm8k < 1:
            raise ParityError("--gsm8k N needs N >= 1")
        return gsm8k_prompts(args.gsm8k, args.data, num_fewshot)
    return read_prompts(args.prompts)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runners.reference", description=__doc__.splitlines()[0])
    add_prompt_args(ap)
    ap.add_argument("--num-fewshot", type=int, default=0, help="GSM8K fewshot examples per prompt (default 0)")
    ap.add_argument("--dump", required=True, help="capture directory")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--quant-sim", action="store_true", help="simulate FP8/FP4 weight quantization")
    ap.add_argument("--quant-sim-activations", action="store_true", help="also quantize matmul inputs (FP8 1x128)")
    ap.add_argument("--rounding", choices=("ceil", "rne"), default="ceil", help="power-of-two scale rounding")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--force-tokens", help="JSON token-id lists, or a dump dir / run.json to follow; "
                    "their length, not --max-new-tokens, sets the number of steps")
    ap.add_argument("--device", default="cpu")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.max_new_tokens < 0:
            raise ParityError("--max-new-tokens must be >= 0")
        prompts = prompts_from_args(args, args.num_fewshot)
        forced = None
        if args.force_tokens:
            from reference_models.load import load_tokenizer

            tok = load_tokenizer(args.ckpt) if any(isinstance(p, str) for p in prompts) else None
            forced = read_forced_tokens(args.force_tokens, [_encode(tok, p) for p in prompts])
        run = run_reference(args.ckpt, prompts, dump=args.dump, precision=args.precision,
                            quant_sim=args.quant_sim, max_new_tokens=args.max_new_tokens, force_tokens=forced,
                            device=args.device, activations=args.quant_sim_activations, rounding=args.rounding)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_tokens = sum(len(g) for g in run.generated)
    print(f"reference: {len(run.prompt_ids)} sequences, {n_tokens} new tokens, dump {run.dump_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
