"""Greedy generation with stop sequences over the transformers reference.

The GSM8K gate (``parity gate gsm8k --reference CKPT``) needs what lm-eval's
HF model does for a ``generate_until`` request: greedy decoding from the
prompt tokenized with the tokenizer's defaults, stopping at EOS or as soon
as the decoded continuation contains a stop sequence, decoded with special
tokens skipped. One prompt at a time: a ragged batch would need padding,
and padding is exactly the kind of difference the gate must not introduce
on the reference side.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "config", None), "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    enc = tokenizer(text) if callable(tokenizer) else tokenizer.encode(text)
    if isinstance(enc, dict) or hasattr(enc, "keys"):
        return list(enc["input_ids"])
    return list(getattr(enc, "ids", enc))


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


class ReferenceGenerator:
    """Greedy decoding over a causal LM that takes ``input_ids`` and
    ``past_key_values`` and returns ``.logits`` and ``.past_key_values``."""

    def __init__(self, model, tokenizer, device: str | torch.device | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if device is None:
            try:
                device = next(model.parameters()).device
            except (AttributeError, StopIteration):
                device = "cpu"
        self.device = torch.device(device)
        self.eos = _eos_ids(model, tokenizer)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, precision: str | None = None,
                        device: str | None = None) -> "ReferenceGenerator":
        from reference_models.load import load_reference, load_tokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_reference(ckpt_dir, precision or "fp32", device=device)
        return cls(model, load_tokenizer(ckpt_dir), device)

    @torch.inference_mode()
    def generate_one(self, prompt: str, max_new_tokens: int, stop: Sequence[str] = ()) -> str:
        ids = _encode(self.tokenizer, prompt)
        if not ids:
            raise ValueError("the prompt tokenizes to no tokens")
        inp = torch.tensor([ids], dtype=torch.long, device=self.device)
        past = None
        out: list[int] = []
        stops = [s for s in stop if s]
        for _ in range(max_new_tokens):
            res = self.model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(torch.argmax(res.logits[0, -1]).item())
            if nxt in self.eos:
                break
            out.append(nxt)
            # Stop sequences are text, and one may straddle token boundaries:
            # look at the decoded continuation, not at token ids.
            if stops and any(s in _decode(self.tokenizer, out) for s in stops):
                break
            inp = torch.tensor([[nxt]], dtype=torch.long, device=self.device)
        text = _decode(self.tokenizer, out)
        for s in stops:
            text = text.split(s)[0]
        return text

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                 on_done: Callable[[int], object] | None = None) -> list[str]:
        texts = []
        for p in prompts:
            texts.append(self.generate_one(p, max_new_tokens, stop))
            if on_done is not None:
                on_done(1)
        return texts
