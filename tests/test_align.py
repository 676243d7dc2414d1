import pytest
import torch

import dumpgen
from parity.compare.align import (ShapeMismatch, align, comparable, cut_dump, resolve_mapping, split_key)
from parity.compare.api import compare_dumps
from parity.errors import ParityError
from parity.store import open_dump

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def toy():
    return dumpgen.Toy()


@pytest.fixture(scope="module")
def ref(tmp_path_factory, toy):
    return dumpgen.write_reference(tmp_path_factory.mktemp("a") / "ref", toy, PROMPTS, mode="bf16", decode_steps=1)


def test_ragged_and_batched_meet_per_sequence(tmp_path, toy, ref):
    # Same arithmetic on both sides: the per-sequence views must be bitwise equal.
    eng = dumpgen.write_engine(tmp_path / "eng", toy, PROMPTS, mode="bf16", decode_steps=1)
    rd, td = open_dump(ref), open_dump(eng)
    al = align(cut_dump(rd), cut_dump(td))
    assert not al.only_ref and not al.only_target
    n_records = len(td.records())
    assert len(al.pairs) == n_records * len(PROMPTS)
    for p in al.pairs[:40]:
        a, b = p.target.load(td), p.ref.load(rd)
        assert a.shape == b.shape and torch.equal(a, b)
    # The prefill embedding of sequence 2 is its 7 tokens.
    p = next(p for p in al.pairs if p.ref.key == "model.embed_tokens:output" and p.ref.seq == 2
             and p.ref.phase == "prefill")
    assert list(p.target.load(td).shape) == [7, 64]


def test_batched_reference_rows(tmp_path, toy):
    prompts = [[1, 2, 3], [4, 5, 6]]
    r = dumpgen.write_reference(tmp_path / "r", toy, prompts, mode="bf16", batched=True)
    e = dumpgen.write_engine(tmp_path / "e", toy, prompts, mode="bf16")
    assert open_dump(r).records()[0].shape[:2] == [2, 3]
    res = compare_dumps(r, e)
    assert (res.table["frac_equal"] == 1.0).all()
    assert set(res.table["seq"]) == {0, 1}


def test_matched_by_seq_id_not_position(tmp_path, toy, ref):
    # The engine holds the sequences in another order: seq_ids, not positions, decide.
    eng = dumpgen.write_engine(tmp_path / "eng", toy, PROMPTS, mode="bf16", decode_steps=1, order=[2, 0, 1])
    res = compare_dumps(ref, eng)
    assert (res.table["frac_equal"] == 1.0).all()


def test_tensor_parallel_shards_reassembled(tmp_path, toy, ref):
    eng = dumpgen.write_engine(tmp_path / "eng", toy, PROMPTS, mode="bf16", decode_steps=1, tp=2)
    res = compare_dumps(ref, eng)
    attn = res.table[res.table["key"] == "model.layers.1.self_attn:output"]
    assert len(attn) == 2 * len(PROMPTS)          # prefill + 1 decode step, whole tensors
    assert attn["rank"].map(lambda r: r is None).all()
    assert attn["shape"].iloc[0] == [5, 64]
    assert (res.table["frac_equal"] == 1.0).all()
    # Replicated records are compared rank by rank, and the row says so.
    emb = res.table[res.table["key"] == "model.embed_tokens:output"]
    assert sorted(set(emb["rank"])) == [0, 1]
    assert emb["reason"].str.contains("rank by rank").all()


def test_missing_shard_compared_rank_by_rank(tmp_path, toy, ref):
    eng = dumpgen.write_engine(tmp_path / "eng", toy, PROMPTS, mode="bf16", tp=2, drop_ranks=(1,))
    res = compare_dumps(ref, eng)
    attn = res.table[res.table["key"] == "model.layers.0.self_attn:output"]
    assert (attn["verdict"] == "fail").all()
    assert attn["reason"].str.contains("shape mismatch").all()
    assert any("compared rank by rank" in n for n in res.notes)


def test_comparable_reshape_and_mismatch():
    a, b = torch.zeros(4, 6), torch.zeros(4, 2, 3)
    x, y, how = comparable(a, b)
    assert x.shape == y.shape and "reshaped" in how
    with pytest.raises(ShapeMismatch):
        comparable(torch.zeros(4, 6), torch.zeros(4, 5))


def test_split_key():
    assert split_key("model.layers.3.self_attn:output") == (3, "self_attn:output")
    assert split_key("model.layers.12:output") == (12, "output")
    assert split_key("L7.attn.out") == (7, "attn.out")
    assert split_key("lm_head:output") == (None, "lm_head:output")


def test_mapping_file_renames(tmp_path, toy, ref):
    eng = dumpgen.write_engine(tmp_path / "eng", toy, PROMPTS, mode="bf16", decode_steps=1,
                               rename=lambda m: m.replace("self_attn", "attn").replace("model.", "engine."))
    res = compare_dumps(ref, eng, check_tokens=True)
    assert len(res.only_target) and len(res.only_ref)
    mp = tmp_path / "map.yaml"
    mp.write_text("rules:\n  - {match: '^engine\\.', replace: 'model.'}\n"
                  "  - {match: '\\.attn:', replace: '.self_attn:'}\n")
    res = compare_dumps(ref, eng, mapping=str(mp))
    assert not len(res.only_target) and not len(res.only_ref)
    assert (res.table["frac_equal"] == 1.0).all()
    with pytest.raises(ParityError):
        resolve_mapping(str(mp), "identity")


def test_different_token_ids_stop(tmp_path, toy, ref):
    eng = dumpgen.write_engine(tmp_path / "eng", toy, [[1, 2, 3, 4, 6], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    with pytest.raises(ParityError, match="sequence 0 differs at token 4"):
        compare_dumps(ref, eng)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_reference_batch_aligns_with_ragged_target(tmp_path, side):
    from parity import compare_dumps
    from parity.store import DumpWriter, Record

    torch.manual_seed(0)
    seqs = [torch.randn(4, 8), torch.randn(6, 8)]
    padded = torch.full((2, 6, 8), 1e4)  # padding must never be compared
    for i, s in enumerate(seqs):
        if side == "right":
            padded[i, : s.shape[0]] = s
        else:
            padded[i, 6 - s.shape[0]:] = s

    def write(root, t, meta):
        w = DumpWriter(str(root), run_info={"token_ids": [[1] * 4, [2] * 6]})
        rec = Record(key="model.layers.0:output", module="model.layers.0", stage="output", layer=0,
                     phase="prefill", step=0, meta=meta, seq=w.next_seq())
        w.write_batch([(rec, t)])
        w.close()
        return str(root)

    ref = write(tmp_path / "ref", padded, {"seq_ids": [0, 1], "seq_lens": [4, 6], "padding_side": side})
    tgt = write(tmp_path / "tgt", torch.cat(seqs), {"seq_ids": [0, 1], "cu_seqlens": [0, 4, 10]})
    res = compare_dumps(ref, tgt)
    assert len(res.table) == 2 and res.exit_code == 0, res.table
    assert set(res.table["verdict"]) == {"pass"}
