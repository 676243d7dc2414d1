"""quant_sim: the engine's weight/activation quantization over the reference."""

import pytest
import torch

from parity import quant
from reference_models.load import load_reference
from reference_models.quant_sim import quant_sim, quantized_weights
from reference_models.synth import synthesize


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_reference(tiny_ckpt, "fp32")


IDS = torch.randint(3, 4096, (1, 64), generator=torch.Generator().manual_seed(3))


def _snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def _assert_restored(model, snap):
    for k, v in model.state_dict().items():
        assert v.data_ptr() == snap[k][0] and torch.equal(v, snap[k][1]), k
    for mod in model.modules():
        assert "forward" not in vars(mod) and "_apply_gate" not in vars(mod)


def test_policy_mirrors_the_release(model):
    fmts = quantized_weights(model)
    layers = model.config.num_hidden_layers
    assert sum(f == "fp4" for f in fmts.values()) == 2 * layers
    assert "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight" in fmts
    for name in ("model.layers.1.self_attn.compressor.kv_proj.weight", "model.layers.1.mlp.gate.weight",
                 "lm_head.weight", "model.embed_tokens.weight",
                 "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight"):
        assert name not in fmts


def test_weights_are_on_the_grid_inside_and_restored_after(model):
    snap = _snapshot(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        base = model(IDS).logits
        with quant_sim(model):
            w8 = params["model.layers.0.self_attn.q_b_proj.weight"]
            w4 = params["model.layers.2.mlp.experts.down_proj"]
            assert torch.equal(quant.qdq_fp8_weight(w8), w8)  # idempotent: already on the grid
            assert torch.equal(quant.qdq_fp4_weight(w4), w4)
            rel8 = ((w8 - snap["model.layers.0.self_attn.q_b_proj.weight"][1]).norm() / w8.norm()).item()
            rel4 = ((w4 - snap["model.layers.2.mlp.experts.down_proj"][1]).norm() / w4.norm()).item()
            logits = model(IDS).logits
    # Gaussian weights: e4m3 keeps 3 mantissa bits, e2m1 one.
    assert 0.01 < rel8 < 0.05 and 0.05 < rel4 < 0.2
    rel = ((logits - base).norm() / base.norm()).item()
    assert 0.01 < rel < 0.6, rel
    _assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)


def test_activation_quant_and_restore_on_exception(model):
    snap = _snapshot(model)
    with torch.no_grad():
        base = model(IDS).logits
        with quant_sim(model, weights=False, activations=True, rounding="rne"):
            act = model(IDS).logits
        assert 0.001 < ((act - base).norm() / base.norm()).item() < 0.5
        with pytest.raises(RuntimeError, match="boom"):
            with quant_sim(model, weights=True, activations=True):
                raise RuntimeError("boom")
    _assert_restored(model, snap)


def test_bad_rounding_is_rejected(model):
    with pytest.raises(ValueError):
        with quant_sim(model, rounding="floor"):
            pass


def test_on_grid_checkpoint_makes_weight_quantization_lossless(tmp_path):
    ck = synthesize("tiny", seed=0, out=tmp_path / "grid", dtype="bf16", on_grid=True,
                    num_hidden_layers=2)
    m = load_reference(ck, "fp32")
    with torch.no_grad():
        base = m(IDS[:, :24]).logits
        with quant_sim(m):
            assert torch.equal(m(IDS[:, :24]).logits, base)
