"""Op registry selection and the torch ops against direct formulas."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture
def registry(monkeypatch):
    from runners.engine import ops

    for k in list(__import__("os").environ):
        if k.startswith("PARITY_ENGINE_"):
            monkeypatch.delenv(k)
    yield ops, monkeypatch
    for name in ops.OP_NAMES:
        ops._IMPLS[name].pop("fake", None)
    monkeypatch.undo()
    ops.reload()


def test_default_is_torch(registry):
    ops, _ = registry
    ops.reload()
    assert {c.backend for c in ops.describe()} == {"torch"}
    assert ops.backend_status()["torch"] == "available"


def test_unavailable_backend_falls_back(registry):
    ops, mp = registry
    mp.setenv("PARITY_ENGINE_BACKEND", "aiter")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ops.reload()
    status = ops.backend_status()
    if status.get("aiter") != "available":  # off ROCm: `import aiter` fails, never crashes
        assert status["aiter"].startswith("unavailable")
        assert all(c.backend == "torch" and "aiter" in c.note for c in ops.describe())
        assert any("aiter" in str(x.message) for x in w)


def test_per_op_selection(registry):
    ops, mp = registry
    calls = []

    @ops.register("rmsnorm", "fake")
    def fake_rmsnorm(x, weight, eps):
        calls.append(x.shape)
        return ops._IMPLS["rmsnorm"]["torch"](x, weight, eps)

    mp.setenv("PARITY_ENGINE_OP_RMSNORM", "fake")
    ops.reload()
    chosen = {c.op: c.backend for c in ops.describe()}
    assert chosen["rmsnorm"] == "fake" and chosen["rope"] == "torch"
    ops.ops.rmsnorm(torch.ones(2, 4), torch.ones(4), 1e-6)
    assert calls == [(2, 4)]


def test_unknown_op_name(registry):
    ops, _ = registry
    with pytest.raises(KeyError):
        ops.register("no_such_op", "torch")
    with pytest.raises(AttributeError):
        ops.ops.no_such_op


def test_sparse_attention_equals_dense_masked():
    from runners.engine.ops.torch_ops import sparse_attention

    g = torch.Generator().manual_seed(0)
    T, H, D, N = 5, 3, 8, 11
    q, src, sinks = torch.randn(T, H, D, generator=g), torch.randn(N, D, generator=g), torch.randn(H, generator=g)
    idx = torch.randint(0, N, (T, 4), generator=g)
    idx[0, 2:] = -1
    out = sparse_attention(q, [(src, idx[:, :2]), (src, idx[:, 2:])], sinks, 0.3)
    for t in range(T):
        keys = src[idx[t][idx[t] >= 0]]
        logits = torch.cat([(q[t] @ keys.T) * 0.3, sinks[:, None]], dim=1)
        p = logits.softmax(-1)[:, :-1]
        torch.testing.assert_close(out[t], p @ keys)


def test_fused_moe_equals_per_token():
    from runners.engine.ops.torch_ops import fused_moe

    g = torch.Generator().manual_seed(1)
    T, D, I, E, k = 7, 6, 4, 5, 2
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wt = torch.rand(T, k, generator=g)
    out = fused_moe(x, ids, wt, w13, w2, 1.5)
    for t in range(T):
        ref = torch.zeros(D)
        for j in range(k):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            h = F.silu(gate.clamp(max=1.5)) * up.clamp(-1.5, 1.5)
            ref += wt[t, j] * (w2[ids[t, j]] @ h)
        torch.testing.assert_close(out[t], ref)


def test_hc_sinkhorn_is_near_doubly_stochastic():
    from runners.engine.ops.torch_ops import hc_sinkhorn

    g = torch.Generator().manual_seed(2)
    hc, D = 4, 8
    streams = torch.randn(3, hc, D, generator=g)
    fn = 0.1 * torch.randn((2 + hc) * hc, hc * D, generator=g)
    pre, post, comb = hc_sinkhorn(streams, fn, torch.zeros((2 + hc) * hc), torch.ones(3), 20, 1e-6, 1e-6)
    assert pre.shape == (3, hc) and post.shape == (3, hc) and comb.shape == (3, hc, hc)
    torch.testing.assert_close(comb.sum(-2), torch.ones(3, hc), atol=1e-4, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(3, hc), atol=1e-3, rtol=0)
