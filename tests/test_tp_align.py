"""Tensor-parallel layouts on the compare side, on hand-written dumps: partial
sums added, a wrong shard blamed on its rank, and the layout a module
declares reaching its records (capture hooks and weight dumps)."""

from __future__ import annotations

import torch

from parity.compare.api import compare_dumps
from parity.store import DumpWriter, Record, open_dump
from parity.store.stats import tensor_stats

KEY = "model.layers.0.proj:output"
TOKENS = [[1, 2, 3, 4, 5, 6]]


def _write(root, items, rank=0, world=1):
    """items: (key, tensor, layout) records of one prefill forward over one sequence of 6 tokens."""
    w = DumpWriter(str(root), rank, world, if_exists="error" if rank == 0 else "overwrite",
                   run_info={"impl": "x", "precision": "fp32", "token_ids": TOKENS}, fsync=False)
    recs = []
    for key, t, layout in items:
        module, stage = key.split(":")
        meta = {"seq_ids": [0], "cu_seqlens": [0, t.shape[0]], **layout}
        recs.append((Record(key=key, module=module, stage=stage, cls="M", layer=0, call=0, phase="prefill", step=0,
                            rank=rank, world_size=world, shape=list(t.shape), meta=meta, seq=w.next_seq(),
                            stats=tensor_stats(t)), t.contiguous()))
    w.write_batch(recs)
    w.close()
    return w.root


def _ranks(root, per_rank):
    for r, items in enumerate(per_rank):
        _write(root, items, r, len(per_rank))
    return root


def test_partial_sums_are_added_and_shards_concatenated(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, 6, generator=g)
    ref = _write(tmp_path / "ref", [(KEY, x, {}), ("model.layers.0.heads:output", y, {})])
    parts = [x * 0.25, x - x * 0.25]
    tgt = _ranks(tmp_path / "tp", [[(KEY, parts[r], {"shard_reduce": "sum"}),
                                    ("model.layers.0.heads:output", y.chunk(2, 1)[r], {"shard_dim": -2})]
                                   for r in range(2)])
    t = compare_dumps(ref, tgt).table
    assert len(t) == 2 and (t["verdict"] == "pass").all(), t[["key", "reason"]]
    assert list(t["rank"]) == [None, None]
    assert "partial sums of 2 ranks added" in t[t["key"] == KEY]["reason"].iat[0]


def test_one_wrong_shard_is_blamed_on_its_rank(tmp_path):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(6, 8, generator=g)
    ref = _write(tmp_path / "ref", [(KEY, y, {})])
    shards = list(y.chunk(2, -1))
    shards[1] = shards[1] * 1.1
    tgt = _ranks(tmp_path / "tp", [[(KEY, shards[r], {"shard_dim": 1})] for r in range(2)])
    row = compare_dumps(ref, tgt).table.iloc[0]
    assert row["verdict"] == "fail" and row["rank"] == 1
    assert "rank 1's shard is off, rank 0's agrees (split along dim 1)" in row["reason"]
    # both wrong: no single rank named
    both = _ranks(tmp_path / "both", [[(KEY, s * 1.1, {"shard_dim": 1})] for s in y.chunk(2, -1)])
    row = compare_dumps(ref, both).table.iloc[0]
    assert row["verdict"] == "fail" and row["rank"] is None and "the shards of every rank are off" in row["reason"]


def test_a_partial_sum_without_all_its_ranks_is_compared_rank_by_rank(tmp_path):
    x = torch.ones(6, 8)
    ref = _write(tmp_path / "ref", [(KEY, x, {})])
    tgt = _write(tmp_path / "tp", [(KEY, x * 0.5, {"shard_reduce": "sum"})], rank=0, world=2)
    row = compare_dumps(ref, tgt).table.iloc[0]
    assert row["verdict"] == "fail" and row["rank"] == 0 and "partial sum of rank 0 only" in row["reason"]


def test_declared_layouts_reach_records_and_weights(tmp_path):
    from parity import capture
    from parity.config import CaptureConfig

    lin = torch.nn.Linear(4, 6, bias=False)
    lin.parity_layout = {"output": {"shard_dim": -1}, "weight": {"shard_dim": 0}}
    model = torch.nn.Sequential(lin, torch.nn.ReLU())
    cfg = CaptureConfig(dump_dir=str(tmp_path / "d"), rank=1, world_size=2)
    h = capture.install(model, cfg)
    h.set_context(phase="prefill", step=0, seq_ids=[0], cu_seqlens=[0, 3])
    with torch.no_grad():
        model(torch.randn(3, 4))
    h.close()
    recs = {r.key: r for r in open_dump(str(tmp_path / "d")).records()}
    assert recs["0:output"].meta["shard_dim"] == -1 and recs["0:output"].rank == 1
    assert "shard_dim" not in recs["1:output"].meta  # nothing declared: replicated
    capture.dump_weights(model, str(tmp_path / "w"), rank=0, world_size=1)
    w = {r.key: r for r in open_dump(str(tmp_path / "w")).records()}
    assert w["0.weight:weight"].meta == {"shard_dim": 0}
