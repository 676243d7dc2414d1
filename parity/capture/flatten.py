"""Turn module inputs and outputs of any shape into (stage, tensor) pairs."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch


def flatten(prefix: str, value, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in ``value`` with dotted stage names: ``output``, ``output.0``,
    ``output.hidden_states``. Non-tensor leaves are skipped."""
    if depth > 6:
        return
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):  # also transformers' ModelOutput
        for k, v in value.items():
            yield from flatten(f"{prefix}.{k}", v, depth + 1)
    elif isinstance(value, (tuple, list)):
        if hasattr(value, "_fields"):  # namedtuple: names are more useful than positions
            for k in value._fields:
                yield from flatten(f"{prefix}.{k}", getattr(value, k), depth + 1)
        else:
            for i, v in enumerate(value):
                yield from flatten(f"{prefix}.{i}", v, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from flatten(f"{prefix}.{f.name}", getattr(value, f.name), depth + 1)
