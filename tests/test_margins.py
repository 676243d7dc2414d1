"""Decisions sized by their margins: a flip across a margin the scores'
rounding can cross is a near-tie; one across a wider margin is a changed
decision, and enough of them fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import parity
from parity import capture, compare_dumps
from parity.config import CaptureConfig
from parity.decisions import NEAR_TIE, flip_scale, margin_key, size_flips, topk_margin

T, E, K = 400, 16, 2


def test_topk_margin():
    s = torch.tensor([[5.0, 1.0, 4.0, 3.0], [1.0, 1.0, 1.0, 0.0]])
    assert topk_margin(s, 2).tolist() == [1.0, 0.0]
    assert topk_margin(s[:, :2], 2).isinf().all()           # nothing left out: no flip possible
    assert margin_key("model.layers.2.mlp.topk_ids:tap") == "model.layers.2.mlp.topk_margin:tap"
    assert margin_key("model.layers.2.self_attn.indexer.topk:tap") == "model.layers.2.self_attn.indexer.topk_margin:tap"
    assert margin_key("model.layers.2.mlp:output") is None


def test_size_flips_separates_near_ties_from_changes():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(T, E, generator=g)
    s[:5] = -1.0
    s[:5, 0], s[:5, 1] = 1.0, 1.0 + 2e-6                    # five near-ties for the top expert...
    target = s + 1e-6 * torch.randn(T, E, generator=g)      # (rounding-sized differences everywhere)
    target[:5, 0] = 1.0 + 4e-6                               # ...that the target's scores reorder
    top1 = lambda x: x.argmax(-1, keepdim=True)
    pair = (top1(target), top1(s), topk_margin(target, 1), topk_margin(s, 1))
    scale, off = flip_scale([pair])
    assert off is None and scale < 1e-5
    d = size_flips(*pair, scale=scale)
    assert d["flipped"] == 5 and d["near_tie"] == 5 and d["changed"] == 0, d
    bug = target.clone()
    bug[-T // 8:, 3] += 0.8                                  # a scoring bug on some tokens: expert 3 favoured
    pair = (top1(bug), top1(s), topk_margin(bug, 1), topk_margin(s, 1))
    scale, off = flip_scale([pair])
    assert off is None and scale < 1e-4                     # most tokens still agree to rounding
    d = size_flips(*pair, scale=scale)
    assert d["changed"] >= 10 and d["near_tie"] == 5, d
    everywhere = s.clone()
    everywhere[:, 3] += 0.8
    scale, off = flip_scale([(top1(everywhere), top1(s), topk_margin(everywhere, 1), topk_margin(s, 1))])
    assert off is not None and "beyond rounding" in off


class Router(nn.Module):
    def __init__(self, bias=None):
        super().__init__()
        self.bias = bias

    def forward(self, scores):
        s = scores if self.bias is None else scores + self.bias
        parity.tap("model.layers.0.mlp.topk_ids", s.topk(K, dim=-1).indices.sort(-1).values)
        parity.tap("model.layers.0.mlp.topk_margin", topk_margin(s, K))
        return s


def _dump(path, scores, bias=None):
    m = Router(bias)
    h = capture.install(m, CaptureConfig(dump_dir=str(path)), run_info={"precision": "fp32"})
    h.set_context(phase="prefill", step=0)
    m(scores)
    h.close()
    return str(path)


@pytest.fixture(scope="module")
def scores():
    return torch.randn(T, E, generator=torch.Generator().manual_seed(1))


def test_near_ties_warn_and_a_scoring_bug_fails(tmp_path, scores):
    ref = _dump(tmp_path / "ref", scores)
    # rounding-sized differences everywhere: only the narrowest margins flip
    tie = scores.clone()
    order = tie.sort(-1, descending=True)
    rows = torch.arange(8)
    tie[rows, order.indices[rows, K]] = order.values[rows, K - 1] - 1e-7  # eight margins of 1e-7
    ref_tie = _dump(tmp_path / "ref_tie", tie)
    near = _dump(tmp_path / "near", tie + 5e-7 * torch.randn(T, E, generator=torch.Generator().manual_seed(2)))
    res = compare_dumps(ref_tie, near)
    row = res.table[res.table["key"] == "model.layers.0.mlp.topk_ids:tap"].iloc[0]
    assert row["frac_equal"] < 1.0 and row["flip_changed"] == 0.0 and row["verdict"] == "warn", row["reason"]
    assert "near-ties" in row["reason"] and f"{NEAR_TIE:g}x" in row["reason"]

    bias = torch.zeros(E)
    bias[3] = 0.8
    bug = _dump(tmp_path / "bug", scores, bias)
    res = compare_dumps(ref, bug)
    row = res.table[res.table["key"] == "model.layers.0.mlp.topk_ids:tap"].iloc[0]
    assert row["verdict"] == "fail" and row["flip_changed"] > 0.1, row["reason"]
    assert "decision changed for" in row["reason"]
