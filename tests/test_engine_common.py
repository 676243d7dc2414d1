"""Shared fixtures of the engine tests: a tiny fp32 checkpoint, the reference
run step by step, and hooks that record engine and reference internals.

The checkpoint comes from ``reference_models.synth`` (tiny preset: sliding /
CSA(4) / HCA(16) layers, window 16, 16 experts top-2, 2 hash layers,
index_topk 8, hc_mult 4, YaRN on the compressed branches), built once per
test session.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache

import torch

PROMPT_LENS = (21, 29, 38)  # each longer than the HCA ratio (16) and the window (16)
N_DECODE = 8


@lru_cache(maxsize=None)
def tiny_checkpoint() -> str:
    from reference_models.synth import synthesize

    out = tempfile.mkdtemp(prefix="engine-tiny-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    synthesize("tiny", seed=0, out=out, dtype="fp32", force=True)
    return out


@lru_cache(maxsize=None)
def reference_model():
    from transformers import DeepseekV4ForCausalLM

    return DeepseekV4ForCausalLM.from_pretrained(tiny_checkpoint(), dtype=torch.float32,
                                                 attn_implementation="eager").eval()


def prompts(lens=PROMPT_LENS, seed=5, vocab=4096):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


class Recorder:
    """Forward hooks that keep module outputs, one list entry per call."""

    def __init__(self, model, names):
        self.out = {n: [] for n in names}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(mod, args, output):
            if isinstance(output, tuple):
                output = tuple(o.detach().clone() if isinstance(o, torch.Tensor) else o for o in output)
            else:
                output = output.detach().clone()
            self.out[name].append(output)
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def layer_names(n_layers):
    return [f"model.layers.{i}" for i in range(n_layers)]


def ref_steps(ref, prompt, tokens, record_names):
    """Run the reference on one prompt then feed `tokens` one by one with its
    cache, as generate() does. Returns (logits per step, Recorder)."""
    from transformers import DynamicCache

    rec = Recorder(ref, record_names)
    cache = DynamicCache(config=ref.config)
    logits = []
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0])
        for t in tokens:
            out = ref(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0])
    rec.close()
    return logits, rec


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class one_thread:
    """Run torch on one intra-op thread. On a shared 2-core machine the tiny
    model's small matmuls spend most of their time waiting for the second
    thread (measured 25x slower under load); results do not depend on it."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def run_engine(eng, prompt_list, max_new_tokens, params=None):
    """Submit prompts, step to completion; returns {index: (tokens, [logits row per sampled token])}."""
    from runners.engine import SamplingParams

    rows: dict[int, list] = {}
    orig = eng.forward

    def spy(chunks, **kw):
        out = orig(chunks, **kw)
        for c, row in zip(chunks, out):
            rows.setdefault(c.seq_id, []).append((c.end, row.clone()))
        return out

    eng.forward = spy
    try:
        mnt = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompt_list)
        rids = [eng.add_request(p, params or SamplingParams(max_new_tokens=m, ignore_eos=True))
                for p, m in zip(prompt_list, mnt)]
        while eng.has_unfinished():
            eng.step()
    finally:
        eng.forward = orig
    out = {}
    for i, (rid, p) in enumerate(zip(rids, prompt_list)):
        req = eng.requests.pop(rid)
        # only rows whose forward reached the end of the known tokens were sampled from
        sampled = [row for end, row in rows[rid] if end >= len(p)]
        out[i] = (req.output_ids, torch.stack(sampled))
    return out
