"""Checkpoint loading: explicit name rules, reports, refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_engine_common import one_thread, prompts, reference_model, tiny_checkpoint

from parity.errors import ParityError


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


def _variant(tmp_path, edit):
    """A copy of the tiny checkpoint with its tensors passed through `edit(dict)`."""
    src = tiny_checkpoint()
    out = tmp_path / "ckpt"
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_clean_report():
    from runners.engine.weights import load_model

    _, _, report = load_model(tiny_checkpoint())
    assert report.unused == [] and report.unfilled == [] and report.ignored == []
    assert len(report.loaded) > 100


def test_renamed_tensor_is_reported_and_refused(tmp_path):
    from runners.engine import Engine
    from runners.engine.weights import load_model

    name = "model.layers.2.self_attn.kv_proj.weight"
    ck = _variant(tmp_path, lambda t: t.__setitem__("model.layers.2.self_attn.kv_projection.weight", t.pop(name)))
    with pytest.raises(ParityError, match=r"model\.layers\.2\.self_attn\.kv_proj\.weight"):
        Engine(ck)
    _, _, report = load_model(ck, strict=False)
    assert report.unused == ["model.layers.2.self_attn.kv_projection.weight"]
    assert report.unfilled == [name]


def test_missing_expert_piece_is_unfilled(tmp_path):
    from runners.engine.weights import load_model

    ck = _variant(tmp_path, lambda t: t.pop("model.layers.3.mlp.experts.down_proj"))
    with pytest.raises(ParityError, match=r"model\.layers\.3\.mlp\.experts\.down_proj"):
        load_model(ck)


def test_shape_mismatch_names_the_tensor(tmp_path):
    from runners.engine.weights import load_model

    def edit(t):
        t["model.layers.1.self_attn.sinks"] = torch.zeros(7)

    ck = _variant(tmp_path, edit)
    with pytest.raises(ParityError, match=r"model\.layers\.1\.self_attn\.sinks.*\(7,\)"):
        load_model(ck)


def test_extra_tensors_unused_or_ignored(tmp_path):
    from runners.engine.weights import load_model

    def edit(t):
        t["mtp.0.attn.wq_a.weight"] = torch.zeros(2, 2)
        t["model.layers.0.something_new"] = torch.zeros(3)

    _, _, report = load_model(_variant(tmp_path, edit))
    assert report.ignored == ["mtp.0.attn.wq_a.weight"]
    assert report.unused == ["model.layers.0.something_new"]
    assert report.unfilled == []


def test_original_deepseek_names_load_identically(tmp_path):
    """save_pretrained writes DeepSeek's own names (layers.N.attn.wq_a, per-expert
    w1/w2/w3); the engine must load them into the same tensors."""
    from runners.engine import Engine

    from transformers import DeepseekV4ForCausalLM

    out = tmp_path / "orig"
    ref = reference_model()
    # a model built from its config (not loaded) saves in the original naming
    fresh = DeepseekV4ForCausalLM(ref.config)
    fresh.load_state_dict(ref.state_dict())
    fresh.save_pretrained(str(out))
    keys = load_file(str(out / "model.safetensors")).keys()
    assert any(".ffn.experts.0.w1.weight" in k for k in keys)
    a, b = Engine(tiny_checkpoint(), max_num_seqs=1), Engine(str(out), max_num_seqs=1)
    assert b.load_report.unused == [] and b.load_report.unfilled == []
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    p = prompts((20,))
    assert a.generate(p, max_new_tokens=3, ignore_eos=True)[0].token_ids == \
        b.generate(p, max_new_tokens=3, ignore_eos=True)[0].token_ids
