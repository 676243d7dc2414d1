"""Run the unmodified transformers model as if its weights were quantized.

    with quant_sim(model, weights=True, activations=False, rounding="ceil"):
        model(input_ids)

Inside the block, weights are replaced by their quantize-dequantize images
(``parity.quant``, the math the engine uses) and, optionally, the inputs of
the quantized matmuls are quantize-dequantized per 1 x 128 block. The model
is put back bit-exactly on exit, also when the block raises: the original
tensors are re-attached, not re-computed.

Which weights, mirroring DeepSeek-V4-Flash's release:

* FP8 e4m3, 128 x 128 blocks: attention ``q_a_proj``, ``q_b_proj``,
  ``kv_proj``, ``o_a_proj``, ``o_b_proj``; the lightning indexer's
  ``q_b_proj``; the shared expert's ``gate_proj``, ``up_proj``, ``down_proj``.
* FP4 e2m1, 32 inputs per scale: routed experts ``gate_up_proj`` and
  ``down_proj``.
* Left as they are (BF16 in the release): embeddings, ``lm_head``, router
  weights, the compressors' and the indexer's ``kv_proj`` / ``gate_proj``,
  the indexer scorer's ``weights_proj``, norms, hyper-connections, sinks,
  position and correction biases.
"""

from __future__ import annotations

import contextlib

import torch

from parity import quant
from parity.ref_patch import patch_method

FP8_SUFFIXES, FP4_SUFFIXES = quant.DSV4_FP8_SUFFIXES, quant.DSV4_FP4_SUFFIXES
weight_format = quant.dsv4_weight_format


def quantized_weights(model) -> dict[str, str]:
    """Every parameter ``quant_sim`` quantizes, with its format."""
    return {n: f for n, _ in model.named_parameters() if (f := weight_format(n)) is not None}


def _qdq_weight(w: torch.Tensor, fmt: str, rounding: str) -> torch.Tensor:
    if fmt == "fp8":
        return quant.qdq_fp8_weight(w, rounding=rounding)
    return quant.qdq_fp4_weight(w, rounding=rounding)


@contextlib.contextmanager
def _swapped_weights(model, rounding: str):
    params = dict(model.named_parameters())
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, fmt in quantized_weights(model).items():
                p = params[name]
                new = _qdq_weight(p.data, fmt, rounding)
                saved.append((p, p.data))
                p.data = new
        yield
    finally:
        for p, original in saved:
            p.data = original


def _qdq_first_arg(rounding: str):
    def wrapper(original, x, *args, **kwargs):
        return original(quant.qdq_fp8_act(x, rounding=rounding), *args, **kwargs)

    return wrapper


def _qdq_result(rounding: str):
    def wrapper(original, *args, **kwargs):
        return quant.qdq_fp8_act(original(*args, **kwargs), rounding=rounding)

    return wrapper


def _activation_patches(model, rounding: str, stack: contextlib.ExitStack) -> None:
    modules = dict(model.named_modules())
    for name in quantized_weights(model):
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        if leaf == "weight":  # a linear (plain or grouped): quantize its input
            stack.enter_context(patch_method(module, "forward", _qdq_first_arg(rounding)))
        elif leaf == "gate_up_proj":
            # Routed experts: the hidden states going in, and the SwiGLU output
            # that feeds down_proj (``_apply_gate`` is what every experts
            # backend calls to produce it).
            stack.enter_context(patch_method(module, "forward", _qdq_first_arg(rounding)))
            stack.enter_context(patch_method(module, "_apply_gate", _qdq_result(rounding)))


@contextlib.contextmanager
def quant_sim(model, weights: bool = True, activations: bool = False, rounding: str = "ceil"):
    """Simulate the engine's quantization on ``model`` for the ``with`` block."""
    if rounding not in quant.ROUNDINGS:
        raise ValueError(f"rounding must be one of {quant.ROUNDINGS}, got {rounding!r}")
    with contextlib.ExitStack() as stack:
        if weights:
            stack.enter_context(_swapped_weights(model, rounding))
        if activations:
            _activation_patches(model, rounding, stack)
        yield model
