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
