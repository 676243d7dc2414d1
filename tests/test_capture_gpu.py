"""Capture on a CUDA device: copies, summaries and the side-stream transfer."""

import pytest
import torch
from torch import nn

from parity import capture
from parity.config import CaptureConfig
from parity.store import open_dump

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).cuda().to(torch.bfloat16)


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_cuda_records_equal_outputs_and_summaries(tmp_path, mode):
    model = _model()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"), mode=mode, calls=None))
    outs = []
    for step in range(3):
        h.set_context(phase="decode", step=step)
        y = model(x)
        outs.append(y.clone())
        y.mul_(0)  # in-place reuse after the hook must not reach the record
    h.close()
    dump = open_dump(str(tmp_path / "d"))
    recs = [r for r in dump.records() if r.module == "Sequential"]
    assert [r.step for r in recs] == [0, 1, 2]
    for r, ref in zip(recs, outs):
        assert r.stats["absmax"] == pytest.approx(ref.float().abs().max().item(), rel=1e-6)
        assert r.stats["l2"] == pytest.approx(ref.double().norm().item(), rel=1e-6)
        if mode == "full":
            assert torch.equal(dump.load(r, verify=True), ref.cpu())
        else:
            assert r.kind == "stats" and r.file is None


@pytest.mark.parametrize("shape,dtype", [((7,), torch.float32), ((3, 2049), torch.bfloat16),
                                         ((4096, 1031), torch.float16), (((1 << 23) + 5,), torch.bfloat16)])
def test_triton_summary_matches_torch(shape, dtype):
    from parity.store.stats import stats_from_vector, stats_vector_torch
    from parity.store.stats_cuda import stats_vector_cuda

    torch.manual_seed(1)
    x = (torch.randn(shape, device="cuda") * 5).to(dtype)
    flat = x.view(-1)
    flat[::997] = float("nan")
    flat[3::1009] = float("inf")
    flat[5::1013] = float("-inf")
    v = stats_vector_cuda(x)
    assert v is not None, "triton path did not serve a CUDA tensor"
    fast, ref = stats_from_vector(v.cpu()), stats_from_vector(stats_vector_torch(x).cpu())
    assert fast["nan"] == ref["nan"] > 0 and fast["inf"] == ref["inf"] > 0
    assert fast["absmax"] == ref["absmax"]
    for k in ("mean", "std", "l2"):
        assert fast[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12)


def test_triton_summary_declines_what_it_cannot_read():
    from parity.store.stats_cuda import stats_vector_cuda

    assert stats_vector_cuda(torch.ones(4)) is None  # CPU tensor
    assert stats_vector_cuda(torch.ones(4, device="cuda", dtype=torch.float64)) is None
    assert stats_vector_cuda(torch.ones(4, device="cuda", dtype=torch.int32)) is None
    assert stats_vector_cuda(torch.ones(0, device="cuda")) is None


@pytest.mark.parametrize("queue_size", [1, 3, 64])
def test_cuda_groups_keep_record_order_and_flush_ships_them(tmp_path, queue_size):
    import parity

    model = _model()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"), classes=frozenset({"Linear"}),
                                             calls=None, queue_size=queue_size))
    h.set_context(phase="decode", step=0)
    model(x)
    parity.tap("cpu_side", torch.arange(4))      # a CPU record between CUDA ones
    parity.tap("gpu_side", torch.ones(3, device="cuda"))
    model(x)
    h.flush()  # no context change: held CUDA records must still reach the disk
    recs = list(open_dump(str(tmp_path / "d")).records())
    assert len(recs) == 10
    assert [r.seq for r in recs] == sorted(r.seq for r in recs)
    assert [r.key for r in recs][4:6] == ["cpu_side:tap", "gpu_side:tap"]
    h.close()


def test_small_and_large_cuda_records_round_trip_through_the_arena(tmp_path):
    from parity.capture import session as S

    dtypes = [torch.bfloat16, torch.float32, torch.int64, torch.bool, torch.float16]
    small = [(torch.randn(3, 5, device="cuda") * 4).to(d) for d in dtypes]
    small.append(torch.tensor(7.5, device="cuda"))               # 0-dim
    small.append(torch.randn(6, 4, device="cuda").t())           # not contiguous
    large = torch.randn(S._ARENA_BYTES // 4 + 3, device="cuda")  # too big for the arena: its own copy
    h = capture.install(torch.nn.Identity(), CaptureConfig(dump_dir=str(tmp_path / "d"), calls=None))
    transfers = []
    to_host = h._session._to_host
    h._session._to_host = lambda t: transfers.append(t.nbytes) or to_host(t)
    import parity

    expected = {}
    for i, t in enumerate(small + [large]):
        parity.tap(f"t{i}", t)
        expected[f"t{i}:tap"] = t.clone()
        t.zero_() if t.dtype != torch.bool else t.logical_not_()  # mutation after the tap
    h.close()
    # the small records come back in one transfer, the large one in its own
    assert sorted(transfers) == [sum((t.nbytes + 15) // 16 * 16 for t in small[:-1]) + small[-1].nbytes, large.nbytes]
    dump = open_dump(str(tmp_path / "d"))
    recs = {r.key: r for r in dump.records()}
    assert recs.keys() == expected.keys()
    for key, ref in expected.items():
        got = dump.load(recs[key], verify=True)
        assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref.cpu()), key


def test_cuda_graph_capture_is_skipped_and_replays_leave_no_records(tmp_path, capsys):
    model = _model()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"), classes=frozenset({"Sequential"}),
                                             calls=None))
    with torch.no_grad():
        eager = model(x).clone()                       # recorded
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x)                                   # warm-up, eager on a side stream: recorded
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = model(x)                               # captured into the graph: skipped
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(y, eager)  # the graph computes what the eager forward did
    assert h.enabled
    h.close()
    assert capsys.readouterr().err.count("while a CUDA graph was being captured") == 1
    assert len(open_dump(str(tmp_path / "d")).records()) == 2


def test_records_taken_on_two_busy_streams_hold_their_own_values(tmp_path):
    import parity

    h = capture.install(torch.nn.Identity(), CaptureConfig(dump_dir=str(tmp_path / "d"), calls=None))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for i in range(6):
        with torch.cuda.stream(streams[i % 2]):
            torch.cuda._sleep(2_000_000)  # the stream is still busy when the record is taken
            small = torch.full((64, 64), float(i + 1), device="cuda")         # via the arena
            large = torch.full((1 << 19,), float(-i - 1), device="cuda")      # its own copy
            parity.tap(f"small{i}", small)
            parity.tap(f"large{i}", large)
    torch.cuda.synchronize()
    h.close()
    dump = open_dump(str(tmp_path / "d"))
    recs = {r.key: r for r in dump.records()}
    for i in range(6):
        for key, value in ((f"small{i}:tap", i + 1.0), (f"large{i}:tap", -i - 1.0)):
            r = recs[key]
            assert r.stats["absmax"] == abs(value) and r.stats["mean"] == value, key
            assert bool((dump.load(r) == value).all()), key
