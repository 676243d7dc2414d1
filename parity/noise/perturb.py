"""Rounding disagreements on module outputs: each element of every floating
output of every leaf module moves to an adjacent representable value of its
dtype (one ulp up or down, at random) with probability ``rate``.

Two correct implementations of one op agree on most elements of its output
and differ by one rounding on some: another summation order or exp
approximation moves the exact value across a rounding boundary now and then.
Perturbing every op that way, independently, makes runs that are as correct
as the reference and as far from it as such disagreements can carry through
this model: through its amplification, its quantization steps and its
discrete decisions. Embedding lookups are exact in any implementation and
are left alone, and so are integer outputs. The rate is the noise model's
one parameter; docs/calibration.md says how it was chosen.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from parity.errors import ParityError

DEFAULT_RATE = 0.01
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _perturb(x, rate: float, gens: dict):
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point() or x.numel() == 0 or x.element_size() not in _INT_OF:
            return x
        g = gens.get(x.device)
        if g is None:
            g = gens[x.device] = torch.Generator(device=x.device).manual_seed(gens["seed"])
        r = torch.rand(x.shape, generator=g, device=x.device)
        step = torch.where(r < rate / 2, -1, torch.where(r < rate, 1, 0))
        step = torch.where(torch.isfinite(x) & (x != 0), step, 0)
        bits = x.contiguous().view(_INT_OF[x.element_size()])
        # +-1 on the bit pattern of a finite non-zero value: the next value away from or toward zero
        return (bits + step.to(bits.dtype)).view(x.dtype).view(x.shape)
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_perturb(v, rate, gens) for v in x)
    if isinstance(x, list):
        return [_perturb(v, rate, gens) for v in x]
    return x  # dicts, dataclasses, named tuples: left as they are


@contextlib.contextmanager
def perturbed(model: nn.Module, seed: int, *, rate: float = DEFAULT_RATE, skip: tuple[type, ...] = (nn.Embedding,)):
    """Within the block, ``model``'s leaf modules return perturbed outputs
    (one seeded generator per device, so a member is reproducible)."""
    if not 0.0 <= rate <= 1.0:
        raise ParityError(f"a rounding disagreement rate is a probability, got {rate}")
    gens: dict = {"seed": int(seed)}

    def hook(module, args, output):
        return _perturb(output, rate, gens)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if not any(True for _ in m.children()) and not isinstance(m, skip)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
