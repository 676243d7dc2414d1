"""bf16 and fp8 engines against the reference at the same precision.

bf16: the reference loaded by ``reference_models.load`` at bf16. fp8: the
same, run under ``reference_models.quant_sim`` (FP8 weights and activations,
FP4 experts), which uses the same ``parity.quant`` math. On CPU both agree
with the engine bitwise (measured); the bounds leave room for other kernels.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from test_engine_common import one_thread, prompts, rel_err, tiny_checkpoint

N_NEW = 4


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def ref_bf16():
    from reference_models.load import load_reference

    return load_reference(tiny_checkpoint(), "bf16")


def _prefill_logits(eng, ps):
    from runners.engine import metadata

    cm, chunks = eng.cache, []
    for i, p in enumerate(ps):
        cm.allocate(10_000 + i)
        cm.ensure(10_000 + i, len(p))
        chunks.append(metadata.SeqChunk(10_000 + i, cm.slot_of[10_000 + i], 0, p, cm.blocks_of[10_000 + i]))
    out = eng.forward(chunks, all_logits=True)
    for i in range(len(ps)):
        cm.free(10_000 + i)
    return out, eng.last_meta.cu_seqlens


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_matches_reference_at_precision(precision, ref_bf16):
    from reference_models.quant_sim import quant_sim
    from runners.engine import Engine

    eng = Engine(tiny_checkpoint(), precision=precision, max_num_seqs=4, max_model_len=128)
    ps = prompts()
    sim = (lambda: quant_sim(ref_bf16, weights=True, activations=True)) if precision == "fp8" \
        else contextlib.nullcontext
    logits, cu = _prefill_logits(eng, ps)
    results = eng.generate(ps, max_new_tokens=N_NEW, ignore_eos=True)
    for i, p in enumerate(ps):
        with torch.no_grad(), sim():
            ref_logits = ref_bf16(torch.tensor([p])).logits[0].float()
            ref_tokens = ref_bf16.generate(torch.tensor([p]), max_new_tokens=N_NEW, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert rel_err(logits[cu[i]:cu[i + 1]], ref_logits) < 1e-2
        assert results[i].token_ids == ref_tokens


def test_fp8_weights_are_quantized():
    from runners.engine import Engine

    eng = Engine(tiny_checkpoint(), precision="fp8", max_num_seqs=1, max_model_len=64)
    attn = eng.model.model.layers[1].self_attn
    assert attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert attn.q_a_proj.weight_scale_inv.dtype == torch.uint8
    experts = eng.model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == torch.uint8  # two e2m1 codes per byte
    assert experts.gate_up_proj.shape[-1] == eng.config.hidden_size // 2
    assert attn.compressor.kv_proj.weight.dtype == torch.bfloat16  # left in bf16, as released
    assert eng.model.model.layers[1].attn_hc.fn.dtype == torch.float32
