import json

import pytest
import torch
from click.testing import CliRunner

from parity import quant
from parity.cli import cli
from parity.compare.weights import compare_weights, dequantize
from parity.store import DumpWriter, Record


def write(root, items):
    w = DumpWriter(str(root), run_info={"kind": "weights"}, fsync=False)
    w.write_batch([(Record(key=f"{n}:weight", module=n, stage="weight", seq=w.next_seq()), t) for n, t in items])
    w.close()
    return w.root


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.mlp.experts.0.w{j}.weight": torch.randn(256, 384, generator=g)
            for i in range(2) for j in range(2)}


def test_fp8_with_scale_matches_and_missing_scale_fails(tmp_path, weights):
    ref = write(tmp_path / "r", [(n, quant.qdq_fp8_weight(t)) for n, t in weights.items()])
    items = []
    for n, t in weights.items():
        q, s = quant.quantize_fp8_weight(t)
        items.append((n, q))
        if "layers.1.mlp.experts.0.w1" not in n:   # one scale lost on the way
            items.append((n + "_scale_inv" if "w0" in n else n[:-len(".weight")] + ".scale", s))
    res = compare_weights(ref, write(tmp_path / "t", items))
    t = res.table.set_index("key")
    assert len(t) == 4 and res.exit_code == 1
    lost = t.loc["model.layers.1.mlp.experts.0.w1.weight:weight"]
    assert lost["verdict"] == "fail" and lost["rel_l2"] > 10 and "without a scale" in lost["reason"]
    ok = t.drop(index="model.layers.1.mlp.experts.0.w1.weight:weight")
    assert (ok["verdict"] == "pass").all() and (ok["rel_l2"] == 0).all()
    assert "FP8 128x128 blocks dequantized" in ok["reason"].iloc[0]


def test_fp4_packed_with_per32_scales(tmp_path, weights):
    ref = write(tmp_path / "r", [(n, quant.qdq_fp4_weight(t).to(torch.bfloat16)) for n, t in weights.items()])
    items = []
    for n, t in weights.items():
        p, s = quant.quantize_fp4_weight(t)
        items += [(n, p), (n + "_scale_inv", s)]
    res = compare_weights(ref, write(tmp_path / "t", items))
    assert res.exit_code == 0 and (res.table["rel_l2"] == 0).all()
    assert res.table["shape"].iloc[0] == [256, 384]
    assert res.table["dtype_target"].iloc[0] == "uint8"


def test_fp4_without_scale_is_gross(tmp_path, weights):
    n, t = next(iter(weights.items()))
    p, _ = quant.quantize_fp4_weight(t)
    res = compare_weights(write(tmp_path / "r", [(n, t)]), write(tmp_path / "t", [(n, p)]))
    assert res.table["verdict"].iloc[0] == "fail" and "without a scale" in res.table["reason"].iloc[0]


def test_dequantize_infers_blocks():
    w = torch.randn(300, 200)
    q, s = quant.quantize_fp8_weight(w)
    v, note = dequantize(q, s)
    assert torch.equal(v, quant.dequantize_fp8_weight(q, s)) and "128x128" in note


def test_cli(tmp_path, weights):
    ref = write(tmp_path / "r", list(weights.items()))
    tgt = write(tmp_path / "t", [(n, t.to(torch.bfloat16)) for n, t in weights.items()][:3])
    r = CliRunner().invoke(cli, ["weights", "--ref", str(ref), "--target", str(tgt), "--format", "json"])
    assert r.exit_code == 1, r.output  # a reference weight the target lacks fails
    data = json.loads(r.output)
    assert data["weights"] == 3 and data["only_in_reference"].startswith("1:") and data["missing_in_target"]
    # Activation dumps hold no weights: bad input, exit 2.
    empty = tmp_path / "acts"
    w = DumpWriter(str(empty), fsync=False)
    w.write_batch([(Record(key="m:output", module="m", stage="output", seq=w.next_seq()), torch.zeros(2))])
    w.close()
    r = CliRunner().invoke(cli, ["weights", "--ref", str(ref), "--target", str(empty)])
    assert r.exit_code == 2 and "no weight records" in r.output


def test_one_broken_expert_among_many_is_not_diluted(tmp_path):
    """256 stacked experts in bf16, one scaled by 1.05: the whole tensor's
    rel_l2 (0.05 / 16) passes bf16's limits; the expert itself does not."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 32, 16, generator=g).to(torch.bfloat16)
    bad = w.clone()
    bad[137] = (bad[137].double() * 1.05).to(torch.bfloat16)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    ref, target = write(tmp_path / "r", [(name, w)]), write(tmp_path / "t", [(name, bad)])
    row = compare_weights(ref, target).table.iloc[0]
    assert row["rel_l2"] < 1e-2                       # diluted below bf16's warn limit...
    assert row["verdict"] == "fail" and row["worst_expert"] == 137, row["reason"]
    assert row["reason"].startswith("expert 137 of 256:") and row["worst_expert_rel_l2"] > 2e-2
    same = compare_weights(ref, write(tmp_path / "s", [(name, w.clone())])).table.iloc[0]
    assert same["verdict"] == "pass"
