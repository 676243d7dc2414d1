"""One-pass summary statistics of a CUDA tensor (triton).

The torch path of ``stats_vector`` costs about ten kernels and six reads of
the tensor; in a hook that runs on every layer of every forward that is the
bulk of `stats` mode's overhead. This kernel reads the tensor once: each
program keeps fp64 running sums of a strided slice, then one small program
folds the partials, so a summary is two launches whatever the tensor size.

``stats_vector_cuda`` returns None when triton is missing or the dtype is one
it does not read; the caller then takes the torch path.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 2048
_MAX_PROGRAMS = 1024
# Below this many elements one program reads the whole tensor: a single
# launch, and at these sizes the host's launch cost, not bandwidth, is the bill.
_ONE_PROGRAM = 1 << 17

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no triton, or a broken one: the torch path serves
    triton = None

_broken = False


if triton is not None:
    @triton.jit
    def _partials(x_ptr, part_ptr, n, iters, BLOCK: tl.constexpr, FINAL: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float64)
        ss = tl.zeros([BLOCK], dtype=tl.float64)
        nan = tl.zeros([BLOCK], dtype=tl.int32)
        inf = tl.zeros([BLOCK], dtype=tl.int32)
        lanes = tl.arange(0, BLOCK)
        # Programs stride over the tensor so that neighbours read neighbouring
        # blocks at the same time (coalesced across the grid).
        for i in range(iters):
            offs = (i * nprog + pid).to(tl.int64) * BLOCK + lanes
            x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            is_nan = x != x
            is_inf = tl.abs(x) == float("inf")
            xf = tl.where(is_nan | is_inf, 0.0, x)
            amax = tl.maximum(amax, tl.abs(xf))
            x64 = xf.to(tl.float64)
            s += x64
            ss += x64 * x64
            nan += is_nan.to(tl.int32)
            inf += is_inf.to(tl.int32)
        base = part_ptr + pid * 5
        nan_t = tl.sum(nan, axis=0).to(tl.float64)
        inf_t = tl.sum(inf, axis=0).to(tl.float64)
        tl.store(base + 0, tl.max(amax, axis=0).to(tl.float64))
        tl.store(base + 1, tl.sum(s, axis=0))
        tl.store(base + 2, tl.sum(ss, axis=0))
        tl.store(base + 3, nan_t)
        tl.store(base + 4, inf_t)
        if FINAL:  # a single program: its partials are the answer
            tl.store(base + 5, n.to(tl.float64) - nan_t - inf_t)

    @triton.jit
    def _fold(part_ptr, out_ptr, nprog, n, P: tl.constexpr):
        rows = tl.arange(0, P)
        mask = rows < nprog
        amax = tl.max(tl.load(part_ptr + rows * 5 + 0, mask=mask, other=0.0), axis=0)
        s = tl.sum(tl.load(part_ptr + rows * 5 + 1, mask=mask, other=0.0), axis=0)
        ss = tl.sum(tl.load(part_ptr + rows * 5 + 2, mask=mask, other=0.0), axis=0)
        nan = tl.sum(tl.load(part_ptr + rows * 5 + 3, mask=mask, other=0.0), axis=0)
        inf = tl.sum(tl.load(part_ptr + rows * 5 + 4, mask=mask, other=0.0), axis=0)
        tl.store(out_ptr + 0, amax)
        tl.store(out_ptr + 1, s)
        tl.store(out_ptr + 2, ss)
        tl.store(out_ptr + 3, nan)
        tl.store(out_ptr + 4, inf)
        tl.store(out_ptr + 5, n.to(tl.float64) - nan - inf)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def stats_vector_cuda(t: torch.Tensor) -> torch.Tensor | None:
    """[absmax, sum, sumsq, nan, inf, n_finite] as float64 on t's device, or
    None when this path cannot serve ``t``."""
    global _broken
    if triton is None or _broken or not t.is_cuda or t.dtype not in _DTYPES or t.numel() == 0:
        return None
    flat = t.detach().reshape(-1)
    n = flat.numel()
    blocks = triton.cdiv(n, _BLOCK)
    nprog = 1 if n <= _ONE_PROGRAM else min(blocks, _MAX_PROGRAMS)
    iters = triton.cdiv(blocks, nprog)
    try:
        if t.device.index == torch.cuda.current_device():
            return _launch(flat, n, nprog, iters)
        with torch.cuda.device(t.device):
            return _launch(flat, n, nprog, iters)
    except Exception:  # noqa: BLE001 - a triton that cannot compile here: torch serves from now on
        _broken = True
        return None


def _launch(flat, n, nprog, iters):
    if nprog == 1:
        out = torch.empty(6, dtype=torch.float64, device=flat.device)
        _partials[(1,)](flat, out, n, iters, BLOCK=_BLOCK, FINAL=True, num_warps=8)
        return out
    part = torch.empty(nprog * 5, dtype=torch.float64, device=flat.device)
    out = torch.empty(6, dtype=torch.float64, device=flat.device)
    _partials[(nprog,)](flat, part, n, iters, BLOCK=_BLOCK, FINAL=False, num_warps=8)
    _fold[(1,)](part, out, nprog, n, P=triton.next_power_of_2(nprog), num_warps=4)
    return out
