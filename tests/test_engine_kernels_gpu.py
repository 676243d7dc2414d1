"""Triton FusedMoE, FP8 GEMM and activation quantization against their torch ops (CUDA).

Each kernel is checked against the torch op that defines it, on random data:
``torch_ops.fused_moe`` (dense experts), ``quant.fused_moe_quant`` (FP8 and
FP4 experts), ``quant.fp8_linear``, ``quant.act_quant``. The helpers here are
shared with tests/test_triton_interpret.py, which runs the same kernels in
triton's interpreter on the CPU.

Tolerances, per activation dtype (the GEMMs sum float32 products in another
order than torch's kernels; everything else rounds at the same steps):

* fp32: products are IEEE in both (no TF32); a K-term float32 sum in another
  order differs by about sqrt(K) * 2**-24 relative, ~1e-6 at K = 4096, carried
  through SwiGLU and the second GEMM: rel. L2 below 2e-5, no element off by
  more than 1e-4 of the output's largest.
* bf16: the outputs of both GEMMs, the clamps, silu, the SwiGLU product and
  the weighted rows are each rounded to bf16 (2**-9 relative). Where the two
  float32 sums round to neighbouring bf16 values (one ulp, 2**-8) the
  difference travels on; the down GEMM averages it over I terms. Rel. L2
  below 1e-2 (typically ~3e-3), no element off by more than 2**-5 of the
  output's largest (a few bf16 ulps of it).
* quantized experts in bf16: additionally, a one-ulp difference of the
  SwiGLU output can move its FP8 code by one step (2**-3 relative of that
  element) where it sits on a rounding boundary; rare, and diluted by the
  down GEMM: rel. L2 below 2e-2, elements within 2**-4 of the largest.
* act_quant: codes and scales bitwise (only exact operations).
* fp8_linear in bf16: e4m3 tensor-core products are exact and summed in
  float32 per 128-wide block, the torch op multiplies the decoded bf16
  operands: both round once to bf16, rel. L2 below 1e-2.
"""

from __future__ import annotations

import pytest
import torch


def on_gpu(fn):
    """Marks `gpu` (deselected by default) and skips without CUDA; the torch-reference
    test below runs on the CPU suite."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


# (rel. L2, largest element error / largest reference element), see the module docstring
TOL = {
    (torch.float32, "dense"): (2e-5, 1e-4),
    (torch.float32, "quant"): (2e-5, 1e-4),
    (torch.bfloat16, "dense"): (1e-2, 2**-5),
    (torch.bfloat16, "quant"): (2e-2, 2**-4),
}
LIMIT = 2.0  # SwiGLU clamp: with unit-variance gate/up values some of both are clamped

# (E experts, top-k, T tokens): decode to prefill sizes, few and many experts
MOE_CASES = [(32, 2, 1), (32, 8, 7), (64, 6, 32), (256, 6, 1), (256, 8, 32), (256, 6, 512), (128, 4, 7),
             (32, 2, 512)]


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = out.double() - ref.double()
    r = ref.double()
    return float(d.norm() / r.norm().clamp_min(1e-30)), float(d.abs().max() / r.abs().max().clamp_min(1e-30))


def assert_near(out, ref, tol, what=""):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), what
    l2, mx = errors(out, ref)
    assert l2 <= tol[0] and mx <= tol[1], f"{what}: rel_l2 {l2:.3g} (<= {tol[0]}), max {mx:.3g} (<= {tol[1]})"


def routing(T: int, E: int, k: int, device, g, mode: str = "random"):
    """ids [T, k] (distinct per token) and positive weights [T, k] (fp32, as the router's).

    random: k of E uniformly; skewed: only experts 0..k (all others empty); one: every
    token's first choice is expert E-1 (one long run)."""
    span = {"random": E, "skewed": min(E, k + 1), "one": E}[mode]
    ids = torch.rand(T, span, device=device, generator=g).topk(k, dim=1).indices
    if mode == "one":
        ids = torch.where(ids == E - 1, ids[:, :1], ids)  # keep them distinct
        ids[:, 0] = E - 1
    weights = torch.rand(T, k, device=device, generator=g) + 0.1
    return ids, weights


def moe_weights(E: int, D: int, I: int, device, g, dtype=torch.float32):
    """w13 [E, 2I, D], w2 [E, D, I], scaled so that gate/up and outputs are ~unit
    (made one expert at a time: the flash-size case has 6.4G weights)."""
    w13 = torch.stack([(torch.randn(2 * I, D, device=device, generator=g) * D**-0.5).to(dtype) for _ in range(E)])
    w2 = torch.stack([(torch.randn(D, I, device=device, generator=g) * I**-0.5).to(dtype) for _ in range(E)])
    return w13, w2


def quantized(w13, w2, fmt: str):
    from parity import quant as pq

    qz = pq.quantize_fp4_weight if fmt == "fp4" else pq.quantize_fp8_weight
    # from bf16 values, as the engine's loader does; one expert at a time (bounded temporaries)
    parts = [[qz(w[e].to(torch.bfloat16)) for e in range(w.shape[0])] for w in (w13, w2)]
    return tuple(torch.stack([p[i] for p in ps]) for ps in parts for i in (0, 1))


def check_moe(fmt: str, dtype, E, k, T, D, I, device, seed=0, mode="random"):
    """The triton FusedMoE (dense or quantized) against its torch op; returns the errors."""
    from runners.engine.ops import quant, torch_ops, triton_moe

    g = torch.Generator(device=device).manual_seed(seed)
    w13, w2 = moe_weights(E, D, I, device, g, dtype if fmt == "dense" else torch.bfloat16)
    x = torch.randn(T, D, device=device, generator=g).to(dtype)
    ids, wts = routing(T, E, k, device, g, mode)
    if fmt == "dense":
        out = triton_moe.fused_moe(x, ids, wts, w13, w2, LIMIT)
        ref = torch_ops.fused_moe(x, ids, wts, w13, w2, LIMIT)
    else:
        q = quantized(w13, w2, fmt)
        out = triton_moe.fused_moe_quant(x, ids, wts, *q[:2], *q[2:], LIMIT, fmt)
        ref = quant.fused_moe_quant(x, ids, wts, *q[:2], *q[2:], LIMIT, fmt)
    assert_near(out, ref, TOL[(dtype, "dense" if fmt == "dense" else "quant")],
                f"{fmt} {dtype} E={E} k={k} T={T} D={D} I={I} {mode}")
    return errors(out, ref)


def check_act_quant(shape, dtype, device, seed=0):
    from runners.engine.ops import quant, triton_fp8

    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(*shape, device=device, generator=g) * torch.logspace(-6, 3, shape[-1], device=device)).to(dtype)
    x[0, : min(130, shape[-1])] = 0  # an all-zero block: the 1e-4 amax floor
    q, s = triton_fp8.act_quant(x)
    rq, rs = quant.act_quant(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs), (shape, dtype)


def check_fp8_linear(M, N, K, dtype, device, seed=0):
    from parity import quant as pq
    from runners.engine.ops import quant, triton_fp8

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    w_q, w_s = pq.quantize_fp8_weight(torch.randn(N, K, device=device, generator=g).to(torch.bfloat16) * K**-0.5)
    out = triton_fp8.fp8_linear(x, w_q, w_s)
    ref = quant.fp8_linear(x, w_q, w_s)
    tol = (2e-5, 1e-4) if dtype == torch.float32 else (1e-2, 2**-5)
    assert_near(out, ref, tol, f"fp8_linear {dtype} M={M} N={N} K={K}")
    return errors(out, ref)


# ---------------------------------------------------------------- the torch reference itself (CPU)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_torch_fused_moe_quant_is_the_per_token_formula(fmt):
    """quant.fused_moe_quant, which the kernels are held to, against its definition
    written out per (token, expert): FP8-quantized activations into decoded weights."""
    import torch.nn.functional as F

    from parity import quant as pq
    from runners.engine.ops import quant

    g = torch.Generator().manual_seed(3)
    T, E, k, D, I = 5, 8, 3, 256, 128
    w13, w2 = moe_weights(E, D, I, "cpu", g)
    q = quantized(w13, w2, fmt)
    x = torch.randn(T, D, generator=g)
    ids, wts = routing(T, E, k, "cpu", g)
    out = quant.fused_moe_quant(x, ids, wts, *q, LIMIT, fmt)
    if fmt == "fp4":
        d13, d2 = pq.dequantize_fp4_weight(q[0], q[1], k=D), pq.dequantize_fp4_weight(q[2], q[3], k=I)
    else:
        d13, d2 = pq.dequantize_fp8_weight(q[0], q[1]), pq.dequantize_fp8_weight(q[2], q[3])
    ref = torch.zeros(T, D)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (d13[e] @ pq.qdq_fp8_act(x[t])).chunk(2)
            h = F.silu(gate.clamp(max=LIMIT)) * up.clamp(-LIMIT, LIMIT)
            ref[t] += wts[t, j] * (d2[e] @ pq.qdq_fp8_act(h))
    # fp32 throughout; the op's exact products and fixed-order sums against plain matmuls
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the kernels (CUDA)

DTYPES = [torch.float32, torch.bfloat16]


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,k,T", MOE_CASES)
def test_fused_moe_dense(E, k, T, dtype):
    check_moe("dense", dtype, E, k, T, 512, 256, "cuda")


@on_gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("E,k,T", MOE_CASES)
def test_fused_moe_quantized_bf16(E, k, T, fmt):
    check_moe(fmt, torch.bfloat16, E, k, T, 512, 256, "cuda")


@on_gpu
@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
@pytest.mark.parametrize("mode", ["skewed", "one"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_moe_empty_experts_and_long_runs(mode, fmt, dtype):
    check_moe(fmt, dtype, 64, 4, 300, 384, 256, "cuda", mode=mode)


@on_gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("T", [1, 32])
def test_fused_moe_quantized_fp32(T, fmt):
    check_moe(fmt, torch.float32, 64, 6, T, 512, 256, "cuda")


@on_gpu
@pytest.mark.parametrize("fmt", ["dense", "fp4"])
def test_fused_moe_flash_dims(fmt):
    # DeepSeek-V4-Flash's expert shapes (hidden 4096, intermediate 2048, 256 experts, top-6)
    check_moe(fmt, torch.bfloat16, 256, 6, 32, 4096, 2048, "cuda")


@on_gpu
def test_fused_moe_odd_dims_and_no_tokens():
    from runners.engine.ops import triton_moe

    # hidden and intermediate not multiples of the tiles (nor of 128 for the FP8 blocks)
    for fmt in ("dense", "fp8", "fp4"):
        check_moe(fmt, torch.bfloat16, 32, 3, 13, 320, 160, "cuda")
    x = torch.zeros(0, 64, device="cuda")
    w13, w2 = torch.zeros(4, 64, 64, device="cuda"), torch.zeros(4, 64, 32, device="cuda")
    ids = torch.zeros(0, 2, dtype=torch.long, device="cuda")
    assert triton_moe.fused_moe(x, ids, ids.float(), w13, w2, LIMIT).shape == (0, 64)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 4096), (7, 300), (512, 2048)])
def test_act_quant_bitwise(shape, dtype, monkeypatch):
    from runners.engine import faults

    check_act_quant(shape, dtype, "cuda")
    monkeypatch.setattr(faults, "_ACTIVE", frozenset({"act_scale_round_nearest"}))
    check_act_quant(shape, dtype, "cuda", seed=1)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 32, 512])
@pytest.mark.parametrize("N,K", [(512, 4096), (4096, 1024), (200, 300)])
def test_fp8_linear(M, N, K, dtype):
    check_fp8_linear(M, N, K, dtype, "cuda")


@on_gpu
def test_registry_and_engine_use_the_kernels(monkeypatch):
    """PARITY_ENGINE_BACKEND=triton picks the kernels, and the engine's FP4
    experts reach the quantized kernel (not the per-expert fallback)."""
    from test_engine_common import prompts, rel_err, run_engine, tiny_checkpoint

    from runners.engine import Engine, ops
    from runners.engine.ops import triton_moe

    if ops.backend_status().get("triton") != "available":
        pytest.skip(ops.backend_status().get("triton"))
    calls = []
    real = triton_moe._moe
    monkeypatch.setattr(triton_moe, "_moe", lambda *a: calls.append(a[-1]) or real(*a))
    ps = prompts()
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PARITY_ENGINE_BACKEND", backend)
        ops.reload()
        chosen = {c.op: c.backend for c in ops.describe()}
        for name in ("fused_moe", "fused_moe_quant", "fp8_linear", "act_quant"):
            assert chosen[name] == backend, name
        for precision in ("bf16", "fp8"):
            eng = Engine(tiny_checkpoint(), device="cuda", precision=precision, max_num_seqs=4, max_model_len=192)
            out[backend, precision] = run_engine(eng, ps, 1)  # the prefill's logits
    monkeypatch.delenv("PARITY_ENGINE_BACKEND")
    ops.reload()
    assert triton_moe.DENSE in calls and triton_moe.FP4 in calls
    for precision in ("bf16", "fp8"):
        for i in range(len(ps)):
            # one forward of the tiny model in bf16: the kernels' rounding differences (module
            # docstring) pass through 6 layers; logits stay within a few bf16 ulps overall
            assert rel_err(out["triton", precision][i][1], out["torch", precision][i][1]) < 3e-2, (precision, i)
