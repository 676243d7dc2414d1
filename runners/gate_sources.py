"""This repository's engine and reference as in-process answer sources of
`parity gate gsm8k --engine / --reference`, declared to parity through the
``parity.gate_sources`` entry points (pyproject.toml)."""

from __future__ import annotations


def engine(ckpt, *, precision=None, device=None):
    """Greedy generation on the engine, a batch of prompts per call."""
    from runners.engine import Engine

    # only what the user chose: the engine's own defaults stay its own
    kwargs = {k: v for k, v in (("precision", precision), ("device", device)) if v is not None}
    eng = Engine(ckpt, **kwargs)

    def run(prompts, *, max_new_tokens, stop):
        results = eng.generate(list(prompts), max_new_tokens=max_new_tokens, greedy=True, stop=list(stop))
        return [(r.text, getattr(r, "prompt_ids", None)) for r in results]

    return run


def reference(ckpt, *, precision=None, device=None):
    """Greedy generation on the transformers reference, one prompt per call."""
    from runners.reference_generate import ReferenceGenerator

    gen = ReferenceGenerator.from_checkpoint(ckpt, precision, device)

    def run(prompts, *, max_new_tokens, stop):
        return [(gen.generate([p], max_new_tokens=max_new_tokens, stop=list(stop))[0], None) for p in prompts]

    return run
