"""Block quantization math shared by the engine, ``parity weights`` and the
reference's quantization simulation. Pure torch: runs on CPU and GPU alike.

Formats (as in DeepSeek-V4's release):

* FP8 e4m3fn weights (finite max 448) with one scale per 128 x 128 block.
* FP4 e2m1 weights (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6) with one scale per
  32 consecutive inputs of a row; two codes per byte, the even input in the
  low nibble.
* Weight scales are UE8M0: a power of two stored as its biased exponent in a
  uint8 (scale = 2 ** (byte - 127)). Byte 255 (NaN in OCP MX) is never made.
* FP8 activations with one power-of-two scale per 1 x 128 block of the last
  dimension, kept as float32 because they live only inside a kernel.

How a scale is chosen: ``amax / qmax`` (amax floored at 1e-4, so an all-zero
block gets a finite scale, as in DeepSeek's kernels) rounded to a power of
two, either up (``"ceil"``: DeepSeek's reference; nothing saturates) or to
nearest, ties to even exponent (``"rne"``: what a float32 -> e8m0 conversion
with round-to-nearest gives; values up to ~1.5x qmax then saturate).

Shapes that are not a multiple of the block are padded with zeros for the
scale computation and cropped back; scale tensors have ``ceil(dim / block)``
entries per dimension.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_DTYPE = torch.float8_e4m3fn
WEIGHT_BLOCK_FP8 = (128, 128)
BLOCK_FP4 = 32
ACT_BLOCK = 128
AMAX_FLOOR = 1e-4
UE8M0_BIAS = 127
ROUNDINGS = ("ceil", "rne")

# e2m1 magnitudes indexed by the 3-bit code (sign is bit 3).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---------------------------------------------------------------- scales


def pow2_scale(amax: torch.Tensor, qmax: float, rounding: str = "ceil") -> torch.Tensor:
    """Power-of-two float32 scales for blocks whose absolute maximum is ``amax``."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    raw = amax.float().clamp(min=AMAX_FLOOR) / qmax
    # Work on the float32 bits: exact, and identical on every device (a
    # log2/ceil in floating point can miss by one at exact powers of two).
    bits = raw.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    if rounding == "ceil":
        up = mantissa != 0
    else:
        half = 0x400000
        up = (mantissa > half) | ((mantissa == half) & (exponent % 2 == 1))
    exponent = (exponent + up.to(exponent.dtype)).clamp(1, 254)
    return (exponent << 23).view(torch.float32)


def ue8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents of power-of-two float32 ``scale``."""
    exponent = (scale.float().view(torch.int32) >> 23) & 0xFF
    return exponent.to(torch.uint8)


def ue8m0_decode(code: torch.Tensor) -> torch.Tensor:
    """float32 scales from uint8 biased exponents (0 -> 2**-127, 255 -> NaN)."""
    exponent = code.to(torch.int32)
    bits = torch.where(exponent == 0, torch.full_like(exponent, 0x400000), exponent << 23)
    bits = torch.where(exponent == 255, torch.full_like(exponent, 0x7FC00000), bits)
    return bits.view(torch.float32)


# ---------------------------------------------------------------- helpers


def _pad_to(x: torch.Tensor, multiples: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing ``len(multiples)`` dims up to the given multiples."""
    pad: list[int] = []
    for dim, m in zip(reversed(range(x.dim() - len(multiples), x.dim())), reversed(multiples)):
        pad += [0, (-x.shape[dim]) % m]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    # torch's cast does not saturate (out of range becomes NaN): clamp first.
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# ---------------------------------------------------------------- FP8 weights


def quantize_fp8_weight(
    w: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK_FP8, rounding: str = "ceil"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: q float8_e4m3fn of w's shape, scale uint8 UE8M0 of shape
    ``[..., ceil(N / bn), ceil(K / bk)]`` for ``w`` of shape ``[..., N, K]``."""
    _check_rounding(rounding)
    bn, bk = block
    *lead, n, k = w.shape
    wp = _pad_to(w.float(), (bn, bk))
    nb, kb = wp.shape[-2] // bn, wp.shape[-1] // bk
    blocks = wp.reshape(*lead, nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = pow2_scale(amax, FP8_MAX, rounding)
    q = _to_fp8(blocks / scale[..., :, None, :, None])
    q = q.reshape(wp.shape)[..., :n, :k]
    return q.contiguous(), ue8m0_encode(scale)


def dequantize_fp8_weight(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK_FP8, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of ``quantize_fp8_weight`` (exact: every product is representable)."""
    bn, bk = block
    n, k = q.shape[-2:]
    s = ue8m0_decode(scale) if scale.dtype == torch.uint8 else scale.float()
    s = s.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return (q.float() * s).to(dtype)


def qdq_fp8_weight(w: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK_FP8, rounding: str = "ceil") -> torch.Tensor:
    """Quantize-dequantize ``w`` through block FP8; same shape and dtype."""
    q, s = quantize_fp8_weight(w, block, rounding)
    return dequantize_fp8_weight(q, s, block, dtype=w.dtype)


# ---------------------------------------------------------------- FP4 codes


def fp4_round(x: torch.Tensor) -> torch.Tensor:
    """Already-scaled values rounded onto the e2m1 grid (float32).

    Round to nearest, ties to even code; magnitudes above 6 saturate. The grid
    has spacing 0.5 below 2, 1 below 4 and 2 up to 6, and in each range the
    even multiples of the spacing are exactly the even codes, so torch.round
    (half to even) on the rescaled value is the e2m1 rounding.
    """
    mag = x.float().abs()
    q = torch.where(mag < 2, torch.round(mag * 2) / 2, torch.where(mag < 4, torch.round(mag), torch.round(mag / 2) * 2))
    return torch.copysign(q.clamp(max=FP4_MAX), x.float())


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (uint8, 0..15) of already-scaled float values, rounded
    as ``fp4_round``; -0.0 becomes code 0 so the packing is canonical."""
    q = fp4_round(x)
    mag = q.abs()
    code = torch.where(mag < 2, mag * 2, torch.where(mag < 4, mag + 2, mag / 2 + 4)).to(torch.uint8)
    return code | ((q < 0).to(torch.uint8) << 3)


def fp4_decode(code: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit e2m1 codes."""
    table = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), device=code.device)
    return table[code.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim (even index in the low nibble)."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_fp4(packed: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Codes from ``pack_fp4``; ``k`` crops the last dim (default 2 * bytes)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return codes if k is None else codes[..., :k]


# ---------------------------------------------------------------- FP4 weights


def quantize_fp4_weight(
    w: torch.Tensor, block: int = BLOCK_FP4, rounding: str = "ceil"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scale)`` for ``w`` of shape ``[..., N, K]``: packed uint8
    ``[..., N, ceil(K / 2)]``, scale uint8 UE8M0 ``[..., N, ceil(K / block)]``."""
    _check_rounding(rounding)
    k = w.shape[-1]
    wp = _pad_to(w.float(), (block,))
    groups = wp.reshape(*wp.shape[:-1], -1, block)
    scale = pow2_scale(groups.abs().amax(dim=-1), FP4_MAX, rounding)
    codes = fp4_encode(groups / scale[..., None]).reshape(wp.shape)[..., :k]
    return pack_fp4(codes), ue8m0_encode(scale)


def dequantize_fp4_weight(
    packed: torch.Tensor, scale: torch.Tensor, k: int | None = None, block: int = BLOCK_FP4, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of ``quantize_fp4_weight``; ``k`` is the original input size
    (default: 2 * packed bytes)."""
    values = fp4_decode(unpack_fp4(packed, k))
    s = ue8m0_decode(scale) if scale.dtype == torch.uint8 else scale.float()
    s = s.repeat_interleave(block, dim=-1)[..., : values.shape[-1]]
    return (values * s).to(dtype)


def qdq_fp4_weight(w: torch.Tensor, block: int = BLOCK_FP4, rounding: str = "ceil") -> torch.Tensor:
    """Quantize-dequantize ``w`` through FP4 e2m1 per ``block`` inputs (same
    values as packing and unpacking, without the bytes)."""
    _check_rounding(rounding)
    k = w.shape[-1]
    wp = _pad_to(w.float(), (block,))
    groups = wp.reshape(*wp.shape[:-1], -1, block)
    scale = pow2_scale(groups.abs().amax(dim=-1), FP4_MAX, rounding)[..., None]
    return (fp4_round(groups / scale) * scale).reshape(wp.shape)[..., :k].to(w.dtype)


# ---------------------------------------------------------------- FP8 activations


def quantize_fp8_act(
    x: torch.Tensor, block: int = ACT_BLOCK, rounding: str = "ceil"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with one power-of-two float32 scale per ``1 x block`` of
    the last dim: q float8_e4m3fn of x's shape, scale ``[..., ceil(K / block)]``."""
    _check_rounding(rounding)
    k = x.shape[-1]
    xp = _pad_to(x.float(), (block,))
    groups = xp.reshape(*xp.shape[:-1], -1, block)
    scale = pow2_scale(groups.abs().amax(dim=-1), FP8_MAX, rounding)
    q = _to_fp8(groups / scale[..., None]).reshape(xp.shape)[..., :k]
    return q.contiguous(), scale


def dequantize_fp8_act(q: torch.Tensor, scale: torch.Tensor, block: int = ACT_BLOCK, dtype=torch.float32) -> torch.Tensor:
    k = q.shape[-1]
    s = scale.float().repeat_interleave(block, dim=-1)[..., :k]
    return (q.float() * s).to(dtype)


def qdq_fp8_act(x: torch.Tensor, block: int = ACT_BLOCK, rounding: str = "ceil") -> torch.Tensor:
    """Quantize-dequantize activations per 1 x ``block``; same shape and dtype."""
    q, s = quantize_fp8_act(x, block, rounding)
    return dequantize_fp8_act(q, s, block, dtype=x.dtype)


# Which DeepSeek-V4 weights ship quantized, by parameter-name suffix (the
# transformers naming): FP8 128x128 for the attention and shared-expert
# projections, FP4 per-32 for the routed experts; compressors, the indexer's
# scorer, the router, embeddings and the head stay in bf16. The reference's
# quant simulation and the engine's loader both read this one table.
DSV4_FP8_SUFFIXES = (
    "self_attn.q_a_proj.weight",
    "self_attn.q_b_proj.weight",
    "self_attn.kv_proj.weight",
    "self_attn.o_a_proj.weight",
    "self_attn.o_b_proj.weight",
    "self_attn.compressor.indexer.q_b_proj.weight",
    "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight",
)
DSV4_FP4_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def dsv4_weight_format(name: str) -> str | None:
    """``"fp8"``, ``"fp4"`` or None for a DeepSeek-V4 parameter name."""
    if name.endswith(DSV4_FP8_SUFFIXES):
        return "fp8"
    if name.endswith(DSV4_FP4_SUFFIXES):
        return "fp4"
    return None
