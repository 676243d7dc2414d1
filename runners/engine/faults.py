"""The bug zoo: one known porting bug at a time, injected into the engine.

``PARITY_ENGINE_FAULT=<name>`` (``--fault NAME`` in ``runners.side_by_side``
and ``parity demo``) turns on one of the faults below. Each lives at the
exact place in the engine where the real bug would sit, behind
``if faults.active("<name>"):`` and a ``# FAULT <name>:`` comment, so
``grep -rn "FAULT " runners/engine`` lists them all. With no fault set the
engine runs its clean code: the variable is read once, when an ``Engine`` is
built, into a frozen set, and every check is one set lookup.

The set is module-wide: the last ``Engine`` built in a process decides which
fault is on for every engine of that process. The ``tp_*`` faults
(``TENSOR_PARALLEL``) act only in a tensor-parallel launch; at TP=1 they
change nothing. What each fault models and
what parity reports for it: docs/bug-zoo.md.
"""

from __future__ import annotations

import os

from runners.engine.errors import ParityError

ENV = "PARITY_ENGINE_FAULT"

FAULTS: dict[str, str] = {
    "skip_routed_scale": "routed_scaling_factor not applied on score-routed MoE layers (hash layers unaffected)",
    "hash_routed_by_score": "hash MoE layers pick experts by gate score top-k instead of tid2eid[token]",
    "fp8_unscaled_o_a": "the grouped o_a_proj's FP8 weight dequantized without its 128x128 block scales (fp8 only)",
    "act_scale_round_nearest": "FP8 activation scales rounded to the nearest power of two instead of up (fp8 only)",
    "skip_inverse_rope": "the inverse RoPE on the attention output (K=V carried RoPE into the values) skipped",
    "sinkhorn_off_by_one": "one Sinkhorn iteration too many in the hyper-connection mixing",
    "indexer_frontier_off_by_one": "the indexer lets a query select the compressed entry of its own, incomplete block",
    "compressor_state_leak": "a reused slot's compressor state is not reset, so its first CSA window pools the "
                             "previous request's tokens",
    "window_ring_collision": "a prefill chunk longer than the sliding window writes its window ring at flat rows "
                             "that collide with the next slot's",
    "block_table_double_offset": "the compressed-KV reader adds the block-table offset twice for every sequence "
                                 "after the first in a batch",
    "sinkhorn_bf16": "the hyper-connection Sinkhorn normalisation runs in bf16 where the reference uses fp32 "
                     "(a precision bug: bf16 and fp8 only)",
    "chunk_window_stale": "a prompt's second and later prefill chunks read the sliding-window keys of the "
                          "previous chunk one ring row off (only with chunked prefill)",
    # Tensor-parallel bugs: inert at TP=1 (docs/engine.md, Tensor parallelism).
    "tp_missing_all_reduce": "the row-parallel o_b_proj's partial sums are not all-reduced: every rank goes on "
                             "with its own share of the attention output (tensor parallel only)",
    "tp_shared_expert_every_rank": "the replicated shared expert is added to every rank's routed partial sum "
                                   "before the all-reduce, so it counts once per rank (tensor parallel only)",
    "tp_heads_strided": "q_b_proj's heads are dealt to the ranks round-robin while the sinks and o_a_proj take "
                        "contiguous heads (tensor parallel only)",
    "tp_sinks_offset": "the attention sinks' shard forgets the rank offset: every rank loads rank 0's sinks "
                       "(tensor parallel only)",
    "tp_expert_offset": "rank 1 loads its routed experts one expert early (7..14 at tp=2) while routing sends it "
                        "8..15 (tensor parallel only)",
}

# Faults that exist only under tensor parallelism (a launch of several ranks).
TENSOR_PARALLEL: frozenset[str] = frozenset(n for n in FAULTS if n.startswith("tp_"))

# Faults that act only at some precisions (the rest act at every one): the
# FP8 paths exist only at fp8, and a bf16 rounding is no rounding at fp32.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "fp8_unscaled_o_a": ("fp8",),
    "act_scale_round_nearest": ("fp8",),
    "sinkhorn_bf16": ("bf16", "fp8"),
}

_ACTIVE: frozenset[str] = frozenset()


def names() -> list[str]:
    return sorted(FAULTS)


def parse(value: str | None) -> frozenset[str]:
    """The fault named by ``value`` (empty or None: none); unknown names are refused."""
    name = (value or "").strip()
    if not name:
        return frozenset()
    if name not in FAULTS:
        raise ParityError(f"unknown engine fault {name!r} in {ENV}; valid: {', '.join(names())}")
    return frozenset({name})


def load(value: str | None = None) -> frozenset[str]:
    """Read ``PARITY_ENGINE_FAULT`` (or ``value``) into the active set; the
    engine calls this once per ``Engine``."""
    global _ACTIVE
    _ACTIVE = parse(os.environ.get(ENV) if value is None else value)
    return _ACTIVE


def active(name: str) -> bool:
    return name in _ACTIVE


def current() -> str | None:
    return next(iter(_ACTIVE), None)


def reset_slot_leaky(manager, slot: int) -> None:
    """compressor_state_leak's reset: a design where a slot's compressor
    state starts as the reference's "no previous block" (kv 0, gate -inf)
    and the first window reads it instead of masking; the state is set up
    the first time the slot is handed out and, the bug, never again."""
    seen = manager.__dict__.setdefault("_fault_slots_seen", set())
    cache = manager.cache
    for lc in cache.layers:
        lc.win[slot].zero_()
        if slot in seen:
            continue
        for t in (lc.cmp_kv, lc.idx_kv):
            if t is not None:
                t[slot].zero_()
        for t in (lc.cmp_gate, lc.idx_gate):
            if t is not None:
                t[slot].fill_(float("-inf"))
    seen.add(slot)


__all__ = ["ENV", "FAULTS", "PRECISIONS", "TENSOR_PARALLEL", "active", "current", "load", "names", "parse",
           "reset_slot_leaky"]
