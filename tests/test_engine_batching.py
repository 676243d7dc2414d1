"""Batch and schedule invariance: what a sequence computes must not depend on
how its tokens were split into forwards, who shared the forward, or who used
its cache slot before."""

from __future__ import annotations

import pytest
import torch

from test_engine_common import one_thread, prompts, rel_err, run_engine, tiny_checkpoint

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


def _engine(**kw):
    from runners.engine import Engine

    kw.setdefault("max_num_seqs", 4)
    kw.setdefault("max_model_len", 192)
    return Engine(tiny_checkpoint(), precision="fp32", **kw)


@pytest.fixture(scope="module")
def ps():
    return prompts((45, 23, 70))


@pytest.fixture(scope="module")
def one_shot(ps):
    return run_engine(_engine(), ps, 8)


def _same(a, b, exact=False):
    toks_a, log_a = a
    toks_b, log_b = b
    assert toks_a == toks_b
    assert log_a.shape == log_b.shape
    if exact:
        assert torch.equal(log_a, log_b)
    else:
        assert rel_err(log_a, log_b) < TOL


def test_chunked_prefill_equals_one_shot(ps, one_shot):
    # chunks of 7 (not a multiple of either compress ratio) and at most 12
    # tokens per forward, so chunks of different prompts share forwards with decodes
    chunked = run_engine(_engine(prefill_chunk=7, max_num_batched_tokens=12), ps, 8)
    for i in range(len(ps)):
        _same(chunked[i], one_shot[i])


def test_sequence_with_others_equals_alone(ps, one_shot):
    for i in range(len(ps)):
        alone = run_engine(_engine(), [ps[i]], 8)
        _same(alone[0], one_shot[i])


def test_continuous_batching_join_and_leave(ps, one_shot):
    # two slots, four requests of different lengths: requests join as others
    # finish, in slots just freed, and decode next to prefills
    extra = prompts((33,), seed=9)[0]
    eng = _engine(max_num_seqs=2)
    mixed = run_engine(eng, ps + [extra], [8, 3, 8, 5])
    for i in range(len(ps)):
        n = len(mixed[i][0])
        _same(mixed[i], (one_shot[i][0][:n], one_shot[i][1][:n]))
    alone = run_engine(_engine(), [extra], 5)
    _same(mixed[3], alone[0])
    assert eng.cache.free_slots == [0, 1]
    assert eng.cache.num_free_blocks == eng.cache.cache.num_blocks


def test_reused_slot_carries_nothing(ps):
    eng = _engine(max_num_seqs=1)
    run_engine(eng, [ps[2]], 6)  # fills slot 0's rings and some pool blocks
    cache = eng.cache
    slot = cache.allocate(12345)
    assert all(float(t[slot].abs().sum()) == 0.0 for lc in cache.cache.layers for t in lc.slot_tensors())
    cache.free(12345)
    reused = run_engine(eng, [ps[1]], 6)
    fresh = run_engine(_engine(max_num_seqs=1), [ps[1]], 6)
    _same(reused[0], fresh[0], exact=True)


def test_abort_frees_slot_and_others_continue(ps, one_shot):
    from runners.engine import SamplingParams

    eng = _engine(max_num_seqs=2)
    a = eng.add_request(ps[0], SamplingParams(max_new_tokens=8, ignore_eos=True))
    b = eng.add_request(ps[1], SamplingParams(max_new_tokens=8, ignore_eos=True))
    c = eng.add_request(ps[2], SamplingParams(max_new_tokens=8, ignore_eos=True))
    eng.step()
    eng.step()
    eng.abort_request(b)
    assert eng.get_request(b).finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.release(a).output_ids == one_shot[0][0]
    assert eng.release(c).output_ids == one_shot[2][0]
    assert eng.cache.free_slots == [0, 1]


def test_string_prompts_stop_strings_and_sampling():
    eng = _engine(max_num_seqs=2)
    assert eng.tokenizer is not None
    base = eng.generate("The answer is", max_new_tokens=12, ignore_eos=True)[0]
    assert len(base.token_ids) == 12 and base.text == eng.decode(base.token_ids)
    text = base.text
    stop = next((text[i:i + 2] for i in range(1, len(text) - 2) if text[i:i + 2].strip()), None)
    if stop is not None:
        cut = eng.generate("The answer is", max_new_tokens=12, ignore_eos=True, stop=[stop])[0]
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert text.startswith(cut.text)
    # top_p this small keeps only the top token: sampling becomes greedy
    nucleus = eng.generate("The answer is", max_new_tokens=12, ignore_eos=True, greedy=False, top_p=1e-9, seed=3)[0]
    assert nucleus.token_ids == base.token_ids
    a = eng.generate("The answer is", max_new_tokens=6, greedy=False, temperature=1.0, seed=7, ignore_eos=True)[0]
    b = eng.generate("The answer is", max_new_tokens=6, greedy=False, temperature=1.0, seed=7, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids  # seeded sampling is reproducible
