"""Summary statistics of one tensor, computed where the tensor lives.

Reductions run in float64 over bounded chunks so that a summary never costs
a float64 copy of a large activation.
"""

from __future__ import annotations

import math
import threading

import torch

STAT_KEYS = ("absmax", "mean", "std", "l2", "nan", "inf")
_CHUNK = 1 << 22
_CPU_BLOCK = 1 << 18  # 2 MB of float64: the block stays in cache between passes
_NATIVE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stats_vector(t: torch.Tensor) -> torch.Tensor:
    """[absmax, sum, sumsq, nan, inf, n_finite] as a float64 tensor on t's
    device. Kept as a tensor so the caller can defer the host sync."""
    if t.is_cuda:
        # Imported here: triton's import is slow and only CUDA tensors need it.
        from parity.store.stats_cuda import stats_vector_cuda
        v = stats_vector_cuda(t)
        if v is not None:
            return v
    elif t.device.type == "cpu":
        v = stats_vector_cpu(t)
        if v is not None:
            return v
    return stats_vector_torch(t)


_local = threading.local()


def stats_vector_cpu(t: torch.Tensor) -> torch.Tensor | None:
    """The all-finite case on the CPU, about 25x faster than the general
    path: each block is converted once into a small float64 buffer that stays
    in cache, where sum and dot product run vectorised. (torch's CPU
    reductions with a float64 accumulator over a float32 input, and
    isnan/isinf, each cost more than this whole pass.) Returns None when a
    NaN or Inf turns up; the general path then counts them."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        return None
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = torch.empty(_CPU_BLOCK, dtype=torch.float64)
    absmax = s = ss = 0.0
    for start in range(0, flat.numel(), _CPU_BLOCK):
        part = flat[start:start + _CPU_BLOCK]
        d = buf[:part.numel()]
        d.copy_(part)
        lo, hi = torch.aminmax(d)
        absmax = max(absmax, -lo.item(), hi.item())
        s += d.sum().item()
        ss += torch.dot(d, d).item()
    # A NaN or Inf anywhere makes the sum of squares NaN or Inf (finite
    # float32 squares cannot overflow float64), so one test covers all.
    if not math.isfinite(ss):
        return None
    n = float(flat.numel())
    return torch.tensor([absmax, s, ss, 0.0, 0.0, n], dtype=torch.float64)


def stats_vector_torch(t: torch.Tensor) -> torch.Tensor:
    """``stats_vector`` in plain torch ops, on any device.

    Each chunk costs a handful of passes in the tensor's own dtype; only the
    sums accumulate in float64, so no float64 copy of the data is made."""
    flat = t.detach().reshape(-1)
    if flat.dtype not in _NATIVE:
        # ints, bools and fp8 have no native reductions; they are small or rare.
        flat = flat.to(torch.float64)
    parts = []
    # GPU memory is plentiful and launches are not: one chunk per 64M elements.
    chunk = _CHUNK if flat.device.type == "cpu" else _CHUNK << 4
    for start in range(0, flat.numel(), chunk):
        c = flat[start:start + chunk]
        nan = torch.isnan(c).sum()
        inf = torch.isinf(c).sum()
        c = torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = torch.aminmax(c)
        parts.append(torch.stack([
            torch.maximum(lo.abs(), hi.abs()).to(torch.float64),
            c.sum(dtype=torch.float64),
            torch.linalg.vector_norm(c, dtype=torch.float64).square(),
            nan.to(torch.float64),
            inf.to(torch.float64),
            (c.numel() - nan - inf).to(torch.float64)]))
    if not parts:
        return torch.zeros(6, dtype=torch.float64, device=t.device)
    if len(parts) == 1:
        return parts[0]
    p = torch.stack(parts)
    return torch.cat([p[:, 0].max().reshape(1), p[:, 1:].sum(0)])


def stats_from_vector(v) -> dict:
    absmax, s, ss, nan, inf, n = (float(x) for x in (v.tolist() if hasattr(v, "tolist") else v))
    mean = s / n if n else 0.0
    var = max(ss / n - mean * mean, 0.0) if n else 0.0
    return {"absmax": absmax, "mean": mean, "std": math.sqrt(var), "l2": math.sqrt(ss),
            "nan": int(nan), "inf": int(inf)}


def tensor_stats(t: torch.Tensor) -> dict:
    return stats_from_vector(stats_vector(t))
