"""Op registry: hot ops looked up by name, one implementation per backend.

Every op has a ``torch`` implementation, which is the definition of what the
op computes. ``triton`` and ``aiter`` register only when their import works
on this machine; an unavailable backend is reported by ``describe()`` and
never breaks the engine.

Selection, read when the table is (re)built:
  PARITY_ENGINE_BACKEND=torch|triton|aiter      default for every op
  PARITY_ENGINE_OP_<NAME>=torch|triton|aiter    one op (name upper-cased)
A requested backend that lacks the op, or is unavailable, falls back to
``torch``; ``describe()`` says so for each op.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

OP_NAMES = (
    "rmsnorm",
    "rmsnorm_unweighted",
    "rope",
    "sparse_attention",
    "compressor_pool",
    "indexer_topk",
    "fused_moe",
    "fused_moe_quant",
    "linear",
    "fp8_linear",
    "act_quant",
    "hc_sinkhorn",
)

_IMPLS: dict[str, dict[str, Callable]] = {name: {} for name in OP_NAMES}
_BACKEND_STATUS: dict[str, str] = {}
_loaded = False


def register(name: str, backend: str):
    if name not in _IMPLS:
        raise KeyError(f"unknown engine op {name!r}; known: {', '.join(OP_NAMES)}")

    def deco(fn):
        _IMPLS[name][backend] = fn
        return fn

    return deco


def _load_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("runners.engine.ops.torch_ops")
    importlib.import_module("runners.engine.ops.quant")
    _BACKEND_STATUS["torch"] = "available"
    for backend in ("triton", "aiter"):
        try:
            importlib.import_module(f"runners.engine.ops.{backend}_ops")
            _BACKEND_STATUS[backend] = "available"
        except Exception as exc:  # aiter raises RuntimeError off ROCm; anything else is the same story
            _BACKEND_STATUS[backend] = f"unavailable ({type(exc).__name__}: {exc})"
            for impls in _IMPLS.values():
                impls.pop(backend, None)


@dataclass(frozen=True)
class Choice:
    op: str
    requested: str
    backend: str
    note: str
    loud: bool = False  # worth a warning: the backend is missing, or this op was asked for by name


def _choose(name: str) -> Choice:
    default = os.environ.get("PARITY_ENGINE_BACKEND", "torch").strip().lower() or "torch"
    per_op = os.environ.get(f"PARITY_ENGINE_OP_{name.upper()}", "").strip().lower()
    requested = per_op or default
    impls = _IMPLS[name]
    if requested in impls:
        return Choice(name, requested, requested, "")
    status = _BACKEND_STATUS.get(requested, "unknown backend")
    note = f"{requested} {status if status != 'available' else 'has no ' + name}; using torch"
    # a backend that covers only some ops is normal under PARITY_ENGINE_BACKEND
    return Choice(name, requested, "torch", note, loud=bool(per_op) or status != "available")


class _Table:
    """Attribute access to the selected implementation of each op."""

    def __init__(self):
        self._fns: dict[str, Callable] = {}
        self._choices: dict[str, Choice] = {}

    def build(self) -> None:
        _load_backends()
        fns, choices, notes = {}, {}, []
        for name in OP_NAMES:
            c = _choose(name)
            fns[name] = _IMPLS[name][c.backend]
            choices[name] = c
            if c.loud and c.requested != "torch":
                notes.append(f"{name}: {c.note}")
        self._fns, self._choices = fns, choices
        if notes:
            warnings.warn("engine ops: " + "; ".join(notes), stacklevel=3)

    def __getattr__(self, name: str) -> Callable:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._fns:
            self.build()
        try:
            return self._fns[name]
        except KeyError:
            raise AttributeError(f"unknown engine op {name!r}") from None


ops = _Table()


def reload() -> None:
    """Re-read the PARITY_ENGINE_* selection (tests, or after changing env)."""
    ops.build()


def get(name: str) -> Callable:
    return getattr(ops, name)


def describe() -> list[Choice]:
    if not ops._fns:
        ops.build()
    return [ops._choices[n] for n in OP_NAMES if n in ops._choices]


def backend_status() -> dict[str, str]:
    _load_backends()
    return dict(_BACKEND_STATUS)
