"""Triton kernels for the hottest engine ops (CUDA only).

Importing this module fails without triton or without a CUDA device; the
registry then reports the backend unavailable and keeps torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runners.engine.ops import register

if not torch.cuda.is_available():
    raise ImportError("triton backend needs a CUDA device")


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_o,
                    BLOCK: tl.constexpr, HAS_W: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if HAS_W:
        # the reference rounds the normalised row to the input dtype before
        # the weight multiplies it
        h = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = w * h
    else:
        y = x * inv.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@register("rmsnorm", "triton")
def rmsnorm(x, weight, eps):
    if not x.is_cuda:
        from runners.engine.ops.torch_ops import rmsnorm as ref
        return ref(x, weight, eps)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    n = x2.shape[-1]
    _rmsnorm_kernel[(x2.shape[0],)](x2, weight, out, n, eps, x2.stride(0), out.stride(0),
                                    BLOCK=triton.next_power_of_2(n), HAS_W=True)
    return out.view(*x.shape[:-1], n)


@register("rmsnorm_unweighted", "triton")
def rmsnorm_unweighted(x, eps):
    if not x.is_cuda:
        from runners.engine.ops.torch_ops import rmsnorm_unweighted as ref
        return ref(x, eps)
    x2 = _rows(x)
    out = torch.empty_like(x2)
    n = x2.shape[-1]
    _rmsnorm_kernel[(x2.shape[0],)](x2, x2, out, n, eps, x2.stride(0), out.stride(0),
                                    BLOCK=triton.next_power_of_2(n), HAS_W=False)
    return out.view(x.shape)


@triton.jit
def _gathered_attn_kernel(q_ptr, src0_ptr, idx0_ptr, src1_ptr, idx1_ptr, sink_ptr, out_ptr,
                          H, D, K0, K1, scale,
                          stride_qt, stride_qh, stride_i0, stride_i1, stride_ot, stride_oh,
                          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          IEEE: tl.constexpr):
    """One query row, BLOCK_H heads, online softmax over the gathered rows of
    two sources; the sink starts the running max and denominator."""
    t = tl.program_id(0)
    hb = tl.program_id(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    hmask = heads < H
    dmask = dims < D
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    m = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
    l = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for src in tl.static_range(2):
        if src == 0:
            n_k = K0
        else:
            n_k = K1
        for k0 in range(0, n_k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if src == 0:
                idx = tl.load(idx0_ptr + t * stride_i0 + ks, mask=ks < n_k, other=-1)
            else:
                idx = tl.load(idx1_ptr + t * stride_i1 + ks, mask=ks < n_k, other=-1)
            valid = idx >= 0
            rows = tl.where(valid, idx, 0).to(tl.int64)
            if src == 0:
                kv = tl.load(src0_ptr + rows[:, None] * D + dims[None, :],
                             mask=valid[:, None] & dmask[None, :], other=0.0)
            else:
                kv = tl.load(src1_ptr + rows[:, None] * D + dims[None, :],
                             mask=valid[:, None] & dmask[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kv), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kv))
            s = s * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, kv.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
            m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])


@register("sparse_attention", "triton")
def sparse_attention(q, sources, sinks, scale):
    if not q.is_cuda or len(sources) > 2:
        from runners.engine.ops.torch_ops import sparse_attention as ref
        return ref(q, sources, sinks, scale)
    T, H, D = q.shape
    out = torch.empty_like(q)
    if T == 0:
        return out
    (s0, i0), (s1, i1) = sources[0], sources[1] if len(sources) > 1 else (sources[0][0], sources[0][1][:, :0])
    s0, s1 = s0.contiguous(), s1.contiguous()
    i0, i1 = i0.contiguous(), i1.contiguous()
    q = q.contiguous()
    BLOCK_H = 16
    grid = (T, triton.cdiv(H, BLOCK_H))
    _gathered_attn_kernel[grid](
        q, s0, i0, s1, i1, sinks.float().contiguous(), out, H, D, i0.shape[1], i1.shape[1], scale,
        q.stride(0), q.stride(1), i0.stride(0), max(i1.stride(0), 1), out.stride(0), out.stride(1),
        BLOCK_H=BLOCK_H, BLOCK_K=16 if D > 256 else 32, BLOCK_D=triton.next_power_of_2(D),
        IEEE=q.dtype == torch.float32, num_warps=8 if D > 256 else 4,
    )
    return out


@triton.jit
def _hc_sinkhorn_kernel(mix_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, T, iters, eps,
                        HC: tl.constexpr, BLOCK_T: tl.constexpr):
    """pre / post / Sinkhorn-normalised comb for BLOCK_T token rows at once
    (the torch version launches ~4 kernels per Sinkhorn iteration)."""
    M = (2 + HC) * HC
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    i = tl.arange(0, HC)
    s_pre = tl.load(scale_ptr + 0)
    s_post = tl.load(scale_ptr + 1)
    s_comb = tl.load(scale_ptr + 2)
    m2 = rmask[:, None]
    pre_w = tl.load(mix_ptr + rows[:, None] * M + i[None, :], mask=m2, other=0.0)
    post_w = tl.load(mix_ptr + rows[:, None] * M + HC + i[None, :], mask=m2, other=0.0)
    pre = tl.sigmoid(pre_w * s_pre + tl.load(base_ptr + i)[None, :]) + eps
    post = 2 * tl.sigmoid(post_w * s_post + tl.load(base_ptr + HC + i)[None, :])
    cell = i[:, None] * HC + i[None, :]  # [HC, HC] offsets
    m3 = rmask[:, None, None]
    comb_w = tl.load(mix_ptr + rows[:, None, None] * M + 2 * HC + cell[None, :, :], mask=m3, other=0.0)
    logits = comb_w * s_comb + tl.load(base_ptr + 2 * HC + cell)[None, :, :]
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    comb = e / tl.sum(e, axis=2)[:, :, None] + eps
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + eps)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
    tl.store(pre_ptr + rows[:, None] * HC + i[None, :], pre, mask=m2)
    tl.store(post_ptr + rows[:, None] * HC + i[None, :], post, mask=m2)
    tl.store(comb_ptr + rows[:, None, None] * (HC * HC) + cell[None, :, :], comb, mask=m3)


@register("hc_sinkhorn", "triton")
def hc_sinkhorn(streams, fn, base, scale, iters, eps, norm_eps):
    hc = streams.shape[1]
    if not streams.is_cuda or hc & (hc - 1):
        from runners.engine.ops.torch_ops import hc_sinkhorn as ref
        return ref(streams, fn, base, scale, iters, eps, norm_eps)
    flat = rmsnorm_unweighted(streams.flatten(start_dim=1).float(), norm_eps)
    mix = torch.nn.functional.linear(flat, fn.float()).contiguous()
    T = mix.shape[0]
    pre = torch.empty(T, hc, device=mix.device, dtype=torch.float32)
    post = torch.empty_like(pre)
    comb = torch.empty(T, hc, hc, device=mix.device, dtype=torch.float32)
    if T:
        BLOCK_T = 32
        _hc_sinkhorn_kernel[(triton.cdiv(T, BLOCK_T),)](
            mix, base.float().contiguous(), scale.float().contiguous(), pre, post, comb, T, iters, eps,
            HC=hc, BLOCK_T=BLOCK_T)
    return pre, post, comb


# ---------------------------------------------------------------- FP8 and the routed experts
# (kernels in triton_fp8.py / triton_moe.py, which import without a GPU for the interpreter)

from runners.engine.ops import quant as _quant  # noqa: E402
from runners.engine.ops import torch_ops as _torch_ops  # noqa: E402
from runners.engine.ops import triton_fp8, triton_moe  # noqa: E402


@register("act_quant", "triton")
def act_quant(x):
    if not x.is_cuda:
        return _quant.act_quant(x)
    return triton_fp8.act_quant(x)


@register("fp8_linear", "triton")
def fp8_linear(x, w_q, w_scale):
    if not x.is_cuda:
        return _quant.fp8_linear(x, w_q, w_scale)
    return triton_fp8.fp8_linear(x, w_q, w_scale)


@register("fused_moe_quant", "triton")
def fused_moe_quant(x, ids, weights, w13, w13_scale, w2, w2_scale, limit, fmt):
    if not x.is_cuda:
        return _quant.fused_moe_quant(x, ids, weights, w13, w13_scale, w2, w2_scale, limit, fmt)
    return triton_moe.fused_moe_quant(x, ids, weights, w13, w13_scale, w2, w2_scale, limit, fmt)


def _quantized_experts(expert_fn):
    """(codes, scales, codes, scales, format) behind an ``expert_fn``, or None.

    model.Experts passes its bound ``_fp4_expert`` for FP4 experts; the module
    it is bound to holds the codes and scales, which the kernel reads as they
    are instead of calling the function once per expert.
    """
    owner = getattr(expert_fn, "__self__", None)
    s13, s2 = getattr(owner, "gate_up_proj_scale_inv", None), getattr(owner, "down_proj_scale_inv", None)
    if s13 is None or s2 is None:
        return None
    w13, w2 = owner.gate_up_proj, owner.down_proj
    fmt = {torch.uint8: "fp4", torch.float8_e4m3fn: "fp8"}.get(w13.dtype)
    return None if fmt is None else (w13, s13, w2, s2, fmt)


@register("fused_moe", "triton")
def fused_moe(x, ids, weights, w13, w2, limit, expert_fn=None):
    if x.is_cuda:
        if expert_fn is None:
            return triton_moe.fused_moe(x, ids, weights, w13, w2, limit)
        q = _quantized_experts(expert_fn)
        if q is not None:
            w13q, s13, w2q, s2, fmt = q
            return triton_moe.fused_moe_quant(x, ids, weights, w13q, s13, w2q, s2, limit, fmt)
    return _torch_ops.fused_moe(x, ids, weights, w13, w2, limit, expert_fn)
