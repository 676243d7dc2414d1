"""The engine on CUDA: against the reference on the same device, and the
triton backend against the torch one."""

from __future__ import annotations

import pytest
import torch

from test_engine_common import prompts, reference_model, rel_err, run_engine, tiny_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _engine(**kw):
    from runners.engine import Engine

    return Engine(tiny_checkpoint(), device="cuda", max_num_seqs=4, max_model_len=192, **kw)


@pytest.fixture(scope="module")
def ref_cuda():
    import copy

    return copy.deepcopy(reference_model()).to("cuda")  # the cached CPU model stays on the CPU


def test_fp32_matches_reference_on_cuda(ref_cuda):
    ps = prompts()
    res = run_engine(_engine(precision="fp32"), ps, 9)
    for i, p in enumerate(ps):
        toks, lg = res[i]
        from transformers import DynamicCache

        cache = DynamicCache(config=ref_cuda.config)
        rows = []
        with torch.no_grad():
            ids = torch.tensor([p], device="cuda")
            for t in toks:
                out = ref_cuda(input_ids=ids, past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1])
                ids = torch.tensor([[t]], device="cuda")
        ref_lg = torch.stack(rows)
        assert [int(r.argmax()) for r in ref_lg] == toks
        # TF32 may be on for the reference's matmuls; allow its rounding
        assert rel_err(lg, ref_lg) < 1e-3


def test_triton_ops_match_torch():
    from runners.engine import ops
    from runners.engine.ops import torch_ops

    if ops.backend_status().get("triton") != "available":
        pytest.skip(ops.backend_status().get("triton"))
    from runners.engine.ops import triton_ops

    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 4, 512, device="cuda", generator=g).to(dt)
        w = (1 + 0.1 * torch.randn(512, device="cuda", generator=g)).to(dt)
        # reduction order differs from torch's: equal up to one rounding of the output dtype
        tol = dict(rtol=2e-6, atol=1e-6) if dt == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(triton_ops.rmsnorm(x, w, 1e-6), torch_ops.rmsnorm(x, w, 1e-6), **tol)
        torch.testing.assert_close(triton_ops.rmsnorm_unweighted(x, 1e-6), torch_ops.rmsnorm_unweighted(x, 1e-6),
                                   **tol)
        T, H, D, N = 29, 20, 512, 300
        q = torch.randn(T, H, D, device="cuda", generator=g).to(dt)
        s0, s1 = torch.randn(N, D, device="cuda", generator=g).to(dt), torch.randn(50, D, device="cuda", generator=g).to(dt)
        i0 = torch.randint(-1, N, (T, 40), device="cuda", generator=g)
        i1 = torch.randint(-1, 50, (T, 9), device="cuda", generator=g)
        sinks = torch.randn(H, device="cuda", generator=g)
        streams = torch.randn(T, 4, 256, device="cuda", generator=g).to(dt)
        fn = 0.05 * torch.randn(24, 1024, device="cuda", generator=g)
        hb, hs = 0.3 * torch.randn(24, device="cuda", generator=g), 0.5 + torch.rand(3, device="cuda", generator=g)
        for x, y in zip(triton_ops.hc_sinkhorn(streams, fn, hb, hs, 20, 1e-6, 1e-6),
                        torch_ops.hc_sinkhorn(streams, fn, hb, hs, 20, 1e-6, 1e-6)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        a = triton_ops.sparse_attention(q, [(s0, i0), (s1, i1)], sinks, D**-0.5)
        b = torch_ops.sparse_attention(q, [(s0, i0), (s1, i1)], sinks, D**-0.5)
        assert rel_err(a, b) < (1e-5 if dt == torch.float32 else 1e-2), dt


def test_triton_backend_engine_matches_torch_backend(monkeypatch):
    from runners.engine import ops

    if ops.backend_status().get("triton") != "available":
        pytest.skip("no triton")
    ps = prompts()
    base = run_engine(_engine(precision="fp32"), ps, 6)
    monkeypatch.setenv("PARITY_ENGINE_BACKEND", "triton")
    ops.reload()
    try:
        tri = run_engine(_engine(precision="fp32"), ps, 6)
    finally:
        monkeypatch.delenv("PARITY_ENGINE_BACKEND")
        ops.reload()
    for i in range(len(ps)):
        assert tri[i][0] == base[i][0]
        assert rel_err(tri[i][1], base[i][1]) < 1e-4
