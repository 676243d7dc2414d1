import pytest
from click.testing import CliRunner

import dumpgen
from parity import layer_bisect
from parity.cli import cli

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return str(dumpgen.write_reference(tmp_path_factory.mktemp("b") / "ref", dumpgen.Toy(), PROMPTS, mode="fp32",
                                       decode_steps=1))


def engine(tmp_path, perturb=None, toy=None):
    return str(dumpgen.write_engine(tmp_path / "eng", toy or dumpgen.Toy(), PROMPTS, mode="bf16", decode_steps=1,
                                    perturb=perturb))


@pytest.mark.parametrize("layer,stage,expect", [
    (2, "mlp:output", "mlp:output"),
    (1, "self_attn:output", "self_attn:output"),
    (3, "post_attention_layernorm:output", "post_attention_layernorm:output"),
])
def test_finds_injected_layer_and_stage(tmp_path, ref, layer, stage, expect):
    res = layer_bisect(ref, engine(tmp_path, dumpgen.scale_at(layer, stage, 1.1)))
    assert (res.layer, res.stage) == (layer, expect)
    assert res.entries[0] == layer
    row = res.stages[res.stages["stage"] == expect].iloc[0]
    assert row["meaning"] == "error enters here"
    assert row["input_err"] < 0.02 < row["output_err"]
    # Downstream of the entry the layer output carries it; later layers only inherit it.
    out = res.stages[res.stages["stage"] == "output"].iloc[0]
    if out["verdict"] == "fail":
        assert out["meaning"].startswith("carries the error")
    later = res.curve[res.curve["layer"] > layer]
    assert not later["enters"].any()
    assert res.exit_code == 1


def test_decode_only_bug(tmp_path, ref):
    def perturb(layer, key, seq, t):
        # Only the last row of a 6-token run: the first decode step of sequence 0.
        if layer == 1 and key.endswith("mlp:output") and seq == 0 and t.shape[0] == 6:
            t = t.clone()
            t[-1] *= 1.2
        return t

    res = layer_bisect(ref, engine(tmp_path, perturb))
    assert (res.layer, res.stage) == (1, "mlp:output")
    assert "decode step 1 seq 0" in res.message


def test_noise_alone_finds_nothing(tmp_path, ref):
    res = layer_bisect(ref, engine(tmp_path))
    assert res.layer is None and res.exit_code == 0
    assert "no divergence" in res.message
    assert list(res.curve["layer"]) == [0, 1, 2, 3]
    assert res.curve["growth"].iloc[1:].notna().all()


def test_two_entry_points_not_monotonic(tmp_path, ref):
    # Layer 1 gets a bug whose error the next layer's norm washes out;
    # a second one enters at layer 3.
    def perturb(layer, key, seq, t):
        if layer in (1, 3) and key.endswith("self_attn:output"):
            return dumpgen.scale_at(layer, "self_attn:output", 1.08)(layer, key, seq, t)
        return t

    res = layer_bisect(ref, engine(tmp_path, perturb))
    assert res.layer == 1
    assert 3 in res.entries or res.curve.set_index("layer").loc[3, "verdict"] == "fail"


def test_flip_upstream_is_reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("flip")
    toy = dumpgen.Toy(seed=0)  # has routing near-ties that bf16 noise flips
    r = dumpgen.write_reference(root / "r", toy, PROMPTS, mode="fp32", decode_steps=2)
    e = dumpgen.write_engine(root / "e", toy, PROMPTS, mode="bf16", decode_steps=2)
    res = layer_bisect(r, e)
    assert res.layer == 2 and res.stage == "mlp:output"
    assert "decision flipped upstream" in res.message
    assert "mlp.topk_ids" in res.curve.set_index("layer").loc[2, "decision_flip"]
    failing = res.compare.table[res.compare.table["verdict"] == "fail"]
    assert (failing["flip_upstream"] != "").all()


def test_cli_output(tmp_path, ref):
    out = CliRunner().invoke(cli, ["layer-bisect", "--ref", ref, "--target",
                                   engine(tmp_path, dumpgen.scale_at(2, "mlp:output", 1.1))])
    assert out.exit_code == 1
    assert "error enters at layer 2, stage mlp:output" in out.output
    assert "stages of layer 2:" in out.output
    out = CliRunner().invoke(cli, ["layer-bisect", "--ref", ref, "--target", ref, "--format", "json"])
    assert out.exit_code == 0
