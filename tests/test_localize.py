"""Where inside a failing record: the token that carries the most error and
how many tokens are beyond the limit."""

import torch
from torch import nn

from parity import capture, compare_dumps
from parity.config import CaptureConfig


class Double(nn.Module):
    def forward(self, x):
        return x * 2


def _dump(path, x):
    m = Double()
    h = capture.install(m, CaptureConfig(dump_dir=str(path)))
    h.set_context(phase="prefill", step=0, seq_ids=[0], cu_seqlens=[0, x.shape[0]])
    m(x)
    h.close()
    return str(path)


def test_a_failing_record_names_its_worst_token(tmp_path):
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[17] *= 1.2          # one token far off
    y[30] *= 1.01         # one a little off (still beyond fp32's limit)
    row = compare_dumps(_dump(tmp_path / "a", x), _dump(tmp_path / "b", y)).table.iloc[0]
    assert row["verdict"] == "fail" and row["worst_token"] == 17
    assert "2 of 48 tokens beyond the limit, worst token 17" in row["reason"]
    same = compare_dumps(_dump(tmp_path / "c", x), _dump(tmp_path / "d", x.clone())).table.iloc[0]
    assert same["verdict"] == "pass" and same["worst_token"] is None


def test_declared_padding_rows_are_dropped_and_counted(tmp_path):
    """A batch padded to a graph size: rows past the last sequence, declared
    with meta pad_rows, are never compared (whatever they hold)."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    padded = torch.cat([x, torch.full((3, 8), 1e6)])

    def dump(path, t, **meta):
        m = Double()
        h = capture.install(m, CaptureConfig(dump_dir=str(path)))
        h.set_context(phase="decode", step=1, seq_ids=[0, 1], cu_seqlens=[0, 2, 5], **meta)
        m(t)
        h.close()
        return str(path)

    res = compare_dumps(dump(tmp_path / "a", x), dump(tmp_path / "b", padded, pad_rows=3))
    assert not res.failed and len(res.table) == 2
    assert any("3 padding row(s) in 1 record(s)" in n for n in res.notes)
    undeclared = compare_dumps(dump(tmp_path / "c", x), dump(tmp_path / "d", padded))
    assert undeclared.failed and "cu_seqlens ends at 5" in undeclared.table.iloc[0]["reason"]
