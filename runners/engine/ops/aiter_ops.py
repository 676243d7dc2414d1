"""AMD aiter kernels (ROCm only).

``import aiter`` raises RuntimeError off ROCm; the registry catches that and
reports the backend unavailable. Only ops whose aiter entry point exists
in the installed version are registered.
"""

from __future__ import annotations

import aiter  # noqa: F401  (raises off ROCm)

from runners.engine.ops import register

if hasattr(aiter, "rms_norm"):

    @register("rmsnorm", "aiter")
    def rmsnorm(x, weight, eps):
        # aiter's kernel rounds once at the end; the reference rounds the
        # normalised row before the weight: equal in fp32, not bitwise in bf16
        shape = x.shape
        return aiter.rms_norm(x.reshape(-1, shape[-1]).contiguous(), weight.to(x.dtype), eps).view(shape)
