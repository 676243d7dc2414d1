"""How each checkpoint tensor is stored for a given precision.

fp32: everything fp32. bf16: weights bf16 except what transformers keeps in
fp32 (hyper-connections, sinks, position biases, routing correction bias);
RMSNorm weights are bf16 so a norm's output stays bf16 for the next matmul,
as in ``reference_models.load`` at bf16. fp8: like bf16, plus FP8 e4m3 linear weights with 128x128
UE8M0 block scales and FP4 e2m1 routed experts (ops.quant).
"""

from __future__ import annotations

import re

import torch

from runners.engine.errors import ParityError

PRECISIONS = ("fp32", "bf16", "fp8")

_KEEP_FP32 = re.compile(
    r"(attn_hc|ffn_hc|hc_head)\.|sinks$|position_bias$|e_score_correction_bias$"
)


def activation_dtype(precision: str) -> torch.dtype:
    check(precision)
    return torch.float32 if precision == "fp32" else torch.bfloat16


def check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ParityError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def converter(precision: str):
    check(precision)

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if not t.is_floating_point():
            return {"": t}
        if precision == "fp32" or _KEEP_FP32.search(name):
            return {"": t.float()}
        if precision == "fp8":
            from runners.engine.ops.quant import quantize_for_engine

            return quantize_for_engine(name, t)
        return {"": t.to(torch.bfloat16)}

    return convert
