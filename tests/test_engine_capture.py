"""The engine under parity's capture: module outputs and taps with the
layout metadata a compare needs to split ragged rows by sequence."""

from __future__ import annotations

import pytest

from test_engine_common import one_thread, prompts, tiny_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


def test_capture_records_modules_and_taps(tmp_path, monkeypatch):
    from parity.store.reader import open_dump
    from runners.engine import Engine

    monkeypatch.setenv("PARITY_DUMP_DIR", str(tmp_path / "dump"))
    monkeypatch.setenv("PARITY_DUMP_MODULES", r"^model\.layers\.\d+$|indexer\.topk|mlp\.topk|compressed_kv|attn_hc\.mix|^lm_head$")
    eng = Engine(tiny_checkpoint(), max_num_seqs=4, max_model_len=128)
    assert eng.capture is not None and eng.capture.enabled
    ps = prompts((21, 29))
    eng.generate(ps, max_new_tokens=3, ignore_eos=True)
    eng.capture.close()

    recs = open_dump(str(tmp_path / "dump")).records()
    keys = {(r.key, r.phase, r.step) for r in recs}
    for key in ("model.layers.0:output", "model.layers.1.self_attn.indexer.topk:tap",
                "model.layers.2.self_attn.compressed_kv:tap", "model.layers.3.mlp.topk_ids:tap",
                "model.layers.3.mlp.topk_weights:tap", "model.layers.0.attn_hc.mix:tap"):
        assert (key, "prefill", 0) in keys, key
    assert ("model.layers.0:output", "decode", 2) in keys
    layer0 = [r for r in recs if r.key == "model.layers.0:output" and r.phase == "prefill"][0]
    assert layer0.meta["seq_ids"] == [0, 1]
    assert layer0.meta["cu_seqlens"] == [0, 21, 50]
    assert layer0.shape == [50, eng.config.hc_mult, eng.config.hidden_size]
    assert len(layer0.meta["slot_ids"]) == 2
    topk = [r for r in recs if r.key == "model.layers.1.self_attn.indexer.topk:tap" and r.phase == "prefill"][0]
    assert topk.dtype == "int64" and topk.shape[0] == 50
    ckv = [r for r in recs if r.key == "model.layers.2.self_attn.compressed_kv:tap" and r.phase == "prefill"][0]
    assert ckv.meta["cu_seqlens"] == [0, 1, 2]  # one HCA(16) entry per prompt
