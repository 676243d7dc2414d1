"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ckpt():
    """The tiny preset synthesized once per session (fp32, seed 0): the same
    folder test_engine_common.tiny_checkpoint() gives modules that need it
    outside a fixture."""
    from pathlib import Path

    from test_engine_common import tiny_checkpoint

    return Path(tiny_checkpoint())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the tiny model's small matmuls are
    much faster that way on a shared 2-core machine; results do not change."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
