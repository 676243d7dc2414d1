"""Triton FusedMoE: routed experts as two grouped GEMM launches.

Same math as ``torch_ops.fused_moe`` (and, for quantized experts,
``quant.fused_moe_quant``): each (token, expert) pair is one row; rows are
sorted by expert on the device; the gate/up launch computes
``swiglu(x @ w13[e]^T)`` for every row block of every expert, the down launch
``h @ w2[e]^T`` times the routing weight, and a last small launch adds each
token's k rows in ascending expert order.

Rounding follows the torch op step by step: the gate/up product, the clamps,
silu and the SwiGLU product are each rounded to the activation dtype, the
down product too, then the weighted row; the k rows are summed in float32
and rounded once. Only the GEMMs' float32 summation order differs.

Quantized experts (FP8 e4m3 with 128x128 UE8M0 scales, or FP4 e2m1 packed
two per byte with one UE8M0 scale per 32 inputs) are decoded tile by tile
inside the GEMMs to the activation dtype, which is exact; the activations
entering each GEMM are FP8-quantized per 1x128 block as in ``quant.py``: x by
``triton_fp8.act_quant``, the SwiGLU output in the gate/up launch's epilogue.

Launchers run on whatever device the tensors are on (``TRITON_INTERPRET=1``
runs them on the CPU); ``triton_ops`` registers them as engine ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runners.engine.ops import triton_fp8 as f8

DENSE, FP8, FP4 = 0, 1, 2
_FORMATS = {"fp8": FP8, "fp4": FP4}


# ---------------------------------------------------------------- routing: rows sorted by expert


@triton.jit
def _align_kernel(seg_end_ptr, blk_expert_ptr, blk_row0_ptr, blk_rowend_ptr, E, n_blocks,
                  BM: tl.constexpr, E_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    """Row block b -> (expert, first sorted row, end of that expert's rows).

    seg_end: [E] end of each expert's run in the sorted rows. Each expert's run
    is cut into cdiv(count, BM) blocks; blocks past the last get expert -1.
    Every program recomputes the (short) prefix sums instead of a second launch.
    """
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    e = tl.arange(0, E_PAD)  # [E_PAD]
    emask = e < E
    end = tl.load(seg_end_ptr + e, mask=emask, other=0).to(tl.int32)
    start = tl.load(seg_end_ptr + e - 1, mask=emask & (e > 0), other=0).to(tl.int32)
    cnt = tl.where(emask, end - start, 0)
    nblk = (cnt + BM - 1) // BM
    blk_end = tl.cumsum(nblk, axis=0)
    # experts whose blocks all come before b ([BLOCK_B, E_PAD]); empty experts count but add nothing
    before = blk_end[None, :] <= b[:, None]
    eid = tl.sum(before.to(tl.int32), axis=1)
    first_blk = tl.sum(tl.where(before, nblk[None, :], 0), axis=1)
    row_base = tl.sum(tl.where(before, cnt[None, :], 0), axis=1)
    cnt_e = tl.sum(tl.where(e[None, :] == eid[:, None], cnt[None, :], 0), axis=1)
    bmask = b < n_blocks
    tl.store(blk_expert_ptr + b, tl.where(eid < E, eid, -1), mask=bmask)
    tl.store(blk_row0_ptr + b, row_base + (b - first_blk) * BM, mask=bmask)
    tl.store(blk_rowend_ptr + b, row_base + cnt_e, mask=bmask)


def _route(ids: torch.Tensor, weights: torch.Tensor, E: int, BM: int):
    """Device-side sort of the T*k (token, expert) pairs; no host sync.

    Returns the pair index of each sorted row [R], the routing weight of each
    pair [R] (pairs numbered t*k + j with experts ascending in j), the block
    table and the grid's block count (an upper bound known on the host).
    """
    T, k = ids.shape
    R = T * k
    ids_s, perm = ids.sort(dim=1, stable=True)  # pair j of a token: its j-th smallest expert
    w_pairs = weights.gather(1, perm).reshape(-1)
    sorted_ids, order = ids_s.reshape(-1).sort(stable=True)
    seg_end = torch.searchsorted(sorted_ids, torch.arange(E, device=ids.device, dtype=sorted_ids.dtype), right=True)
    # each expert with rows adds at most one partial block
    n_blocks = triton.cdiv(R, BM) + min(E, R)
    blk = torch.empty(3, n_blocks, dtype=torch.int32, device=ids.device)
    BLOCK_B = 64
    _align_kernel[(triton.cdiv(n_blocks, BLOCK_B),)](seg_end, blk[0], blk[1], blk[2], E, n_blocks,
                                                      BM=BM, E_PAD=triton.next_power_of_2(E), BLOCK_B=BLOCK_B)
    return order, w_pairs, blk, n_blocks


# ---------------------------------------------------------------- tiles


@triton.jit
def _e2m1_to_f32(code):
    """float32 values of 4-bit e2m1 codes (bit 3 sign; magnitudes 0 .5 1 1.5 2 3 4 6)."""
    m = code & 7
    # m >= 2: exponent m>>1 (bias 1), mantissa bit m&1; m == 1 is 0.5 (the one subnormal)
    bits = tl.where(m >= 2, (((m >> 1) + 126) << 23) | ((m & 1) << 22), tl.where(m == 1, 126 << 23, 0))
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _act_tile(a_ptr, as_ptr, rows64, rmask, k0, K, stride_a, stride_as,
              BK: tl.constexpr, A_FP8: tl.constexpr, DTYPE: tl.constexpr):
    """[BM, BK] activations in DTYPE; FP8 codes are decoded with their 1x128 scale (exact)."""
    ks = k0 + tl.arange(0, BK)
    m = rmask[:, None] & (ks < K)[None, :]
    a = tl.load(a_ptr + rows64[:, None] * stride_a + ks[None, :], mask=m, other=0.0)
    if A_FP8:
        s = tl.load(as_ptr + rows64 * stride_as + k0 // 128, mask=rmask, other=1.0)
        a = (a.to(tl.float32) * s[:, None]).to(DTYPE)
    return a


@triton.jit
def _weight_tile(w_ptr, s_ptr, n, nmask, k0, K, stride_wn, stride_sn,
                 BN: tl.constexpr, BK: tl.constexpr, W_FMT: tl.constexpr, DTYPE: tl.constexpr):
    """[BN, BK] of one expert's weight (rows n, inputs k0..k0+BK) decoded to DTYPE.

    DENSE: w [N, K]. FP8: w [N, K] e4m3, s [cdiv(N,128), cdiv(K,128)] UE8M0 (BK divides 128).
    FP4: w [N, cdiv(K,2)] bytes (even input in the low nibble), s [N, cdiv(K,32)] UE8M0.
    Codes times power-of-two scales are exact in float32 and in DTYPE, as the torch decoding.
    """
    n64 = n.to(tl.int64)
    if W_FMT == 0:
        ks = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + n64[:, None] * stride_wn + ks[None, :], mask=nmask[:, None] & (ks < K)[None, :],
                    other=0.0).to(DTYPE)
    elif W_FMT == 1:
        ks = k0 + tl.arange(0, BK)
        q = tl.load(w_ptr + n64[:, None] * stride_wn + ks[None, :], mask=nmask[:, None] & (ks < K)[None, :],
                    other=0.0)
        s = f8.ue8m0_to_f32(tl.load(s_ptr + (n // 128) * stride_sn + k0 // 128, mask=nmask, other=127))
        w = (q.to(tl.float32) * s[:, None]).to(DTYPE)
    else:
        kb = k0 // 2 + tl.arange(0, BK // 2)
        byte = tl.load(w_ptr + n64[:, None] * stride_wn + kb[None, :],
                       mask=nmask[:, None] & (kb < (K + 1) // 2)[None, :], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(byte & 15, byte >> 4), (BN, BK))  # [BN, BK/2, 2] -> inputs in order
        if BK == 32:  # one scale per row: no reshape to broadcast it
            s = f8.ue8m0_to_f32(tl.load(s_ptr + n64 * stride_sn + k0 // 32, mask=nmask, other=127))
            w = (_e2m1_to_f32(codes) * s[:, None]).to(DTYPE)
        else:
            kg = k0 // 32 + tl.arange(0, BK // 32)
            s = f8.ue8m0_to_f32(tl.load(s_ptr + n64[:, None] * stride_sn + kg[None, :],
                                        mask=nmask[:, None] & (kg < (K + 31) // 32)[None, :], other=127))
            v = tl.reshape(_e2m1_to_f32(codes), (BN, BK // 32, 32)) * s[:, :, None]
            w = tl.reshape(v, (BN, BK)).to(DTYPE)
    return w


@triton.jit
def _dot(a, w, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # a [BM, BK] @ w[BN, BK]^T; fp32 operands use IEEE products (no TF32), as torch's fp32 matmul.
    # UPCAST (the interpreter, whose dot multiplies bf16 bit patterns as integers): the same
    # exact products in float32
    if UPCAST:
        return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _block_of(pid, n_blocks, n_cols, GROUP: tl.constexpr):
    """Program -> (row block, column block), GROUP row blocks at a time so that
    an expert's weight tile is reused by its row blocks while it is in L2."""
    group = GROUP * n_cols
    first = (pid // group) * GROUP
    size = tl.minimum(n_blocks - first, GROUP)
    return first + (pid % group) % size, (pid % group) // size


# ---------------------------------------------------------------- the two grouped GEMMs


@triton.jit
def _gate_up_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, order_ptr, blk_ptr,
                    n_blocks, top_k, D, I, limit,
                    stride_a, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_h, stride_hs,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                    W_FMT: tl.constexpr, A_FP8: tl.constexpr, H_FP8: tl.constexpr, RNE: tl.constexpr,
                    DTYPE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """h[r, n] = swiglu(a[token(r)] @ w13[e]^T) for sorted rows r of one expert block.

    a: [T, D] (or e4m3 + [T, cdiv(D,128)] scales); w13[e]: gate rows [0, I), up rows [I, 2I);
    h: [R, I] in DTYPE, or (H_FP8, BN == 128) e4m3 codes + [R, cdiv(I,128)] float32 scales.
    """
    pid_b, pid_n = _block_of(tl.program_id(0), n_blocks, tl.cdiv(I, BN), GROUP)
    e = tl.load(blk_ptr + pid_b)
    if e < 0:  # past the last expert block (the grid is an upper bound)
        return
    row0 = tl.load(blk_ptr + n_blocks + pid_b)
    row_end = tl.load(blk_ptr + 2 * n_blocks + pid_b)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    tok = (tl.load(order_ptr + rows, mask=rmask, other=0) // top_k).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < I
    w_e = w_ptr + e.to(tl.int64) * stride_we
    s_e = ws_ptr + e.to(tl.int64) * stride_se
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, D, BK):
        a = _act_tile(a_ptr, as_ptr, tok, rmask, k0, D, stride_a, stride_as, BK, A_FP8, DTYPE)
        wg = _weight_tile(w_e, s_e, n, nmask, k0, D, stride_wn, stride_sn, BN, BK, W_FMT, DTYPE)
        wu = _weight_tile(w_e, s_e, I + n, nmask, k0, D, stride_wn, stride_sn, BN, BK, W_FMT, DTYPE)
        acc_g = _dot(a, wg, acc_g, IEEE, UPCAST)
        acc_u = _dot(a, wu, acc_u, IEEE, UPCAST)
    # SwiGLU with the clamps, each step rounded to DTYPE as the torch op's tensors are
    g = f8.round_to(tl.minimum(f8.round_to(acc_g, DTYPE), limit), DTYPE)
    u = f8.round_to(tl.minimum(tl.maximum(f8.round_to(acc_u, DTYPE), -limit), limit), DTYPE)
    silu = f8.round_to(tl.math.div_rn(g, 1.0 + tl.exp(-g)), DTYPE)
    h = f8.round_to(silu * u, DTYPE)  # float32 on DTYPE's grid
    r64 = rows.to(tl.int64)
    m = rmask[:, None] & nmask[None, :]
    if H_FP8:
        # the down GEMM's activation quantization, here: this tile is one whole 1x128 block
        hq, hs = f8.quantize_block(tl.where(m, h, 0.0), RNE)
        tl.store(h_ptr + r64[:, None] * stride_h + n[None, :], hq, mask=m)
        tl.store(hs_ptr + r64 * stride_hs + pid_n, hs, mask=rmask)
    else:
        tl.store(h_ptr + r64[:, None] * stride_h + n[None, :], h.to(DTYPE), mask=m)


@triton.jit
def _down_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, order_ptr, wpair_ptr, blk_ptr,
                 n_blocks, D, I,
                 stride_h, stride_hs, stride_we, stride_wn, stride_se, stride_sn, stride_y,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                 W_FMT: tl.constexpr, A_FP8: tl.constexpr, DTYPE: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr):
    """y[pair(r), n] = (h[r] @ w2[e]^T) * weight(pair(r)) for sorted rows r of one expert block.

    h: [R, I] (or e4m3 + scales); w2[e]: [D, I]; y: [R, D] indexed by pair (t*k + j).
    """
    pid_b, pid_n = _block_of(tl.program_id(0), n_blocks, tl.cdiv(D, BN), GROUP)
    e = tl.load(blk_ptr + pid_b)
    if e < 0:
        return
    row0 = tl.load(blk_ptr + n_blocks + pid_b)
    row_end = tl.load(blk_ptr + 2 * n_blocks + pid_b)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    r64 = rows.to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < D
    w_e = w_ptr + e.to(tl.int64) * stride_we
    s_e = ws_ptr + e.to(tl.int64) * stride_se
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, I, BK):
        a = _act_tile(h_ptr, hs_ptr, r64, rmask, k0, I, stride_h, stride_hs, BK, A_FP8, DTYPE)
        w = _weight_tile(w_e, s_e, n, nmask, k0, I, stride_wn, stride_sn, BN, BK, W_FMT, DTYPE)
        acc = _dot(a, w, acc, IEEE, UPCAST)
    pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    wt = f8.round_to(tl.load(wpair_ptr + pair, mask=rmask, other=0.0).to(tl.float32), DTYPE)
    y = f8.round_to(f8.round_to(acc, DTYPE) * wt[:, None], DTYPE).to(DTYPE)
    tl.store(y_ptr + pair[:, None] * stride_y + n[None, :], y, mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, T, D, top_k, BLOCK_D: tl.constexpr):
    """out[t] = sum_j y[t*k + j] in float32, j ascending (ascending expert ids), rounded once."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in range(0, top_k):
        acc += tl.load(y_ptr + (t * top_k + j) * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + cols, f8.round_to(acc, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------- launchers

_INTERPRETED = f8._INTERPRETED


def _config(R: int, E: int, dtype: torch.dtype, quant: bool):
    """Tile sizes from the rows per expert (decode: a few rows, many experts).

    Not tuned on a GPU yet (bench/bench_moe.py --sweep times alternatives); chosen
    to keep ptxas's register spills low for sm_90."""
    per_expert = R / max(1, min(E, R))
    if dtype == torch.float32:  # IEEE fp32 dots: register-heavy, keep tiles small
        # (quantized: the 128-wide gate/up tiles at 32 rows spill kilobytes)
        BM = 16 if per_expert <= 16 or quant else 32
        return dict(BM=BM, BN_up=128 if quant else 32, BN_down=32, BK=32, warps=4, stages=2)
    if per_expert <= 16:
        BM, warps, stages = 16, 4, 4
    elif per_expert <= 48:
        BM, warps, stages = 32, 4, 4
    elif per_expert <= 96:
        BM, warps, stages = 64, 4, 3
    else:
        BM, warps, stages = 128, 8, 3
    # the quantized SwiGLU output needs whole 1x128 blocks per tile
    BN_up = 128 if quant or BM >= 64 else 64
    return dict(BM=BM, BN_up=BN_up, BN_down=128 if BM >= 64 else 64, BK=64, warps=warps, stages=stages)


def _moe(x, ids, weights, w13, w13_scale, w2, w2_scale, limit, fmt: int, cfg: dict | None = None):
    """``cfg`` overrides ``_config``'s tiles (bench/bench_moe.py --sweep)."""
    T, k = ids.shape
    D = x.shape[-1]
    E = w13.shape[0]
    I = w13.shape[1] // 2
    out = x.new_empty(T, D)
    if T == 0:
        return out
    quant = fmt != DENSE
    cfg = {**_config(T * k, E, x.dtype, quant), **(cfg or {})}
    BM = cfg["BM"]
    if quant and cfg["BN_up"] != 128:
        raise ValueError("quantized experts need BN_up == 128 (whole 1x128 activation blocks)")
    order, w_pairs, blk, n_blocks = _route(ids, weights, E, BM)
    R = T * k
    dtype, ieee = f8.tl_dtype(x.dtype), x.dtype == torch.float32
    x = x if x.stride(-1) == 1 else x.contiguous()
    if quant:
        a, a_s = f8.act_quant(x)
        h = torch.empty(R, I, dtype=torch.float8_e4m3fn, device=x.device)
        h_s = torch.empty(R, triton.cdiv(I, 128), dtype=torch.float32, device=x.device)
        s13, s2 = w13_scale, w2_scale
    else:
        a, a_s = x, x  # no scales: the pointer is never read
        h = torch.empty(R, I, dtype=x.dtype, device=x.device)
        h_s, s13, s2 = h, w13, w2
    sse = lambda s: (s.stride(0), s.stride(1)) if quant else (0, 0)  # noqa: E731
    BN = cfg["BN_up"]
    _gate_up_kernel[(n_blocks * triton.cdiv(I, BN),)](
        a, a_s, w13, s13, h, h_s, order, blk, n_blocks, k, D, I, float(limit),
        a.stride(0), a_s.stride(0) if quant else 0, w13.stride(0), w13.stride(1), *sse(s13),
        h.stride(0), h_s.stride(0) if quant else 0,
        BM=BM, BN=BN, BK=cfg["BK"], GROUP=8, W_FMT=fmt, A_FP8=quant, H_FP8=quant, RNE=f8.rne_scales(),
        DTYPE=dtype, IEEE=ieee, UPCAST=_INTERPRETED,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    y = torch.empty(R, D, dtype=x.dtype, device=x.device)
    BN = cfg["BN_down"]
    _down_kernel[(n_blocks * triton.cdiv(D, BN),)](
        h, h_s, w2, s2, y, order, w_pairs, blk, n_blocks, D, I,
        h.stride(0), h_s.stride(0) if quant else 0, w2.stride(0), w2.stride(1), *sse(s2), y.stride(0),
        BM=BM, BN=BN, BK=cfg["BK"], GROUP=8, W_FMT=fmt, A_FP8=quant, DTYPE=dtype, IEEE=ieee, UPCAST=_INTERPRETED,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    _combine_kernel[(T, triton.cdiv(D, BLOCK_D))](y, out, T, D, k, BLOCK_D=BLOCK_D)
    return out


def fused_moe(x, ids, weights, w13, w2, limit):
    """Dense experts, as ``torch_ops.fused_moe`` without ``expert_fn``.
    x [T, D]; ids, weights [T, k]; w13 [E, 2I, D]; w2 [E, D, I]."""
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    return _moe(x, ids, weights, w13, None, w2, None, limit, DENSE)


def fused_moe_quant(x, ids, weights, w13, w13_scale, w2, w2_scale, limit, fmt: str):
    """Quantized experts, as ``quant.fused_moe_quant``. fp8: w13 [E, 2I, D] e4m3 with
    [E, cdiv(2I,128), cdiv(D,128)] scales, w2 [E, D, I]; fp4: w13 [E, 2I, D/2] bytes with
    [E, 2I, cdiv(D,32)] scales, w2 [E, D, I/2]. Scales are UE8M0 bytes."""
    return _moe(x, ids, weights, w13.contiguous(), w13_scale.contiguous(), w2.contiguous(), w2_scale.contiguous(),
                limit, _FORMATS[fmt])
