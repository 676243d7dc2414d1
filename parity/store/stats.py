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
    parts = []
    for start in range(0, flat.numel(), _CHUNK):
        c = flat[start:start + _CHUNK].to(torch.float64)
        finite = torch.isfinite(c)
        n_finite = finite.sum()
        # On the CPU the common all-finite chunk skips the masking pass; on a
        # GPU the check would cost a host sync, so masking is unconditional.
        if flat.is_floating_point() and (c.device.type != "cpu" or int(n_finite) != c.numel()):
            c = torch.where(finite, c, c.new_zeros(()))
        nan = torch.isnan(flat[start:start + _CHUNK]).sum() if flat.is_floating_point() else n_finite * 0
        parts.append(torch.stack([c.abs().max(), c.sum(), torch.dot(c, c), nan.to(torch.float64),
                                  (c.numel() - n_finite - nan).to(torch.float64), n_finite.to(torch.float64)]))
    if not parts:
        return torch.zeros(6, dtype=torch.float64, device=t.device)
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
