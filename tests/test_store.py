import json
import os

import pytest
import torch

from parity.errors import DumpError
from parity.store import DumpWriter, Record, open_dump
from parity.store.writer import prepare_run_dir


def _write(root, tensors, **kw):
    w = DumpWriter(str(root), **kw)
    items = []
    for i, (name, t) in enumerate(tensors.items()):
        rec = Record(key=f"{name}:output", module=name, stage="output", seq=w.next_seq())
        items.append((rec, t))
    w.write_batch(items)
    w.close()
    return w.root


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.bool, torch.float8_e4m3fn]


def test_round_trip_every_dtype_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dt in enumerate(DTYPES):
        base = torch.randn(3, 5, generator=g) * 10
        tensors[f"m{i}"] = base.to(dt)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["strided"] = torch.arange(20.).reshape(4, 5).t()  # non-contiguous input
    root = _write(tmp_path / "d", tensors)
    dump = open_dump(root)
    recs = {r.module: r for r in dump.records()}
    for name, t in tensors.items():
        got = dump.load(recs[name], verify=True)
        assert got.dtype == t.dtype and list(got.shape) == list(t.shape)
        assert torch.equal(got.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got,
                           t.contiguous().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)


def test_shards_are_real_safetensors(tmp_path):
    from safetensors import safe_open

    t = torch.randn(4, 6)
    root = _write(tmp_path / "d", {"a": t})
    rec = open_dump(root).records()[0]
    with safe_open(os.path.join(root, "rank0", rec.file), framework="pt") as f:
        assert torch.equal(f.get_tensor(rec.tensor), t)


def test_existing_run_refused_overwritten_or_new(tmp_path):
    root = tmp_path / "d"
    _write(root, {"a": torch.ones(2)})
    with pytest.raises(DumpError, match="already holds a run"):
        DumpWriter(str(root))
    (root / "notes.txt").write_text("mine")
    new = _write(root, {"b": torch.ones(3)}, if_exists="new")
    assert new.endswith("run-001") and [r.module for r in open_dump(root).records()] == ["a"]
    _write(root, {"c": torch.ones(4)}, if_exists="overwrite")
    assert [r.module for r in open_dump(root).records()] == ["c"]
    assert (root / "notes.txt").read_text() == "mine"  # the user's file survives an overwrite


def test_truncated_shard_is_a_clear_error(tmp_path):
    root = _write(tmp_path / "d", {"a": torch.randn(1000)})
    dump = open_dump(root)
    rec = dump.records()[0]
    path = os.path.join(root, "rank0", rec.file)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    with pytest.raises(DumpError, match="truncated"):
        open_dump(root).load(rec)


def test_corrupt_manifest_line_names_file_and_line(tmp_path):
    root = _write(tmp_path / "d", {"a": torch.randn(3), "b": torch.randn(3)})
    m = os.path.join(root, "rank0", "manifest.jsonl")
    lines = open(m).read().splitlines()
    open(m, "w").write("{broken\n" + "\n".join(lines) + "\n")
    with pytest.raises(DumpError, match=r"manifest.jsonl line 1"):
        open_dump(root).records()


def test_cut_last_manifest_line_keeps_earlier_records(tmp_path):
    root = _write(tmp_path / "d", {"a": torch.randn(3), "b": torch.randn(3)})
    m = os.path.join(root, "rank0", "manifest.jsonl")
    text = open(m).read()
    open(m, "w").write(text[:-20])  # a crash while appending the last line
    dump = open_dump(root)
    assert [r.module for r in dump.records()] == ["a"]
    assert not dump.complete and "cut short" in dump.incomplete[0]


def test_hash_mismatch_detected(tmp_path):
    root = _write(tmp_path / "d", {"a": torch.zeros(64)})
    dump = open_dump(root)
    rec = dump.records()[0]
    path = os.path.join(root, "rank0", rec.file)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert open_dump(root, verify=False).load(rec).shape == (64,)  # asked not to hash
    with pytest.raises(DumpError, match="does not match its hash"):
        open_dump(root).load(rec)


def test_manifest_shape_disagreement_is_caught(tmp_path):
    root = _write(tmp_path / "d", {"a": torch.zeros(4, 4)})
    m = os.path.join(root, "rank0", "manifest.jsonl")
    rec = json.loads(open(m).readline())
    rec["shape"] = [16]
    open(m, "w").write(json.dumps(rec) + "\n")
    dump = open_dump(root)
    with pytest.raises(DumpError, match="the manifest says"):
        dump.load(dump.records()[0])


def test_not_a_dump(tmp_path):
    with pytest.raises(DumpError, match="does not exist"):
        open_dump(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DumpError, match="not a parity dump"):
        open_dump(str(tmp_path / "empty"))


def test_prepare_new_subfolder_numbering(tmp_path):
    root = tmp_path / "d"
    _write(root, {"a": torch.ones(1)})
    a = prepare_run_dir(str(root), "new")
    os.makedirs(a, exist_ok=True)
    b = prepare_run_dir(str(root), "new")
    assert a.endswith("run-001") and b.endswith("run-002")


@pytest.mark.parametrize("n", [0, 1, 2047, 2048, 70_001, (256 << 10) + 1])
def test_content_hash_is_sha256_of_the_bytes_at_every_size(n):
    import hashlib

    from parity.store.writer import content_hash, tensor_bytes

    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert content_hash(tensor_bytes(t)) == "sha256:" + hashlib.sha256(t.numpy().tobytes()).hexdigest()[:32]
