"""The tensor-parallel pieces of the model as plain math, without a process
group: each rank's module built with its own ``TP(rank, size)`` and the
collective done by hand."""

from __future__ import annotations

import torch

from runners.engine import model as M
from runners.engine.parallel import TP, take


class _Cfg:
    n_routed_experts, moe_intermediate_size, hidden_size, swiglu_limit = 8, 16, 32, 10.0


def _experts(tp, gate_up, down):
    e = M.Experts(_Cfg, tp)
    for attr, full in (("gate_up_proj", gate_up), ("down_proj", down)):
        spec = getattr(e, "tp_shards", {}).get(attr)
        setattr(e, attr, torch.nn.Parameter(full if spec is None else take(full, *spec), requires_grad=False))
    return e


def test_expert_parallel_partial_sums_add_up_bitwise_for_top2():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(8, 32, 32, generator=g) * 0.2, torch.randn(8, 32, 16, generator=g) * 0.2
    x = torch.randn(40, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])  # top-2, both ranks hit
    w = torch.rand(40, 2, generator=g)
    whole = _experts(TP(), gate_up, down)(x, ids, w)
    parts = [_experts(TP(r, 2), gate_up, down)(x, ids, w) for r in range(2)]
    assert not torch.equal(parts[0], whole)  # each rank holds only its share
    assert torch.equal(parts[0] + parts[1], whole)  # what the all-reduce of two ranks computes
    four = [_experts(TP(r, 4), gate_up, down)(x, ids, w) for r in range(4)]
    assert torch.equal((four[0] + four[1]) + (four[2] + four[3]), whole)
