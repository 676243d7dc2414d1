"""The engine's batch-invariant numerics (runners/engine/ops/invariant.py).

What the module guarantees, asserted as such: a row's result does not depend
on the rows beside it, on padding after it, on the GEMM's blocking or on the
CPU capability and thread count; matrix products are exact before their one
rounding; every function is at least as accurate as torch's own. The engine
built from them is then checked under every ATen capability this CPU offers,
with one and two threads, in a subprocess each (tests/invariance_probe.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runners.engine.ops import invariant as inv

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "tiny-gsm8k"


def _rand(*shape, dtype=torch.float32, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


ELEMENTWISE = [inv.exp, inv.sigmoid, inv.silu, inv.softplus, lambda x: inv.rsqrt(x.abs() + 0.5)]
ROWWISE = [lambda x: inv.sum(x, -1), lambda x: inv.mean(x, -1), lambda x: inv.softmax(x, -1),
           lambda x: inv.linear(x, _rand(19, x.shape[-1], dtype=x.dtype, seed=1))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", ELEMENTWISE + ROWWISE)
def test_a_row_computes_the_same_in_any_batch(fn, dtype):
    x = _rand(67, 45, dtype=dtype)  # odd sizes: no length is a multiple of a vector width
    whole = fn(x)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 20), slice(66, 67)):
        assert torch.equal(fn(x[rows]), whole[rows])
    perm = torch.randperm(67, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fn(x[perm]), whole[perm])


def test_sums_ignore_trailing_zeros_and_agree_with_float64():
    x = _rand(13, 37)
    padded = torch.cat([x, torch.zeros(13, 91)], dim=1)
    assert torch.equal(inv.sum(x, 1), inv.sum(padded, 1))
    assert torch.equal(inv.sum(x.t(), 0), inv.sum(x, 1))
    err = (inv.sum(x, 1).double() - x.double().sum(1)).abs().max()
    assert err <= 37 * 2.0 ** -24 * x.abs().sum(1).max()  # the pairwise tree's bound
    # softmax over a row padded with -inf (masked entries) is the row's own softmax
    masked = torch.cat([x, torch.full((13, 9), -math.inf)], dim=1)
    assert torch.equal(inv.softmax(masked, -1)[:, :37], inv.softmax(x, -1))


def test_matmul_is_exact_before_its_rounding():
    a, b = _rand(9, 300), _rand(300, 7, seed=2)
    b1 = inv._right_slice(b.double())
    stacked, n = inv._left_slices(a.double(), 300)
    gemm = stacked @ b1
    # the same dot products summed one term at a time, last term first
    manual = torch.zeros_like(gemm)
    for k in reversed(range(300)):
        manual += stacked[:, k:k + 1] * b1[k:k + 1, :]
    assert torch.equal(gemm, manual)
    # the slices lose less than float32 rounding of the inputs would
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    assert ((inv.matmul(a, b).double() - exact).abs() <= 2.0 ** -23 * scale + 2.0 ** -24 * exact.abs()).all()
    assert ((inv.linear(a, b.t().contiguous()).double() - exact).abs() <= 2.0 ** -23 * scale
            + 2.0 ** -24 * exact.abs()).all()


def test_masked_keys_must_be_zero_to_stay_out_of_a_row():
    # b's rounding follows each column's largest entry: a large value in a
    # masked position changes it, a zero does not (why sparse_attention zeroes them)
    p = torch.softmax(_rand(3, 8), -1)
    p[:, 6:] = 0
    v = _rand(8, 5, seed=4)
    clean = inv.matmul(p, v.masked_fill(torch.arange(8).unsqueeze(1) >= 6, 0))
    assert torch.equal(clean, inv.matmul(p[:, :6], v[:6]))
    v_big = v.clone()
    v_big[6:] = 1e6
    assert not torch.equal(inv.matmul(p, v_big), clean)


def test_transcendentals_are_as_accurate_as_torch():
    x = _rand(4000, dtype=torch.float64, scale=30)
    assert ((inv._exp64(x) - torch.exp(x)).abs() <= 4e-16 * torch.exp(x)).all()
    y = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e4 + 1e-9
    assert ((inv._log64(y) - torch.log(y)).abs() <= 4e-16 * torch.log(y).abs().clamp_min(1)).all()
    ang = _rand(4000, dtype=torch.float64, scale=5000)
    s, c = inv._sincos64(ang)
    assert (s - ang.sin()).abs().max() < 1e-12 and (c - ang.cos()).abs().max() < 1e-12
    xf = _rand(4000, scale=10)
    for ours, ref in ((inv.exp, torch.exp), (inv.sigmoid, torch.sigmoid), (inv.silu, torch.nn.functional.silu),
                      (inv.softplus, torch.nn.functional.softplus)):
        truth = ref(xf.double())
        assert ((ours(xf).double() - truth).abs() <= (ref(xf).double() - truth).abs() + 2.0 ** -24 * truth.abs()).all()
    edge = torch.tensor([-math.inf, math.inf, math.nan, -1000.0, 1000.0, 0.0])
    for ours, ref in ((inv.exp, torch.exp), (inv.sigmoid, torch.sigmoid), (inv.softplus, torch.nn.functional.softplus)):
        assert torch.equal(ours(edge).isnan(), ref(edge).isnan())
        keep = ~ref(edge).isnan()
        assert torch.equal(ours(edge)[keep], ref(edge)[keep])


def test_switched_off_it_is_plain_torch(monkeypatch):
    monkeypatch.setattr(inv, "_SETTING", "0")
    x = _rand(5, 7)
    assert torch.equal(inv.sigmoid(x), torch.sigmoid(x)) and torch.equal(inv.sum(x, 1), x.sum(1))
    w = _rand(3, 7, seed=5)
    assert torch.equal(inv.linear(x, w), torch.nn.functional.linear(x, w))


def _capabilities() -> list[str]:
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if best not in order:  # another architecture: what it has, and the generic kernels
        return ["default"]
    return [c.lower() for c in order[:order.index(best) + 1]]


def _probe(cap: str, threads: int) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("PARITY_ENGINE_BATCH_INVARIANT", None)
    env.pop("PARITY_DUMP_DIR", None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "invariance_probe.py"), str(CKPT), "--threads",
                        str(threads)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="tiny checkpoint not committed")
def test_engine_is_batch_invariant_under_every_capability_and_thread_count():
    combos = [(c, t) for c in _capabilities() for t in (1, 2)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(combos, pool.map(lambda ct: _probe(*ct), combos)))
    for (cap, threads), res in results.items():
        assert res["capability"].lower() == cap and res["threads"] == threads, res
        for precision, bad in res["mismatches"].items():
            assert bad == [], f"{cap}, {threads} threads, {precision}: {bad}"
    # the primitives give the same bits whatever the capability and thread count
    assert len({res["primitives"] for res in results.values()}) == 1, results
