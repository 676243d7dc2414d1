import math

import pytest
import torch

from parity.compare.metrics import pair_metrics, summary_stats, ulp_distance
from parity.errors import ParityError

INF, NAN = float("inf"), float("nan")


def _ref(a, b):
    """Textbook float64 metrics over the whole tensors (no chunks)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    d = x - y
    i = int(d.abs().argmax())
    return {
        "cos": float(x @ y / (x.norm() * y.norm())),
        "rel_l2": float(d.norm() / y.norm()),
        "sqnr_db": float(10 * torch.log10(y.pow(2).sum() / d.pow(2).sum())),
        "max_abs": float(d.abs().max()),
        "max_abs_flat": i,
        "mean_abs": float(d.abs().mean()),
        "ref_absmax": float(y.abs().max()),
    }


def _py_ordered(bits: int, nbits: int) -> int:
    sign = 1 << (nbits - 1)
    bits &= (1 << nbits) - 1
    return -(bits & (sign - 1)) if bits & sign else bits


def _py_ulp(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> list:
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dt).bits // 8]
    nb = torch.finfo(dt).bits
    ia = a.to(dt).reshape(-1).view(it).tolist()
    ib = b.to(dt).reshape(-1).view(it).tolist()
    return [abs(_py_ordered(p, nb) - _py_ordered(q, nb)) for p, q in zip(ia, ib)]


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 22])
def test_matches_textbook_float64(chunk):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(37, 53, generator=g)
    a = b + 0.05 * torch.randn(37, 53, generator=g)
    m, r = pair_metrics(a, b, chunk_elems=chunk), _ref(a, b)
    for k in ("cos", "rel_l2", "sqnr_db", "max_abs", "mean_abs", "ref_absmax"):
        assert m[k] == pytest.approx(r[k], rel=1e-12, abs=1e-15), k
    assert m["max_abs_index"] == divmod(r["max_abs_flat"], 53)
    assert m["shape_mismatch"] is False and m["numel"] == 37 * 53 == m["n_compared"]
    assert (m["dtype_a"], m["dtype_b"]) == ("float32", "float32")
    assert m["nan_a"] == m["nan_b"] == m["inf_a"] == m["inf_b"] == m["nonfinite_mismatch"] == 0


def test_non_contiguous_and_small_chunks_agree_with_contiguous():
    g = torch.Generator().manual_seed(1)
    b = torch.randn(6, 50, 40, generator=g).bfloat16()
    a = (b.float() + 0.01 * torch.randn(6, 50, 40, generator=g)).bfloat16()
    at, bt = a.transpose(0, 2), b.transpose(0, 2)          # [40, 50, 6], strided
    ref = pair_metrics(at.contiguous(), bt.contiguous())
    for chunk in (5, 64, 3000):                            # < a row, rows, blocks of rows
        m = pair_metrics(at, bt, chunk_elems=chunk)
        assert m["max_abs_index"] == ref["max_abs_index"]
        for k in ("cos", "rel_l2", "max_abs", "mean_abs", "frac_equal", "max_ulp", "frac_ulp_gt1"):
            assert m[k] == pytest.approx(ref[k], rel=1e-12), k
    i = ref["max_abs_index"]
    assert ref["max_abs"] == abs(float(at[i]) - float(bt[i]))


def test_bf16_pair_bits_and_ulps_match_brute_force():
    g = torch.Generator().manual_seed(2)
    b = torch.randn(4000, generator=g)
    b[:50] = 0.0
    b[50:100] *= 1e-39                                      # bf16 subnormals
    a = (b + 0.004 * torch.randn(4000, generator=g)).bfloat16()
    a[:10] = -0.0                                           # -0 vs +0: equal value, other bits
    b = b.bfloat16()
    m = pair_metrics(a, b, chunk_elems=333)
    ulps = _py_ulp(a, b, torch.bfloat16)
    assert m["ulp_dtype"] == "bfloat16"
    assert m["max_ulp"] == max(ulps)
    assert m["frac_ulp_gt1"] == pytest.approx(sum(u > 1 for u in ulps) / 4000)
    bits_equal = (a.view(torch.int16) == b.view(torch.int16)).sum().item()
    assert m["frac_equal"] == pytest.approx(bits_equal / 4000)
    assert ulps[:10] == [0] * 10 and bits_equal < 4000 - 10 + 1


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
def test_ulps_with_large_sign_flips_in_some_blocks(dt):
    # Blocks whose opposite-sign pairs are all small take a narrow integer
    # path; flips of large values (|o_a| + |o_b| past the integer range)
    # must take the wide one. Both must agree with brute force.
    g = torch.Generator().manual_seed(6)
    b = 4 * torch.randn(3000, generator=g)
    a = b + 0.01 * torch.randn(3000, generator=g)
    a[1234] = -b[1234] if abs(b[1234]) > 2 else -3.0
    a[2999] = -60000.0 if dt is torch.float16 else -1e30
    b[2999] = 60000.0 if dt is torch.float16 else 1e30
    a, b = a.to(dt), b.to(dt)
    ulps = _py_ulp(a, b, dt)
    for chunk in (500, 1 << 22):
        m = pair_metrics(a, b, chunk_elems=chunk)
        assert m["max_ulp"] == max(ulps)
        assert m["frac_ulp_gt1"] == pytest.approx(sum(u > 1 for u in ulps) / 3000)


def test_mixed_dtypes_round_to_less_precise_and_compare_values():
    b = torch.tensor([1.0, 1.0 + 2 ** -8, 3.0, -2.0], dtype=torch.float32)
    a = b.bfloat16()                                        # 1+2^-8 rounds to 1.0 (ties to even)
    m = pair_metrics(a, b)
    assert m["ulp_dtype"] == "bfloat16"
    assert m["max_ulp"] == 0 and m["frac_ulp_gt1"] == 0.0
    assert m["frac_equal"] == 0.75                          # values, not bits
    assert m["max_abs"] == 2 ** -8 and m["max_abs_index"] == (1,)
    # fp16 vs bf16: bf16 has the larger epsilon.
    assert pair_metrics(b.half(), b.bfloat16())["ulp_dtype"] == "bfloat16"


def test_ulp_distance_edge_values():
    f32 = torch.float32
    one = torch.tensor([1.0], dtype=f32)
    nxt = torch.nextafter(one, torch.tensor([2.0]))
    assert ulp_distance(one, nxt).tolist() == [1]
    tiny = torch.tensor([torch.finfo(f32).smallest_normal * 2 ** -23])   # smallest subnormal
    assert ulp_distance(tiny, -tiny).tolist() == [2]
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])).tolist() == [0]
    assert ulp_distance(torch.tensor([1.0]), torch.tensor([2.0]), torch.bfloat16).tolist() == [128]
    assert ulp_distance(torch.tensor([1.0, NAN]), torch.tensor([INF, 1.0])).tolist() == [-1, -1]
    f64 = torch.float64
    d1 = torch.tensor([1.0], dtype=f64)
    assert ulp_distance(d1, torch.nextafter(d1, torch.tensor([2.0], dtype=f64))).tolist() == [1]
    assert ulp_distance(d1, -d1).tolist() == [2 * 0x3FF0000000000000]
    big = torch.tensor([torch.finfo(f64).max], dtype=f64)
    assert ulp_distance(big, -big).tolist() == [2 ** 63 - 1]             # saturates
    with pytest.raises(ParityError):
        ulp_distance(one, torch.ones(2))


def test_fp64_pair_ulps_exact():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(500, dtype=torch.float64, generator=g)
    a = b + 1e-15 * torch.randn(500, dtype=torch.float64, generator=g)
    m = pair_metrics(a, b, chunk_elems=64)
    ulps = _py_ulp(a, b, torch.float64)
    assert m["max_ulp"] == max(ulps) and m["ulp_dtype"] == "float64"
    assert m["frac_ulp_gt1"] == pytest.approx(sum(u > 1 for u in ulps) / 500)


def test_zero_special_cases():
    z, o = torch.zeros(8), torch.ones(8)
    both = pair_metrics(z, z)
    assert (both["cos"], both["rel_l2"], both["sqnr_db"]) == (1.0, 0.0, INF)
    assert both["max_abs_index"] is None and both["frac_equal"] == 1.0
    ref0 = pair_metrics(o, z)
    assert (ref0["cos"], ref0["rel_l2"], ref0["sqnr_db"]) == (0.0, INF, -INF)
    tgt0 = pair_metrics(z, o)
    assert (tgt0["cos"], tgt0["rel_l2"], tgt0["sqnr_db"]) == (0.0, 1.0, 0.0)
    same = pair_metrics(o.bfloat16(), o.bfloat16())
    assert (same["cos"], same["rel_l2"], same["sqnr_db"], same["max_ulp"]) == (1.0, 0.0, INF, 0)
    neg = pair_metrics(-o, o)
    assert neg["cos"] == -1.0 and neg["rel_l2"] == 2.0


def test_empty_and_scalar():
    e = pair_metrics(torch.empty(0, 4), torch.empty(0, 4))
    assert e["numel"] == 0 and e["frac_equal"] == 1.0 and e["rel_l2"] == 0.0 and e["cos"] == 1.0
    s = pair_metrics(torch.tensor(2.0), torch.tensor(1.0))
    assert s["max_abs"] == 1.0 and s["max_abs_index"] == () and s["rel_l2"] == 1.0


def test_nonfinite_excluded_counted_and_mismatches_reported():
    b = torch.tensor([1.0, 2.0, 3.0, NAN, INF, INF, -INF, 4.0])
    a = torch.tensor([1.0, NAN, 3.5, NAN, INF, -INF, -INF, INF])
    m = pair_metrics(a, b, chunk_elems=3)
    assert (m["nan_a"], m["nan_b"], m["inf_a"], m["inf_b"]) == (2, 1, 4, 3)
    # position 1 (NaN vs 2), 5 (-inf vs +inf), 7 (inf vs 4): mismatched;
    # 3 (NaN/NaN), 4 (+inf/+inf), 6 (-inf/-inf): agree.
    assert m["nonfinite_mismatch"] == 3
    assert m["n_compared"] == 2                               # positions 0 and 2
    r = _ref(torch.tensor([1.0, 3.5]), torch.tensor([1.0, 3.0]))
    assert m["rel_l2"] == pytest.approx(r["rel_l2"]) and m["cos"] == pytest.approx(r["cos"])
    assert m["max_abs"] == 0.5 and m["max_abs_index"] == (2,) and m["mean_abs"] == pytest.approx(0.25)
    assert m["max_ulp"] == 1 << 21                             # 3.5 vs 3.0 in fp32, NaN/Inf not counted
    assert m["frac_equal"] == pytest.approx(4 / 8)            # bitwise: 0, 3, 4, 6


def test_nan_on_one_side_in_an_otherwise_identical_tensor():
    b = torch.randn(1000).bfloat16()
    a = b.clone()
    a[123] = NAN
    m = pair_metrics(a, b, chunk_elems=100)
    assert m["nan_a"] == 1 and m["nan_b"] == 0 and m["nonfinite_mismatch"] == 1
    assert m["rel_l2"] == 0.0 and m["n_compared"] == 999 and m["frac_equal"] == 0.999
    same_nan = pair_metrics(a, a.clone())
    assert same_nan["nonfinite_mismatch"] == 0 and same_nan["nan_a"] == same_nan["nan_b"] == 1
    assert same_nan["frac_equal"] == 1.0


def test_shape_mismatch_is_reported_not_raised():
    m = pair_metrics(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bfloat16))
    assert m["shape_mismatch"] is True
    assert (m["shape_a"], m["shape_b"]) == ((2, 3), (3, 2))
    assert m["dtype_b"] == "bfloat16" and "rel_l2" not in m


def test_integer_ids():
    b = torch.tensor([[3, 7, 1], [0, 5, 9]])
    a = torch.tensor([[3, 7, 2], [0, 5, 9]], dtype=torch.int32)
    m = pair_metrics(a, b)
    assert m["frac_equal"] == pytest.approx(5 / 6)
    assert m["max_abs"] == 1.0 and m["max_abs_index"] == (0, 2)
    assert m["cos"] is None and m["rel_l2"] is None and m["max_ulp"] is None
    assert m["ref_absmax"] == 9.0
    assert pair_metrics(b, b)["frac_equal"] == 1.0
    mixed = pair_metrics(b.float(), b)                        # float vs int: values, no ULPs
    assert mixed["frac_equal"] == 1.0 and mixed["max_ulp"] is None and mixed["rel_l2"] == 0.0


def test_memory_mapped_input(tmp_path):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10_000, generator=g).bfloat16()
    p = tmp_path / "x.bin"
    x.view(torch.int16).numpy().tofile(p)
    mm = torch.from_file(str(p), shared=False, size=10_000, dtype=torch.bfloat16)
    m = pair_metrics(mm, x, chunk_elems=4096)
    assert m["frac_equal"] == 1.0 and m["rel_l2"] == 0.0


def test_summary_stats():
    g = torch.Generator().manual_seed(5)
    x = 100 + torch.randn(3000, generator=g)                 # |mean| >> std
    s = summary_stats(x)
    xd = x.double()
    assert s["mean"] == pytest.approx(float(xd.mean()), rel=1e-12)
    assert s["std"] == pytest.approx(float(xd.std(correction=0)), rel=1e-9)
    assert s["l2"] == pytest.approx(float(xd.norm()), rel=1e-12)
    assert s["absmax"] == float(xd.abs().max()) and s["nan"] == s["inf"] == 0
    y = torch.tensor([1.0, NAN, -3.0, INF, -INF])
    assert summary_stats(y) == {"absmax": 3.0, "mean": -1.0, "std": 2.0,
                                "l2": pytest.approx(math.sqrt(10)), "nan": 1, "inf": 2}
    assert summary_stats(torch.full((4,), NAN)) == {"absmax": 0.0, "mean": 0.0, "std": 0.0,
                                                    "l2": 0.0, "nan": 4, "inf": 0}
    assert summary_stats(torch.empty(0))["l2"] == 0.0
    assert summary_stats(torch.tensor([[1, -4], [2, 3]]).t())["absmax"] == 4.0


@pytest.mark.parametrize("x", [
    torch.randn(3, (1 << 18) + 7, generator=torch.Generator().manual_seed(1)).bfloat16(),  # several blocks
    torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e30,
    torch.arange(-5, 10), torch.tensor([True, False, True]), torch.tensor(2.5, dtype=torch.float16),
    torch.randn(6, 4, generator=torch.Generator().manual_seed(3)).t()])
def test_cpu_fast_summary_matches_the_general_path(x):
    from parity.store.stats import stats_vector_cpu, stats_vector_torch

    fast, ref = stats_vector_cpu(x), stats_vector_torch(x)
    assert fast is not None
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=0.0)


def test_cpu_fast_summary_counts_non_finite_like_the_general_path():
    from parity.store.stats import stats_vector_cpu, stats_vector_torch

    x = torch.linspace(-3, 5, 3 << 18)
    x[(1 << 18) + 3] = NAN  # in the second block
    x[7], x[-1] = INF, -INF
    torch.testing.assert_close(stats_vector_cpu(x), stats_vector_torch(x), rtol=1e-12, atol=1e-9)
    assert stats_vector_cpu(x)[3:5].tolist() == [1.0, 2.0]
    big = torch.tensor([1e200, 1.0], dtype=torch.float64)  # its square overflows float64
    assert stats_vector_cpu(big)[2] == stats_vector_torch(big)[2] == INF


def test_block_workers_are_deterministic_and_leave_torch_threads_alone():
    g = torch.Generator().manual_seed(7)
    n = 3 * (1 << 18) + 11                                    # four blocks, the last one short
    b = torch.randn(n, generator=g).bfloat16()
    a = (b.float() + 0.02 * torch.randn(n, generator=g)).bfloat16()
    before = torch.get_num_threads()
    runs = [pair_metrics(a, b, threads=t) for t in (1, 2, 3, 2)]
    assert torch.get_num_threads() == before
    assert runs[1] == runs[2] == runs[3]                      # merged in block order
    for k in ("cos", "rel_l2", "mean_abs"):
        assert runs[0][k] == pytest.approx(runs[1][k], rel=1e-13)
    for k in ("max_abs", "max_abs_index", "frac_equal", "max_ulp", "frac_ulp_gt1", "ref_absmax"):
        assert runs[0][k] == runs[1][k], k
    r = _ref(a, b)
    assert runs[1]["rel_l2"] == pytest.approx(r["rel_l2"], rel=1e-12)
    assert runs[1]["max_abs_index"] == (r["max_abs_flat"],)
