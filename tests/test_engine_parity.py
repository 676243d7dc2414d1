"""fp32 engine vs fp32 transformers reference on the tiny checkpoint.

Three prompts of different lengths go through one ragged prefill, then 8
decode forwards of all three at once. Every decoder layer's hc streams, the
final hidden state, the logits, the indexer's top-k picks and the MoE routing
must agree with the reference run of each prompt alone.
"""

from __future__ import annotations

import pytest
import torch

from test_engine_common import (N_DECODE, PROMPT_LENS, Recorder, layer_names, one_thread, prompts, ref_steps,
                                reference_model, rel_err, tiny_checkpoint)

TOL = 2e-5  # relative L2, fp32 rounding level (measured ~1e-6)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def runs(_threads):
    from runners.engine import Engine, SamplingParams

    eng = Engine(tiny_checkpoint(), precision="fp32", max_num_seqs=4, max_model_len=256)
    cfg = eng.config
    L = cfg.num_layers
    csa = [i for i, t in enumerate(cfg.layer_types) if t == "compressed_sparse_attention"]
    names = layer_names(L) + ["model.norm"] + [f"model.layers.{i}.mlp.gate" for i in range(L)] + \
        [f"model.layers.{i}.self_attn.compressor.indexer" for i in csa]
    rec = Recorder(eng.model, names)
    ps = prompts()
    rids = [eng.add_request(p, SamplingParams(max_new_tokens=N_DECODE + 1, ignore_eos=True)) for p in ps]
    logits, cus = [], []
    orig_forward = eng.forward

    def spy(chunks, **kw):
        out = orig_forward(chunks, **kw)
        logits.append(out)
        cus.append(eng.last_meta.cu_seqlens)
        return out

    eng.forward = spy
    while eng.has_unfinished():
        eng.step()
    rec.close()
    tokens = [eng.requests[r].output_ids for r in rids]

    ref = reference_model()
    ref_runs = [ref_steps(ref, p, t[:N_DECODE], names) for p, t in zip(ps, tokens)]
    return dict(cfg=cfg, names=names, rec=rec, logits=logits, cus=cus, tokens=tokens, ps=ps, ref=ref_runs, csa=csa)


def _engine_rows(r, name, step, b):
    cu = r["cus"][step]
    out = r["rec"].out[name][step]
    if isinstance(out, tuple):
        return tuple(o[cu[b]:cu[b + 1]] for o in out)
    return out[cu[b]:cu[b + 1]]


def test_forward_count(runs):
    assert len(runs["logits"]) == 1 + N_DECODE
    assert runs["cus"][0] == [0, *torch.tensor(PROMPT_LENS).cumsum(0).tolist()]


def test_layers_and_logits(runs):
    worst = {}
    for b in range(len(PROMPT_LENS)):
        ref_logits, ref_rec = runs["ref"][b]
        for step in range(1 + N_DECODE):
            for name in layer_names(runs["cfg"].num_layers) + ["model.norm"]:
                e = _engine_rows(runs, name, step, b)
                r = ref_rec.out[name][step][0]
                err = rel_err(e, r)
                worst[name] = max(worst.get(name, 0.0), err)
            e_log = runs["logits"][step][b]
            worst["logits"] = max(worst.get("logits", 0.0), rel_err(e_log, ref_logits[step][-1]))
    print("\nworst relative L2 error over 3 sequences x (prefill + 8 decodes):")
    for k, v in worst.items():
        print(f"  {k:20s} {v:.2e}")
    assert all(v < TOL for v in worst.values()), worst


def test_greedy_tokens_match_reference_generate(runs):
    ref = reference_model()
    for p, toks in zip(runs["ps"], runs["tokens"]):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=N_DECODE + 1, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        assert out[0, len(p):].tolist() == toks


def test_routing_identical(runs):
    n = 0
    for b in range(len(PROMPT_LENS)):
        _, ref_rec = runs["ref"][b]
        for step in range(1 + N_DECODE):
            for i in range(runs["cfg"].num_layers):
                name = f"model.layers.{i}.mlp.gate"
                _, w, ids = _engine_rows(runs, name, step, b)
                _, rw, rids = ref_rec.out[name][step]
                e_ids, e_ord = ids.sort(dim=-1)
                r_ids, r_ord = rids.sort(dim=-1)
                assert torch.equal(e_ids, r_ids), (name, step, b)
                torch.testing.assert_close(w.gather(1, e_ord), rw.gather(1, r_ord), rtol=1e-5, atol=1e-6)
                n += 1
    assert n > 0


def test_indexer_topk_identical(runs):
    checked = 0
    for b in range(len(PROMPT_LENS)):
        _, ref_rec = runs["ref"][b]
        for step in range(1 + N_DECODE):
            for i in runs["csa"]:
                name = f"model.layers.{i}.self_attn.compressor.indexer"
                e = _engine_rows(runs, name, step, b)
                r = ref_rec.out[name][step][0]
                assert e.shape[0] == r.shape[0]
                for er, rr in zip(e.tolist(), r.tolist()):
                    assert sorted(x for x in er if x >= 0) == sorted(x for x in rr if x >= 0), (name, step, b)
                    checked += 1
    # the prompts are long enough that some queries must choose (more entries than index_topk)
    assert checked > 0
