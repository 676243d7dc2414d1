"""Triton FP8 pieces: 1x128 activation quantization and the FP8 block-scaled GEMM.

The formats are those of ``parity.quant``: e4m3 codes, power-of-two scales
(weights: UE8M0 bytes per 128x128 block; activations: float32 per 1x128),
chosen by rounding ``max(amax, 1e-4) / 448`` up to a power of two (or to
nearest for the ``act_scale_round_nearest`` zoo fault).

This module only defines kernels and their launchers (which run on whatever
device the tensors are on, so ``TRITON_INTERPRET=1`` runs them on the CPU);
``triton_ops`` registers them as engine ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runners.engine import faults

ACT_BLOCK = 128  # activation block (1 x 128) and weight block (128 x 128) side
# in kernels (a jit function reads only constexpr globals)
_FP8_MAX = tl.constexpr(448.0)
_BLK = tl.constexpr(ACT_BLOCK)


@triton.jit
def ue8m0_to_f32(code):
    """float32 value of UE8M0 bytes: 2**(code-127); 0 -> 2**-127, 255 -> NaN (as parity.quant)."""
    e = code.to(tl.int32)
    bits = tl.where(e == 0, 0x400000, e << 23)
    bits = tl.where(e == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pow2_scale(amax, RNE: tl.constexpr):
    """Power-of-two scale for a block of absolute maximum ``amax`` (float32),
    from the float32 bits exactly as ``parity.quant.pow2_scale``."""
    raw = tl.math.div_rn(tl.maximum(amax, 1e-4), _FP8_MAX)  # correctly rounded, as torch's division
    bits = raw.to(tl.int32, bitcast=True)
    ex = (bits >> 23) & 0xFF
    man = bits & 0x7FFFFF
    if RNE:
        up = (man > 0x400000) | ((man == 0x400000) & ((ex & 1) == 1))
    else:
        up = man != 0
    ex = tl.minimum(tl.maximum(ex + up.to(tl.int32), 1), 254)
    return (ex << 23).to(tl.float32, bitcast=True)


@triton.jit
def _rint(r):
    """Round to the nearest integer, ties to even, of small float32 values (exact steps)."""
    f = tl.floor(r)
    d = r - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to DTYPE's grid (nearest, ties to even), kept as float32.

    Done on the bits rather than by a cast: the same rounding on the GPU and
    in the interpreter (whose narrowing casts truncate); values on the grid
    then cast exactly. NaN and overflow do not occur in these epilogues.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def round_e4m3(v):
    """float32 ``v`` (|v| <= 448) rounded to the e4m3 grid, as torch's cast (nearest, even)."""
    bits = v.to(tl.int32, bitcast=True)
    ex = (bits >> 23) & 0xFF
    # 3 mantissa bits; below 2**-6 the subnormal spacing 2**-9
    ulp = ((tl.maximum(ex, 121) - 3) << 23).to(tl.float32, bitcast=True)
    mag = _rint(tl.abs(v) / ulp) * ulp  # exact: ulp is a power of two
    # the sign kept also when the value rounds to zero (-0.0, as the cast gives)
    return (mag.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def quantize_block(x, RNE: tl.constexpr):
    """e4m3 codes and scales of ``x`` [R, 128] float32, one scale per row (the
    caller has zeroed columns past the end, as the reference's padding)."""
    s = pow2_scale(tl.max(tl.abs(x), axis=1), RNE)
    # dividing by a power of two is exact; clamp first: the reference's cast does not saturate
    q = tl.math.div_rn(x, s[:, None])
    q = round_e4m3(tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX))
    return q.to(tl.float8e4nv), s


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, stride_s,
                      BLOCK_R: tl.constexpr, RNE: tl.constexpr):
    # x: [M, K] -> q: [M, K] e4m3, s: [M, cdiv(K, 128)] float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    blk = tl.program_id(1)
    cols = blk * _BLK + tl.arange(0, _BLK)
    m = (rows < M)[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    q, s = quantize_block(x, RNE)
    tl.store(q_ptr + r64[:, None] * stride_q + cols[None, :], q, mask=m)
    tl.store(s_ptr + r64 * stride_s + blk, s, mask=rows < M)


def rne_scales() -> bool:
    # FAULT act_scale_round_nearest (runners/engine/ops/quant.py): the kernels honour it too
    return faults.active("act_scale_round_nearest")


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``quant.act_quant``: e4m3 codes of x's shape, float32 scales ``[..., cdiv(K, 128)]``."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, nb = x2.shape[0], triton.cdiv(K, ACT_BLOCK)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, nb, dtype=torch.float32, device=x.device)
    if M and K:
        BLOCK_R = 16
        _act_quant_kernel[(triton.cdiv(M, BLOCK_R), nb)](x2, q, s, M, K, x2.stride(0), q.stride(0), s.stride(0),
                                                         BLOCK_R=BLOCK_R, RNE=rne_scales())
    return q.view(*lead, K), s.view(*lead, nb)


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, k_per_split,
                     stride_am, stride_asm, stride_wn, stride_wsn, stride_os, stride_om,
                     BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, FP8_DOT: tl.constexpr,
                     UPCAST: tl.constexpr):
    """out[split] = (a * sa) @ (w * sw)^T over this split's K range.

    a: [M, K] e4m3, as: [M, cdiv(K,128)] f32; w: [N, K] e4m3, ws: [cdiv(N,128), cdiv(K,128)] UE8M0;
    out: [S, M, N] (float32 partials when split, else the output dtype). BK is the scale block (128),
    so each K step has one activation scale per row and one weight scale per output column.
    """
    BK: tl.constexpr = _BLK
    pid = tl.program_id(0)
    # grouped order: GROUP_M row blocks share each weight tile while it is in L2
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    split = tl.program_id(1)

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask, cmask = rows < M, cols < N
    r64, c64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros([BM, BN], tl.float32)
    k_lo = split * k_per_split
    for kk in range(0, k_per_split, BK):  # the last split's steps past K are masked to zero
        k0 = k_lo + kk
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(a_ptr + r64[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + c64[:, None] * stride_wn + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        sa = tl.load(as_ptr + r64 * stride_asm + k0 // BK, mask=rmask, other=1.0)  # [BM]
        sw = ue8m0_to_f32(tl.load(ws_ptr + (cols // BK) * stride_wsn + k0 // BK, mask=cmask, other=127))  # [BN]
        if FP8_DOT:
            # e4m3 x e4m3 products are exact; the scales are applied once per 128-wide K step,
            # in float32 (the tensor core's own accumulator is kept to one block)
            if UPCAST:  # the interpreter (its bf16 dot multiplies bit patterns): exact in float32 too
                d = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            elif BM >= 64:
                d = tl.dot(a, tl.trans(w))
            else:  # tiles below the fp8 MMA's 64 rows (decode): the same codes as bf16, exact
                d = tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
            acc += d * (sa[:, None] * sw[None, :])
        else:
            af = a.to(tl.float32) * sa[:, None]
            wf = w.to(tl.float32) * sw[:, None]
            acc = tl.dot(af, tl.trans(wf), acc, input_precision="ieee")
    o = out_ptr + split * stride_os + r64[:, None] * stride_om + cols[None, :]
    tl.store(o, round_to(acc, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


_INTERPRETED = type(_fp8_gemm_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import


def _fp8_gemm_config(M: int, N: int, K: int, fp8_dot: bool, n_sm: int):
    if not fp8_dot:  # fp32 activations: IEEE fp32 dots, small tiles
        return dict(BM=32, BN=32, num_warps=4, num_stages=2), 1
    if M <= 16:
        BM, BN, warps = 16, 64, 4
    elif M <= 64:
        BM, BN, warps = 64, 64, 4
    else:
        BM, BN, warps = 128, 128, 8
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    k_steps = triton.cdiv(K, ACT_BLOCK)
    # few output tiles (decode): split K so that every SM streams weights
    split = 1
    while tiles * split < 2 * n_sm and k_steps // (split * 2) >= 4:
        split *= 2
    return dict(BM=BM, BN=BN, num_warps=warps, num_stages=4 if BM <= 64 else 3), split


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: keep the split logic exercised on the CPU


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """As ``quant.fp8_linear``: x [..., K] (activation dtype) @ dequant(w_q [N, K], w_scale)^T."""
    lead, K = x.shape[:-1], x.shape[-1]
    N = w_q.shape[0]
    a_q, a_s = act_quant(x.reshape(-1, K))
    M = a_q.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    if w_scale.dtype != torch.uint8:  # float scales: take their exponent byte (they are powers of two)
        w_scale = ((w_scale.float().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    fp8_dot = x.dtype != torch.float32
    cfg, split = _fp8_gemm_config(M, N, K, fp8_dot, _sm_count(x.device))
    k_per_split = triton.cdiv(triton.cdiv(K, ACT_BLOCK), split) * ACT_BLOCK
    split = triton.cdiv(K, k_per_split)
    out = torch.empty(split, M, N, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]), split)
    _fp8_gemm_kernel[grid](a_q, a_s, w_q, w_scale, out, M, N, K, k_per_split,
                           a_q.stride(0), a_s.stride(0), w_q.stride(0), w_scale.stride(0), out.stride(0), out.stride(1),
                           GROUP_M=8, FP8_DOT=fp8_dot, UPCAST=_INTERPRETED, **cfg)
    # partials added in a fixed order, rounded once
    y = out[0] if split == 1 else out.sum(0).to(x.dtype)
    return y.view(*lead, N)
