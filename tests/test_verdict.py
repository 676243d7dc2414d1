"""Verdicts, and the experiment behind the default thresholds: a small
residual MLP stack (RMSNorm -> linear -> SiLU -> linear -> residual, random
weights, O(1) activations) run in fp32 as the reference and in bf16 as the
target. Numbers measured with it are in docs/metrics.md."""

import math

import pytest
import torch

from parity.compare.metrics import pair_metrics
from parity.compare.verdict import (THRESHOLDS, Thresholds, Verdict, floor_verdict,
                                    thresholds_for, verdict_for)
from parity.errors import ParityError

D, F, LAYERS, T = 256, 512, 4, 64
BUG_LAYER = 2


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(norm=1 + 0.1 * torch.randn(D, generator=g),
                 up=torch.randn(F, D, generator=g) / D ** 0.5,
                 down=torch.randn(D, F, generator=g) / F ** 0.5) for _ in range(LAYERS)]


def _rmsnorm(h, w, upcast_weight=False):
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
    if upcast_weight:                      # a fused kernel: weight applied before the cast
        return (y * w.float()).to(h.dtype)
    return y.to(h.dtype) * w.to(h.dtype)


def _linear(x, w, split_k):
    if not split_k:
        return x @ w.T
    k = x.shape[-1] // 2                   # another reduction order, as a split-K kernel
    return x[:, :k] @ w[:, :k].T + x[:, k:] @ w[:, k:].T


def run_stack(x, ws, dtype, *, noise=0.0, fused=False, split_k=False, downcast_layer=None):
    """Records {name: tensor} of one forward. noise: relative weight noise on
    layer BUG_LAYER's up projection; fused, split_k: legitimate kernel
    variants; downcast_layer: an fp32 run that computes one MLP in bf16 by
    mistake."""
    h, out = x.to(dtype), {}
    for i, w in enumerate(ws):
        up = w["up"]
        if noise and i == BUG_LAYER:
            g = torch.Generator().manual_seed(99)
            up = up * (1 + noise * torch.randn(up.shape, generator=g))
        dt = torch.bfloat16 if i == downcast_layer else dtype
        u = _linear(_rmsnorm(h.to(dt), w["norm"], fused), up.to(dt), split_k)
        act = torch.nn.functional.silu(u.float()).to(dt) if fused else torch.nn.functional.silu(u)
        mlp = _linear(act, w["down"].to(dt), split_k).to(dtype)
        h = h + mlp
        out[f"model.layers.{i}.mlp"] = mlp
        out[f"model.layers.{i}"] = h
    return out


@pytest.fixture(scope="module")
def stack():
    ws = _weights()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    return x, ws


def _verdicts(target, ref):
    return {k: verdict_for(pair_metrics(target[k], ref[k])) for k in ref}


def _first_bad(verdicts):
    return next(((k, v) for k, v in verdicts.items() if v.status != "pass"), None)


def test_bf16_rounding_alone_passes(stack):
    x, ws = stack
    ref = run_stack(x, ws, torch.float32)
    v = _verdicts(run_stack(x, ws, torch.bfloat16), ref)
    assert _first_bad(v) is None, v
    v = _verdicts(run_stack(x, ws, torch.bfloat16, fused=True), ref)
    assert _first_bad(v) is None, v


def test_three_percent_weight_noise_fails_at_that_layer(stack):
    x, ws = stack
    ref = run_stack(x, ws, torch.float32)
    v = _verdicts(run_stack(x, ws, torch.bfloat16, noise=0.03), ref)
    key, first = _first_bad(v)
    assert key == f"model.layers.{BUG_LAYER}.mlp"
    assert first.status == "fail" and first.reason.startswith("rel_l2 ") and "(bf16 fail)" in first.reason
    assert v[f"model.layers.{BUG_LAYER}"].status in ("warn", "fail")   # diluted by the residual


def _floor_verdicts(target, ref, floor, dtype):
    out = {}
    for k in floor:
        et = pair_metrics(target[k], floor[k])["rel_l2"]
        er = pair_metrics(ref[k], floor[k])["rel_l2"]
        out[k] = floor_verdict(et, er, dtype)
    return out


def test_floor_mode_bf16(stack):
    x, ws = stack
    floor = run_stack(x, ws, torch.float32)
    ref = run_stack(x, ws, torch.bfloat16)
    ok = _floor_verdicts(run_stack(x, ws, torch.bfloat16, fused=True), ref, floor, torch.bfloat16)
    assert all(v.status == "pass" for v in ok.values()), ok
    bug = _floor_verdicts(run_stack(x, ws, torch.bfloat16, noise=0.03), ref, floor, "bfloat16")
    assert _first_bad(bug)[0] == f"model.layers.{BUG_LAYER}.mlp"


def test_floor_mode_fp32_catches_a_bug_the_size_of_bf16_noise(stack):
    x, ws = stack
    floor = run_stack(x, ws, torch.float64)
    ref = run_stack(x, ws, torch.float32)
    legit = run_stack(x, ws, torch.float32, split_k=True)
    ok = _floor_verdicts(legit, ref, floor, torch.float32)
    assert all(v.status == "pass" for v in ok.values()), ok
    buggy = run_stack(x, ws, torch.float32, downcast_layer=BUG_LAYER)
    bug = _floor_verdicts(buggy, ref, floor, torch.float32)
    key = f"model.layers.{BUG_LAYER}.mlp"
    assert _first_bad(bug)[0] == key and bug[key].status == "fail"
    # The same error is within what bf16 thresholds accept: only the floor sees it.
    assert pair_metrics(buggy[key], floor[key])["rel_l2"] < THRESHOLDS["bfloat16"].rel_l2_warn


def _m(rel, cos=None, **kw):
    base = {"shape_mismatch": False, "dtype_a": "bfloat16", "dtype_b": "float32", "rel_l2": rel,
            "cos": 1 - rel * rel / 2 if cos is None else cos, "frac_equal": 0.0,
            "nan_a": 0, "nan_b": 0, "inf_a": 0, "inf_b": 0, "nonfinite_mismatch": 0}
    return {**base, **kw}


def test_fixed_thresholds_and_reasons():
    assert verdict_for(_m(3.1e-2)) == Verdict("fail", "rel_l2 3.1e-02 > 2.0e-02 (bf16 fail)")
    assert verdict_for(_m(1.5e-2)).status == "warn"
    assert verdict_for(_m(5e-3)) == Verdict("pass", "rel_l2 5.0e-03 <= 1.0e-02 (bf16)")
    assert verdict_for(_m(0.0, 1.0, frac_equal=1.0)).reason == "identical"
    # fp32 pair: the fp32 row.
    assert verdict_for(_m(5e-5, dtype_a="float32")).status == "warn"
    assert verdict_for(_m(2e-4, dtype_a="float32")).reason.endswith("(fp32 fail)")
    # cos alone (a scale-free comparison): loosen rel_l2 only.
    direction = Thresholds("dir", math.inf, math.inf, 0.9999, 0.999, 3.0, 0.0)
    assert verdict_for(_m(0.5, cos=0.9995), thresholds=direction).status == "warn"
    assert verdict_for(_m(0.5, cos=0.99), thresholds=direction).reason.startswith("cos 0.990000 < ")
    table = {**THRESHOLDS, "bfloat16": direction}
    assert verdict_for(_m(0.5, cos=0.99999), thresholds=table).status == "pass"
    # fp64: the cosine cannot resolve such angles; rel_l2 decides.
    assert verdict_for(_m(1e-15, cos=1 - 2 ** -52, dtype_a="float64", dtype_b="float64")).status == "pass"


def test_shape_and_nonfinite_fail_clearly():
    v = verdict_for({"shape_mismatch": True, "shape_a": (2, 3), "shape_b": (3, 2)})
    assert v == Verdict("fail", "shape (2, 3) vs reference (3, 2)")
    b = torch.randn(100)
    a = b.clone()
    a[7] = float("nan")
    v = verdict_for(pair_metrics(a, b))
    assert v.status == "fail" and v.reason.startswith("target has NaN/Inf, reference none")
    v = verdict_for(pair_metrics(b, a))
    assert v.status == "fail" and v.reason.startswith("reference has NaN/Inf")
    c = b.clone()
    c[8] = float("inf")
    assert verdict_for(pair_metrics(a, c)).reason.startswith("NaN/Inf differ at 2 positions")
    v = verdict_for(pair_metrics(a, a.clone()))
    assert v.status == "warn" and "same 1 positions" in v.reason


def test_integer_ids():
    ids = torch.arange(512).reshape(64, 8) % 64
    assert verdict_for(pair_metrics(ids, ids)) == Verdict("pass", "identical")
    one = ids.clone()
    one[5, 3] = 63
    v = verdict_for(pair_metrics(one, ids))
    assert v.status == "warn" and v.reason.startswith("0.2% of positions differ")
    many = ids.clone()
    many[:8] = 0
    assert verdict_for(pair_metrics(many, ids)).status == "fail"


def test_thresholds_for_picks_less_precise_float():
    assert thresholds_for("bfloat16", "float32").label == "bf16"
    assert thresholds_for(torch.float16, torch.float32).label == "fp16"
    assert thresholds_for("float32", "int64").label == "fp32"
    assert thresholds_for("float8_e4m3fn", "bfloat16").label == "fp8"
    assert thresholds_for("float64", "float64").label == "fp64"
    only_bf16 = {"bfloat16": Thresholds("mine", 0.1, 0.2, 0.0, 0.0, 3.0, 0.0)}
    assert thresholds_for("bfloat16", "float32", only_bf16).label == "mine"
    assert thresholds_for("float32", "float32", only_bf16).label == "fp32"      # falls back


def test_the_runs_precision_sets_the_thresholds_when_coarser():
    # an fp32 record of a bf16 run carries bf16 rounding from upstream
    t = thresholds_for("float32", "float32", precision="bf16")
    assert t.label == "bf16 run" and t.rel_l2_fail == THRESHOLDS["bfloat16"].rel_l2_fail
    assert thresholds_for("bfloat16", "bfloat16", precision="bf16").label == "bf16"
    assert thresholds_for("bfloat16", "float32", precision="fp32").label == "bf16"  # the dtype is coarser
    assert thresholds_for("float32", None, precision="fp8").label == "fp8 run"
    assert thresholds_for("float32", None, precision="no-such").label == "fp32"
    v = verdict_for(_m(5e-3, dtype_a="float32", dtype_b="float32"), precision="bf16")
    assert v == Verdict("pass", "rel_l2 5.0e-03 <= 1.0e-02 (bf16 run)")
    assert verdict_for(_m(5e-3, dtype_a="float32", dtype_b="float32")).status == "fail"


def test_compare_judges_by_the_runs_precision(tmp_path):
    import json

    from dumpgen import _record

    from parity import compare_dumps
    from parity.store.writer import DumpWriter

    def dump(name, x, precision):
        w = DumpWriter(str(tmp_path / name), run_info={"precision": precision})
        w.write_batch([_record(w, "m", "output", None, "prefill", 0, {}, x)])
        w.close()
        return tmp_path / name

    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    y = x * (1 + 5e-3)
    res = compare_dumps(dump("ref", x, "bf16"), dump("tgt", y, "bf16"))
    assert res.table["verdict"].tolist() == ["pass"] and "(bf16 run)" in res.table["reason"].iat[0]
    res = compare_dumps(dump("ref32", x, "fp32"), dump("tgt32", y, "fp32"))
    assert res.table["verdict"].tolist() == ["fail"] and "(fp32 fail)" in res.table["reason"].iat[0]
    assert json.loads((tmp_path / "ref" / "run.json").read_text())["precision"] == "bf16"


def test_floor_verdict_defaults_and_overrides():
    assert floor_verdict(3.0e-2, 1.0e-2, "bfloat16").status == "pass"    # 3 x 1e-2 + 3.9e-3
    v = floor_verdict(3.5e-2, 1.0e-2, torch.bfloat16)
    assert v.status == "fail" and v.reason == "rel_l2 to floor 3.5e-02 > 3 x 1.0e-02 + 3.9e-03 (bf16 floor)"
    assert floor_verdict(3.0e-6, 1.0e-6, torch.float32).status == "fail"  # m = 2 for fp32, atol 9.5e-7
    assert floor_verdict(3.0e-6, 1.0e-6, torch.float32, m=3).status == "pass"
    # both sides at fp32 rounding level, independently: not a finding
    assert floor_verdict(4.0e-7, 1.0e-7, torch.float32).status == "pass"
    assert floor_verdict(1e-3, 0.0, "float16", atol=1e-3).status == "pass"
    assert floor_verdict(float("nan"), 1e-3, "bfloat16").status == "fail"
    with pytest.raises(ParityError):
        floor_verdict(0.1, 0.1, torch.int64)
