"""Chunked prefill: an engine that computes each prompt in chunks of 10
tokens (as serving engines do) against the reference's one-shot prefill.
Records meet by sequence and absolute position: chunks are stitched back, a
sequence decoding while another still prefills is labelled by its position."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import compare_dumps, layer_bisect, slot_invariance

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-gsm8k"


def _prompts():
    from runners.demo import BUILTIN_QUESTIONS

    return [f"Question: {q['question']}\nAnswer:" for q in BUILTIN_QUESTIONS[:2]]


def _side(tmp_path, name, chunk, fault=None, decode_steps=2):
    from runners.side_by_side import run_side_by_side

    return run_side_by_side(CKPT, _prompts(), tmp_path / name, decode_steps=decode_steps, prefill_chunk=chunk,
                            fault=fault)


def test_the_clean_chunked_engine_agrees(tmp_path, one_torch_thread):
    from runners.side_by_side import SLOT_FILTER

    side = _side(tmp_path, "clean", 10)
    res = compare_dumps(side.ref, side.target)
    assert not res.failed and not len(res.only_ref), res.summary()
    assert any("stitched back by position" in n for n in res.notes)
    # the decode steps met too, though the shorter prompt decoded while the longer still prefilled
    assert {("decode", 1), ("decode", 2)} <= set(zip(res.table["phase"], res.table["step"]))
    slots = slot_invariance(side.batched, [str(p) for p in side.solos], filter=SLOT_FILTER)
    assert slots.invariant, slots.message


def test_a_chunk_boundary_fault_is_placed(tmp_path, one_torch_thread):
    b = layer_bisect(*(lambda s: (s.ref, s.target))(_side(tmp_path, "fault", 10, "chunk_window_stale", 1)))
    assert b.exit_code == 1 and b.layer == 0 and b.stage.startswith("self_attn"), b.message
    fails = b.compare.table[b.compare.table["verdict"] == "fail"]
    assert fails.iloc[0]["phase"] == "prefill"   # where the second chunk reads the first's keys
    unchunked = layer_bisect(*(lambda s: (s.ref, s.target))(_side(tmp_path, "whole", None, "chunk_window_stale", 1)))
    assert unchunked.exit_code == 0, unchunked.message   # the fault needs a continuing chunk
