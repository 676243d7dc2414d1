"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny preset synthesized once per session (fp32, seed 0)."""
    from reference_models.synth import synthesize

    root = tmp_path_factory.getbasetemp() / "reference-tiny-fp32-seed0"
    if not (root / "synth.json").exists():
        synthesize("tiny", seed=0, out=root, dtype="fp32")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the tiny model's small matmuls are
    much faster that way on a shared 2-core machine; results do not change."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
