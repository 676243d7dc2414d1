"""FP8 / FP4 weights and FP8 activations for precision="fp8".

The number formats and their math live in ``parity.quant`` (shared with the
reference's quantization simulation); this module decides which engine
tensors use which format, as DeepSeek-V4-Flash's release does:

* FP8 e4m3, 128x128 UE8M0 block scales: attention q_a/q_b/kv/o_a/o_b, the
  indexer's q_b, the shared expert's gate/up/down.
* FP4 e2m1, one UE8M0 scale per 32 inputs: routed experts.
* The rest stays bf16 (embeddings, lm_head, routers, compressor and indexer
  projections, norms, hyper-connections, sinks, biases).

Activations entering a quantized matmul are quantized per 1x128 block (and,
in the experts, the SwiGLU output before down_proj). The torch backend
dequantizes both operands to the activation dtype and multiplies there: the
same arithmetic as ``reference_models.quant_sim``, so the two agree bitwise;
a fused kernel accumulates in fp32 instead.
"""

from __future__ import annotations

import torch

from parity import quant as pq
from runners.engine import faults
from runners.engine.ops import invariant as inv
from runners.engine.ops import register

FP8_SUFFIXES, FP4_SUFFIXES = pq.DSV4_FP8_SUFFIXES, pq.DSV4_FP4_SUFFIXES
weight_format = pq.dsv4_weight_format


def quantize_for_engine(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stored form of one checkpoint tensor at precision fp8."""
    # Quantize what a bf16 checkpoint holds, so an fp32 file gives the same codes.
    w = t.to(torch.bfloat16)
    fmt = weight_format(name)
    if fmt == "fp8":
        q, s = pq.quantize_fp8_weight(w)
        return {"": q, "_scale_inv": s}
    if fmt == "fp4":
        packed, s = pq.quantize_fp4_weight(w)
        return {"": packed, "_scale_inv": s}
    return {"": w}


@register("act_quant", "torch")
def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 codes and one power-of-two fp32 scale per 1x128 block."""
    if faults.active("act_scale_round_nearest"):
        # FAULT act_scale_round_nearest: amax/448 rounded to the nearest power of two, so a block's
        # largest values can land past 448 and saturate; the reference rounds the scale up.
        return pq.quantize_fp8_act(x, rounding="rne")
    return pq.quantize_fp8_act(x)


def qdq_act(x: torch.Tensor) -> torch.Tensor:
    from runners.engine.ops import ops

    q, s = ops.act_quant(x)
    return pq.dequantize_fp8_act(q, s, dtype=x.dtype)


@register("fp8_linear", "torch")
def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return inv.linear_decoded(qdq_act(x), w_q, lambda: pq.dequantize_fp8_weight(w_q, w_scale, dtype=x.dtype),
                              tag=x.dtype)


def fp8_weight(w_q: torch.Tensor, w_scale: torch.Tensor, dtype) -> torch.Tensor:
    return pq.dequantize_fp8_weight(w_q, w_scale, dtype=dtype)


def fp4_expert(x, e, gate_up, gate_up_scale, down, down_scale, limit, hidden, inter):
    """Routed expert e with FP4 weights ([E, ...] codes and scales): [n, hidden] -> [n, hidden]."""
    from runners.engine.ops.torch_ops import swiglu

    # batch-invariant: every expert decoded (and its weight rounded) once, cached,
    # then indexed; plain torch: only expert e, each call
    index, pick = (e, slice(None)) if inv.enabled(x) else (None, e)
    w13 = lambda: pq.dequantize_fp4_weight(gate_up[pick], gate_up_scale[pick], k=hidden, dtype=x.dtype)  # noqa: E731
    w2 = lambda: pq.dequantize_fp4_weight(down[pick], down_scale[pick], k=inter, dtype=x.dtype)  # noqa: E731
    h = swiglu(inv.linear_decoded(qdq_act(x), gate_up, w13, index=index, tag=x.dtype), limit)
    return inv.linear_decoded(qdq_act(h), down, w2, index=index, tag=x.dtype)


def fp8_expert(x, e, gate_up, gate_up_scale, down, down_scale, limit):
    """Routed expert e with FP8 128x128 block-scaled weights ([E, ...] codes and scales)."""
    from runners.engine.ops.torch_ops import swiglu

    index, pick = (e, slice(None)) if inv.enabled(x) else (None, e)
    w13 = lambda: pq.dequantize_fp8_weight(gate_up[pick], gate_up_scale[pick], dtype=x.dtype)  # noqa: E731
    w2 = lambda: pq.dequantize_fp8_weight(down[pick], down_scale[pick], dtype=x.dtype)  # noqa: E731
    h = swiglu(inv.linear_decoded(qdq_act(x), gate_up, w13, index=index, tag=x.dtype), limit)
    return inv.linear_decoded(qdq_act(h), down, w2, index=index, tag=x.dtype)


@register("fused_moe_quant", "torch")
def fused_moe_quant(x, ids, weights, w13, w13_scale, w2, w2_scale, limit, fmt: str):
    """``fused_moe`` over quantized experts: fmt "fp4" (e2m1 codes two per byte,
    [E, N, cdiv(K,32)] UE8M0 scales) or "fp8" (e4m3, [E, cdiv(N,128), cdiv(K,128)]);
    w13 holds 2I rows of D inputs, w2 D rows of I inputs, as in ``fused_moe``.
    A kernel backend takes the codes as they are; here each expert is decoded."""
    from runners.engine.ops.torch_ops import fused_moe

    hidden, inter = x.shape[-1], w13.shape[1] // 2
    if fmt == "fp4":
        fn = lambda e, rows: fp4_expert(rows, e, w13, w13_scale, w2, w2_scale, limit, hidden, inter)  # noqa: E731
    elif fmt == "fp8":
        fn = lambda e, rows: fp8_expert(rows, e, w13, w13_scale, w2, w2_scale, limit)  # noqa: E731
    else:
        raise ValueError(f"quantized experts are fp4 or fp8, got {fmt!r}")
    return fused_moe(x, ids, weights, w13, w2, limit, fn)
