"""Summary statistics of one tensor, computed where the tensor lives.

Reductions run in float64 over bounded chunks so that a summary never costs
a float64 copy of a large activation.
"""

from __future__ import annotations

import math

import torch

STAT_KEYS = ("absmax", "mean", "std", "l2", "nan", "inf")
_CHUNK = 1 << 22


def stats_vector(t: torch.Tensor) -> torch.Tensor:
    """[absmax, sum, sumsq, nan, inf, n_finite] as a float64 tensor on t's
    device. Kept as a tensor so the caller can defer the host sync."""
    flat = t.detach().reshape(-1)
    out = torch.zeros(6, dtype=torch.float64, device=t.device)
    if flat.numel() == 0:
        return out
    if not (flat.is_floating_point() or flat.is_complex()):
        flat = flat.to(torch.float64) if flat.dtype != torch.bool else flat.to(torch.float64)
    for start in range(0, flat.numel(), _CHUNK):
        c = flat[start:start + _CHUNK].to(torch.float64)
        nan = torch.isnan(c)
        inf = torch.isinf(c)
        finite = ~(nan | inf)
        c = torch.where(finite, c, torch.zeros((), dtype=c.dtype, device=c.device))
        out[0] = torch.maximum(out[0], c.abs().max())
        out[1] += c.sum()
        out[2] += (c * c).sum()
        out[3] += nan.sum()
        out[4] += inf.sum()
        out[5] += finite.sum()
    return out


def stats_from_vector(v) -> dict:
    absmax, s, ss, nan, inf, n = (float(x) for x in (v.tolist() if hasattr(v, "tolist") else v))
    mean = s / n if n else 0.0
    var = max(ss / n - mean * mean, 0.0) if n else 0.0
    return {"absmax": absmax, "mean": mean, "std": math.sqrt(var), "l2": math.sqrt(ss),
            "nan": int(nan), "inf": int(inf)}


def tensor_stats(t: torch.Tensor) -> dict:
    return stats_from_vector(stats_vector(t))
