"""runners.reference: cached greedy decoding, forced tokens, capture with taps."""

import json

import pytest
import torch

from reference_models.load import load_reference, load_tokenizer
from runners.reference import main, read_forced_tokens, read_prompts, run_reference

# 45 tokens: past the sliding window (16), several CSA windows (4) and two
# HCA windows (16); the 12 decode steps close more windows of each.
PROMPT = list(range(3, 48))
NEW = 12


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_reference(tiny_ckpt, "fp32")


@pytest.fixture(scope="module")
def run(tiny_ckpt, model):
    return run_reference(tiny_ckpt, [PROMPT], model=model, max_new_tokens=NEW, keep_logits=True,
                         stop_at_eos=False)


def _last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0, -1]


def test_prefill_logits_equal_a_full_forward(model, run):
    assert len(run.generated[0]) == NEW and len(run.logits[0]) == NEW
    torch.testing.assert_close(run.logits[0][0], _last_logits(model, PROMPT), rtol=0, atol=1e-5)


def test_decode_with_cache_equals_recomputation(model, run):
    seq = run.token_ids[0]
    for k in range(1, NEW):
        full = _last_logits(model, seq[: len(PROMPT) + k])
        torch.testing.assert_close(run.logits[0][k], full, rtol=1e-4, atol=1e-4, msg=f"decode step {k}")


def test_greedy_tokens_equal_transformers_generate(model, run):
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=2)
    assert out[0, len(PROMPT):].tolist() == run.generated[0]


def test_forced_tokens_are_fed_and_greedy_is_kept(tiny_ckpt, model, run):
    forced = [[5, 6, 7, 8]]
    r = run_reference(tiny_ckpt, [PROMPT], model=model, force_tokens=forced, keep_logits=True)
    # The last forced token needs no forward, as in transformers' generate.
    assert r.generated == forced and len(r.greedy[0]) == 4
    torch.testing.assert_close(r.logits[0][0], run.logits[0][0], rtol=0, atol=0)
    torch.testing.assert_close(r.logits[0][2], _last_logits(model, PROMPT + [5, 6]), rtol=1e-4, atol=1e-4)


def test_capture_records_outputs_taps_and_run_info(tiny_ckpt, model, tmp_path):
    from parity.store.reader import open_dump

    tok = load_tokenizer(tiny_ckpt)
    prompts = ["Natalia sold clips to 48 of her friends in April, and then half as many in May.", PROMPT[:20]]
    dump = tmp_path / "dump"
    r = run_reference(tiny_ckpt, prompts, dump=dump, model=model, tokenizer=tok, max_new_tokens=3,
                      stop_at_eos=False)
    info = json.loads((dump / "run.json").read_text())
    assert info["token_ids"] == r.token_ids and info["impl"] == "reference"
    recs = open_dump(str(dump)).records()
    keys = {rec.key for rec in recs}
    for name in ("model.layers.1.self_attn.indexer.topk", "model.layers.2.self_attn.compressed_kv",
                 "model.layers.0.mlp.topk_ids", "model.layers.3.mlp.topk_weights",
                 "model.layers.4.attn_hc.mix", "model.layers.5.ffn_hc.mix"):
        assert f"{name}:tap" in keys, name
    assert any(k.startswith("model.layers.0.self_attn:") for k in keys)  # module outputs too
    contexts = {(rec.phase, rec.step, tuple(rec.meta["seq_ids"])) for rec in recs}
    assert ("prefill", 0, (0,)) in contexts and ("decode", 2, (1,)) in contexts
    topk = [rec for rec in recs if rec.key == "model.layers.1.self_attn.indexer.topk:tap" and rec.phase == "prefill"]
    assert all(rec.shape[-1] == model.config.index_topk for rec in topk)


def test_taps_content(model, monkeypatch):
    import parity
    from reference_models.taps import reference_taps

    seen = {}
    monkeypatch.setattr(parity, "tap", lambda name, t, **meta: seen.setdefault(name, t.detach().clone()))
    ids = torch.tensor([PROMPT])
    with torch.no_grad(), reference_taps(model):
        model(ids, use_cache=False)
    cfg = model.config
    topk = seen["model.layers.1.self_attn.indexer.topk"]
    assert topk.shape == (1, len(PROMPT), cfg.index_topk)
    # Query t sees only entries closed before it: index < (t + 1) // 4.
    limit = (torch.arange(len(PROMPT)) + 1) // 4
    assert ((topk < limit[None, :, None]) | (topk == -1)).all()
    assert (topk[0, 3:] >= 0).any() and (topk[0, :3] == -1).all()
    ids0 = seen["model.layers.0.mlp.topk_ids"][0]
    table = model.model.layers[0].mlp.gate.tid2eid
    assert torch.equal(ids0, table[ids[0]].sort(-1).values)  # hash layer: the table's experts
    w = seen["model.layers.3.mlp.topk_weights"]
    torch.testing.assert_close(w.sum(-1), torch.full_like(w.sum(-1), cfg.routed_scaling_factor))
    assert seen["model.layers.2.self_attn.compressed_kv"].shape == (1, len(PROMPT) // 16, cfg.head_dim)
    mix = seen["model.layers.0.attn_hc.mix"]
    hc = cfg.hc_mult
    assert mix.shape == (1, len(PROMPT), (2 + hc) * hc)
    comb = mix[..., 2 * hc:].reshape(1, len(PROMPT), hc, hc)
    torch.testing.assert_close(comb.sum(-2), torch.ones(1, len(PROMPT), hc), atol=1e-3, rtol=0)


def test_prompt_and_forced_token_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    (tmp_path / "p.jsonl").write_text('{"question": "q1"}\n{"input_ids": [0, 5, 6]}\n')
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"]
    assert read_prompts(tmp_path / "p.jsonl") == ["q1", [0, 5, 6]]
    (tmp_path / "run.json").write_text(json.dumps({"token_ids": [[0, 5, 6, 9, 10], [7, 8]]}))
    assert read_forced_tokens(tmp_path, [[0, 5, 6], [1]]) == [[9, 10], [7, 8]]


def test_cli_bad_input_exits_2(tiny_ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "none"), "--prompts", str(tmp_path / "missing.txt"),
                 "--dump", str(tmp_path / "d")]) == 2
    (tmp_path / "p.txt").write_text("hello\n")
    assert main(["--ckpt", str(tmp_path / "none"), "--prompts", str(tmp_path / "p.txt"),
                 "--dump", str(tmp_path / "d")]) == 2
    assert "error:" in capsys.readouterr().err
