import pytest
import torch
from click.testing import CliRunner

import dumpgen
from parity.cli import cli
from parity.compare.api import compare_dumps
from parity.decisions import compare_decisions, decision_kind, set_overlap, weight_error

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]


def test_set_overlap_ignores_order_and_padding():
    a = torch.tensor([[3, 1, 2], [5, -1, -1], [-1, -1, -1], [1, 2, 3]])
    b = torch.tensor([[1, 2, 3], [5, 7, -1], [-1, -1, -1], [4, 5, 6]])
    assert set_overlap(a, b).tolist() == [1.0, 0.5, 1.0, 0.0]


def test_weight_error_aligned_by_expert_id():
    ids_a, ids_b = torch.tensor([[1, 2], [0, 3]]), torch.tensor([[2, 1], [0, 4]])
    w_a, w_b = torch.tensor([[0.6, 0.4], [0.5, 0.5]]), torch.tensor([[0.4, 0.6], [0.5, 0.5]])
    e = weight_error(ids_a, w_a, ids_b, w_b)
    assert e[0].item() == pytest.approx(0.0)          # same experts, same weights, other order
    assert e[1].item() == pytest.approx(1.0)          # expert 3 instead of 4: |0.5| + |0.5| over 1


def test_decision_kind():
    assert decision_kind("model.layers.3.self_attn.indexer.topk:tap") == "topk"
    assert decision_kind("model.layers.3.mlp.topk_ids:tap") == "ids"
    assert decision_kind("model.layers.3.mlp.topk_weights:tap") == "weights"
    assert decision_kind("model.layers.3.mlp:output") is None


@pytest.fixture(scope="module")
def flip(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    toy = dumpgen.Toy(seed=0)   # routing near-ties that bf16 noise flips
    return (str(dumpgen.write_reference(root / "r", toy, PROMPTS, mode="fp32", decode_steps=2)),
            str(dumpgen.write_engine(root / "e", toy, PROMPTS, mode="bf16", decode_steps=2)))


def test_per_layer_table(flip):
    res = compare_decisions(*flip)
    t = res.table.set_index("layer")
    assert list(t.index) == [0, 1, 2, 3]
    assert t.loc[0, "frac_tokens_differ"] == 0 and t.loc[0, "mean_overlap"] == 1.0
    assert t.loc[2, "frac_tokens_differ"] > 0 and t.loc[2, "min_overlap"] == 0.5
    assert t.loc[2, "weight_err_max"] > t.loc[0, "weight_err_max"]
    assert res.exit_code == 1


def test_flip_annotates_downstream_failures(flip):
    res = compare_dumps(*flip)
    t = res.table
    ids = t[t["key"].str.endswith("topk_ids:tap") & (t["verdict"] != "pass")]
    assert set(ids["verdict"]) == {"warn"}    # a flip alone never fails
    failing = t[t["verdict"] == "fail"]
    assert len(failing) and failing["reason"].str.contains("a decision flipped upstream: L2 mlp.topk_ids").all()
    # Sequences without a flip carry no note.
    flipped_seqs = set(ids["seq"])
    assert (t[~t["seq"].isin(flipped_seqs)]["flip_upstream"] == "").all()


def test_cli(flip, tmp_path):
    r = CliRunner().invoke(cli, ["topk", "--ref", flip[0], "--target", flip[1], "--plot", str(tmp_path)])
    assert r.exit_code == 1 and "first: layer 2 mlp.topk_ids:tap" in r.output
    assert (tmp_path / "decisions_by_layer.png").exists()
    r = CliRunner().invoke(cli, ["topk", "--ref", flip[0], "--target", flip[0]])
    assert r.exit_code == 0


def test_rows_of_different_widths_compare_as_sets():
    from parity.decisions import ids_row

    # The engine keeps the valid entries only; the reference pads to index_topk with -1.
    eng = torch.tensor([[-1, -1], [0, -1], [2, 1]])
    ref = torch.tensor([[-1, -1, -1, -1], [0, -1, -1, -1], [1, 2, -1, -1]])
    assert ids_row(eng, ref)["differ"] == 0
    assert ids_row(torch.tensor([[3, 1]]), ref[2:])["differ"] == 1
    assert "error" in ids_row(eng[:2], ref)
