"""Tensor parallelism: which rank holds which shard, the collectives, and
how each split tensor says so.

One process per rank (``torchrun --nproc-per-node N``), every rank running
the same schedule on the same requests (SPMD): each holds its shard of the
split weights and computes its shard of the split activations; the
collectives below join them where the math needs the whole.

A module whose tensors are split declares it twice, from the one place it
is built: ``tp_shards`` tells the loader which slice of a checkpoint tensor
this rank keeps, ``parity_layout`` tells capture how a record of it lies
across ranks (``shard_dim``: split along that dim; ``shard_reduce: "sum"``:
a partial sum awaiting its all-reduce; neither: replicated), so a compare
re-assembles the ranks without being told. Nothing is declared at TP=1:
its records and its code path are those of a single-process engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runners.engine.errors import ParityError


@dataclass(frozen=True)
class TP:
    rank: int = 0
    size: int = 1

    def part(self, n: int, what: str) -> slice:
        """This rank's contiguous share of ``n`` items (heads, groups, experts, vocab rows)."""
        if n % self.size:
            raise ParityError(f"{what} ({n}) cannot be split evenly over {self.size} ranks")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


SINGLE = TP()


def init(device: torch.device, size: int | None = None) -> TP:
    """This process's place in the TP group. ``size`` None: every process of
    the launch (torchrun's WORLD_SIZE; 1 without a launcher). The default
    process group is created here when the launcher has not (gloo on the
    CPU, NCCL on CUDA)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    size = world if size is None else size
    if size == 1:
        return SINGLE
    if size != world:
        raise ParityError(f"tensor parallelism over {size} ranks needs a launch of {size} processes, got {world} "
                          f"(torchrun --nproc-per-node {size})")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return TP(dist.get_rank(), size)


def all_reduce(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """Sum of every rank's ``x`` (partial sums of a row-parallel product)."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, tp: TP, dim: int) -> torch.Tensor:
    """Every rank's shard of ``x``, concatenated along ``dim`` in rank order."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


# ---------------------------------------------------------------- declarations


def shard(module: torch.nn.Module, attr: str, dim: int, index) -> None:
    """``module.<attr>`` holds ``index`` (a slice or index tensor) of the
    checkpoint tensor's ``dim``; its weight record is split along ``dim``."""
    module.__dict__.setdefault("tp_shards", {})[attr] = (dim, index)
    declare(module, attr, shard_dim=dim)


def declare(module: torch.nn.Module, stage: str, **layout) -> None:
    """How records of ``module`` at ``stage`` (``output``, ``output.0``, a
    parameter name) lie across ranks: ``shard_dim=d`` or ``shard_reduce="sum"``."""
    module.__dict__.setdefault("parity_layout", {})[stage] = layout


def take(t: torch.Tensor, dim: int, index) -> torch.Tensor:
    """The rows ``index`` of ``t`` along ``dim``, as a tensor of its own."""
    if isinstance(index, slice):
        return t.narrow(dim, index.start, index.stop - index.start).contiguous()
    return t.index_select(dim, index).contiguous()


__all__ = ["TP", "SINGLE", "init", "all_reduce", "all_gather", "shard", "declare", "take"]
