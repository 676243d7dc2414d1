"""Batch-invariant numerics: each row's result is a function of that row alone.

A torch kernel's rounding can depend on things outside the row: a BLAS picks
its kernel and summation order from the matrix sizes and the thread count, a
vectorised elementwise loop runs its full vector lanes through one
approximation of exp and its leftover tail through another (which elements
are the tail depends on the tensor's length, the vector width of the CPU and
the thread split), a reduction splits across threads when the output is
small. So a sequence could compute differently in a batch than alone, and
differently on an AVX-512 CPU than on an AVX2 one.

Nothing here depends on those choices, by construction:

* only IEEE-754 basic operations (+ - * /, sqrt, comparisons, round, casts,
  bit operations), which are correctly rounded in every code path, are
  applied elementwise;
* exp, log, sin, cos are polynomials in float64 over those operations,
  rounded once to the output dtype;
* sums run as a fixed pairwise tree of elementwise adds;
* matrix products are exact: the right operand is rounded to 27 bits of
  each column's maximum and the left one cut into slices of fewer bits of
  each row's maximum, so that every partial sum of a float64 GEMM is an
  integer times one power of two, below 2**53: exact in any order, on any
  kernel, blocked or threaded any way; the slices' products are then added
  in a fixed order (more accurate than a float32 GEMM: below 2**-27 of the
  largest weight of a column, below 2**-32 of the largest input of a row);
* top-k stays torch.topk: a selection per row in scalar code (no vector
  lanes, no reduction across rows or threads), so its choice among equal
  values is already a function of the row; it is also the choice the
  reference's torch.topk makes, which a stable sort would not be.

The results are therefore also identical across CPUs, ATen capabilities and
thread counts. They are not bitwise those of torch's own kernels (which are
within an ulp or so of these, and of each other). Cost: docs/benchmarks.md.

On by default for CPU tensors; ``PARITY_ENGINE_BATCH_INVARIANT=1`` forces it
on every device, ``0`` off (plain torch ops).
"""

from __future__ import annotations

import math
import os
import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_SETTING = os.environ.get("PARITY_ENGINE_BATCH_INVARIANT", "auto").strip().lower()
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
if _SETTING not in _ON + _OFF + ("auto",):
    raise ValueError(f"PARITY_ENGINE_BATCH_INVARIANT must be auto, 1 or 0, got {_SETTING!r}")


def enabled(x: torch.Tensor) -> bool:
    if _SETTING in _ON:
        return True
    if _SETTING in _OFF:
        return False
    return x.device.type == "cpu"


# ---------------------------------------------------------------- float64 elementwise math


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as float64 from integer exponents in [-1022, 1023], built from its bits."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


_LN2_HI = 6.93147180369123816490e-01  # 32 significant bits: k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP_TERMS = [1.0 / math.factorial(i) for i in range(14)]  # |r| <= ln2/2: remainder < 1e-17


def _horner(x: torch.Tensor, terms: list[float]) -> torch.Tensor:
    """sum_i terms[i] * x**i, highest power first."""
    p = torch.full_like(x, terms[-1])
    for c in reversed(terms[:-1]):
        p = p * x + c
    return p


def _exp64(x: torch.Tensor) -> torch.Tensor:
    """exp of a float64 tensor: range reduction x = k ln2 + r, Taylor in r, times 2**k."""
    k = torch.round(x.clamp(-1080.0, 1030.0) * _INV_LN2)
    k = torch.where(torch.isnan(k), torch.zeros_like(k), k)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = _horner(r, _EXP_TERMS)
    half = torch.div(k, 2, rounding_mode="floor")  # two factors cover subnormal and near-overflow results
    y = p * _pow2(half.clamp(-1022, 1023)) * _pow2((k - half).clamp(-1022, 1023))
    y = torch.where(x > 709.8, torch.full_like(y, math.inf), y)
    return torch.where(x < -745.2, torch.zeros_like(y), y)


_SQRT_HALF = math.sqrt(0.5)
_ATANH_TERMS = [1.0 / (2 * n + 1) for n in range(13)]  # atanh(s) / s in s**2, |s| <= 0.1716


def _log64(y: torch.Tensor) -> torch.Tensor:
    """Natural log of a positive float64 tensor: y = f 2**e, log f = 2 atanh((f-1)/(f+1))."""
    f, e = torch.frexp(y)  # f in [0.5, 1)
    small = f < _SQRT_HALF
    f = torch.where(small, f * 2.0, f)
    e = (e - small.to(e.dtype)).to(torch.float64)
    s = (f - 1.0) / (f + 1.0)  # |s| <= 0.1716
    p = _horner(s * s, _ATANH_TERMS)
    out = e * _LN2_HI + (2.0 * s * p + e * _LN2_LO)
    out = torch.where(y == 0, torch.full_like(out, -math.inf), out)
    out = torch.where(y < 0, torch.full_like(out, math.nan), out)
    return torch.where(torch.isinf(y) & (y > 0), y, out)


# pi/2 in three pieces of 33, 33 and 53 bits (fdlibm): k * piece is exact for |k| < 2**20
_PIO2 = (1.57079632673412561417e00, 6.07710050630396597660e-11, 2.02226624871116645580e-21)
_TWO_OVER_PI = 6.36619772367581382433e-01
_SIN_TERMS = [(-1) ** i / math.factorial(2 * i + 1) for i in range(9)]  # |r| <= pi/4
_COS_TERMS = [(-1) ** i / math.factorial(2 * i) for i in range(10)]


def _sincos64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of float64 angles up to about 1e6 in magnitude."""
    k = torch.round(x * _TWO_OVER_PI)
    k = torch.where(torch.isfinite(k), k, torch.zeros_like(k))
    r = x - k * _PIO2[0] - k * _PIO2[1] - k * _PIO2[2]
    r2 = r * r
    s = r * _horner(r2, _SIN_TERMS)
    c = _horner(r2, _COS_TERMS)
    q = torch.remainder(k.to(torch.int64), 4)
    sin = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    cos = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    bad = ~torch.isfinite(x)
    nan = torch.full_like(sin, math.nan)
    return torch.where(bad, nan, sin), torch.where(bad, nan, cos)


# ---------------------------------------------------------------- elementwise ops


def exp(x: torch.Tensor) -> torch.Tensor:
    if not enabled(x):
        return torch.exp(x)
    return _exp64(x.double()).to(x.dtype)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    if not enabled(x):
        return torch.sigmoid(x)
    return (1.0 / (1.0 + _exp64(-x.double()))).to(x.dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    if not enabled(x):
        return F.silu(x)
    x64 = x.double()
    return (x64 / (1.0 + _exp64(-x64))).to(x.dtype)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), and x itself above 20 (torch's default threshold)."""
    if not enabled(x):
        return F.softplus(x)
    x64 = x.double()
    t = _exp64(x64.clamp(max=20.0))
    u = 1.0 + t
    # log1p(t) = log(u) * t / (u - 1): exact where u rounds to 1 or t is tiny
    lp = torch.where(u == 1.0, t, _log64(u) * (t / (u - 1.0)))
    return torch.where(x64 > 20.0, x64, lp).to(x.dtype)


def rsqrt(x: torch.Tensor) -> torch.Tensor:
    # 1/sqrt: two correctly rounded operations, in every code path
    return 1.0 / torch.sqrt(x) if enabled(x) else torch.rsqrt(x)


def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not enabled(angles):
        return angles.cos(), angles.sin()
    s, c = _sincos64(angles.double())
    return c.to(angles.dtype), s.to(angles.dtype)


# ---------------------------------------------------------------- reductions


def _acc_dtype(dt: torch.dtype) -> torch.dtype:
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def sum(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Sum over `dim` in a fixed pairwise tree, accumulated in fp32 (fp64 for
    fp64) and rounded once to x's dtype, as torch.sum does."""
    if not enabled(x):
        return x.sum(dim=dim, keepdim=keepdim)
    acc = x.movedim(dim, 0).to(_acc_dtype(x.dtype))
    if acc.shape[0] == 0:
        out = acc.new_zeros(acc.shape[1:])
    else:
        # Neighbours first, an odd last one carried up: element i meets the same
        # partners whatever follows it, so trailing zeros (padding) change nothing.
        while acc.shape[0] > 1:
            n = acc.shape[0]
            pairs = acc[0:n - 1:2] + acc[1:n:2]
            acc = torch.cat([pairs, acc[n - 1:]]) if n % 2 else pairs
        out = acc[0]
    out = out.to(x.dtype)
    return out.unsqueeze(dim if dim >= 0 else dim + x.dim()) if keepdim else out


def mean(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    if not enabled(x):
        return x.mean(dim=dim, keepdim=keepdim)
    n = x.shape[dim]
    return (sum(x.to(_acc_dtype(x.dtype)), dim, keepdim) / n).to(x.dtype)


def softmax(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not enabled(x):
        return torch.softmax(x, dim=dim, dtype=dtype)
    out_dtype = dtype or x.dtype
    h = x.to(_acc_dtype(out_dtype))
    e = exp(h - h.amax(dim=dim, keepdim=True))  # max is exact whatever the order
    return (e / sum(e, dim, keepdim=True)).to(out_dtype)


# ---------------------------------------------------------------- exact matrix products

# The right operand (a weight) is rounded once to _B_BITS significant bits
# relative to the largest entry of its column: entries within 2**-3 of that
# maximum keep every fp32 bit, smaller ones lose bits below 2**-27 of it. The
# left operand is cut into slices of m bits each, so that m + _B_BITS +
# log2(K) <= 53 and every float64 partial sum of a slice's product is an
# integer multiple of one power of two below 2**53: exact, in any order.
# Slices are stacked as extra rows of one GEMM and added back in a fixed order.
_B_BITS = 27
_A_BITS = 32  # at least this many bits of each row of the left operand are kept


def _slice_plan(k: int) -> tuple[int, int]:
    """(bits per left slice, number of left slices) for inner dimension k."""
    m = 53 - _B_BITS - math.ceil(math.log2(max(k, 2)))
    if m < 8:
        raise ValueError(f"inner dimension {k} is too long for an exact float64 product")
    return m, -(-_A_BITS // m)


def _exponent(x: torch.Tensor, dim: int) -> torch.Tensor:
    """e with max |x| along dim < 2**e (0 for all-zero or non-finite lines)."""
    amax = x.abs().amax(dim=dim, keepdim=True)
    _, e = torch.frexp(torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax)))
    return e.clamp(-960, 960)


def _round_to(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x rounded to a multiple of 2**e, for |x| < 2**(e + 50): adding 1.5 * 2**(e + 52)
    leaves exactly those bits, subtracting it again is exact."""
    c = 1.5 * _pow2(e + 52)
    return (x + c) - c


def _left_slices(a: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """a (float64 [..., M, K]) as its slices stacked along rows: [..., s*M, K]."""
    m, n = _slice_plan(k)
    e = _exponent(a, -1)
    parts, rest = [], a
    for i in range(1, n + 1):
        part = _round_to(rest, e - i * m)
        parts.append(part)
        rest = rest - part  # exact: |rest - part| <= half the slice's unit
    return torch.cat(parts, dim=-2), n


def _right_slice(b: torch.Tensor) -> torch.Tensor:
    """b (float64 [..., K, N]) rounded to _B_BITS bits of each column's maximum."""
    return _round_to(b, _exponent(b, -2) - _B_BITS)


def _product(a: torch.Tensor, b1: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    rows = a.shape[-2]
    stacked, n = _left_slices(a.double(), a.shape[-1])
    y = torch.matmul(stacked, b1)  # [..., n*M, N], every entry exact
    out = y[..., :rows, :]
    for i in range(1, n):  # the slices' products, largest first
        out = out + y[..., i * rows:(i + 1) * rows, :]
    return out.to(out_dtype)


def matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a @ b (a [..., M, K], b [..., K, N]) with every dot product exact in
    float64 up to the slicing above, rounded once to `out_dtype` (default:
    the promoted dtype of a and b). b's rounding depends on the largest entry
    of each column: entries that must not influence a result (masked keys)
    must be zero, not merely multiplied by zero."""
    out_dtype = out_dtype or torch.promote_types(a.dtype, b.dtype)
    if not enabled(a):
        return torch.matmul(a.to(out_dtype), b.to(out_dtype))
    return _product(a, _right_slice(b.double()), out_dtype)


# Weights are rounded once: cached on the tensor object that owns the weight
# (a parameter, or the quantized codes a weight is decoded from), per
# decoding, and dropped with it or when it is modified in place.
_SLICES = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int:
    return 0 if t.is_inference() else t._version  # inference tensors keep no version counter


def _weight_t(owner: torch.Tensor, tag, decode) -> torch.Tensor:
    per_owner = _SLICES.setdefault(owner, {})
    hit = per_owner.get(tag)
    if hit is not None and hit[0] == _version(owner):
        return hit[1]
    w_t = _right_slice(decode().double().transpose(-1, -2))  # [..., K, N]
    per_owner[tag] = (_version(owner), w_t)
    return w_t


def linear(x: torch.Tensor, w: torch.Tensor, *, index: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """x @ W.T in x's dtype, W = w cast to x's dtype; w [N, K], or w[index]
    of a stacked [E, N, K]; ``rows``: only those rows of W (output features)."""
    return linear_decoded(x, w, lambda: w.to(x.dtype), index=index, rows=rows, tag=x.dtype)


def linear_decoded(x: torch.Tensor, owner: torch.Tensor, decode, *, index: int | None = None,
                   rows: slice | None = None, tag=None) -> torch.Tensor:
    """x @ W.T for the weight W = decode() stored as ``owner`` (quantized
    codes, say): decoded and rounded once per (owner, tag), not per call."""
    if not enabled(x):
        w = decode()
        w = w if index is None else w[index]
        return F.linear(x, (w if rows is None else w[rows]).to(x.dtype))
    w_t = _weight_t(owner, tag, decode)
    w_t = w_t if index is None else w_t[index]
    w_t = w_t if rows is None else w_t[:, rows]
    lead, k = x.shape[:-1], x.shape[-1]
    return _product(x.reshape(-1, k), w_t, x.dtype).view(*lead, w_t.shape[-1])
