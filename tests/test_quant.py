"""Edge values of the shared block-quantization math (parity.quant)."""

import pytest
import torch

from parity import quant as Q

FP8_SUB_MIN = 2.0**-9  # smallest positive e4m3fn subnormal


def test_pow2_scale_ceil_and_rne():
    amax = torch.tensor([448.0, 449.0, 448 * 1.4, 448 * 1.6, 448 * 1.5, 448 * 3.0, 0.0])
    ceil = Q.pow2_scale(amax, Q.FP8_MAX, "ceil")
    rne = Q.pow2_scale(amax, Q.FP8_MAX, "rne")
    assert ceil[:6].tolist() == [1.0, 2.0, 2.0, 2.0, 2.0, 4.0]
    # 1.5 * 2**0 ties to the even exponent (2**1); 1.5 * 2**1 ties down to 2**1.
    assert rne[:6].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    # An all-zero block gets the floor's scale, never 0 or a NaN.
    assert ceil[6].item() == 2.0**-22 and rne[6].item() == 2.0**-22


def test_ue8m0_round_trip():
    codes = torch.arange(0, 255, dtype=torch.uint8)
    scales = Q.ue8m0_decode(codes)
    assert scales[127].item() == 1.0 and scales[128].item() == 2.0 and scales[0].item() == 2.0**-127
    assert torch.equal(Q.ue8m0_encode(scales[1:]), codes[1:])
    assert torch.isnan(Q.ue8m0_decode(torch.tensor([255], dtype=torch.uint8))).all()


def test_fp8_weight_zero_block_and_max():
    w = torch.zeros(256, 256)
    w[128:, 128:] = torch.linspace(-448, 448, 128 * 128).reshape(128, 128)
    q, s = Q.quantize_fp8_weight(w)
    assert s.shape == (2, 2) and s.dtype == torch.uint8
    assert s[1, 1].item() == 127  # amax exactly 448 -> scale 1
    assert (q[:128].float() == 0).all() and (q[:, :128].float() == 0).all()
    deq = Q.dequantize_fp8_weight(q, s)
    assert deq[:128].abs().sum() == 0
    assert deq.abs().max().item() == 448.0


def test_fp8_subnormals_round_to_nearest_even():
    w = torch.zeros(1, 128)
    w[0, 0] = 448.0  # pins the block scale to 1
    w[0, 1:6] = torch.tensor([FP8_SUB_MIN, FP8_SUB_MIN / 2, 3 * FP8_SUB_MIN / 2, 2.0**-7, -FP8_SUB_MIN])
    deq = Q.qdq_fp8_weight(w)
    assert deq[0, :6].tolist() == [448.0, FP8_SUB_MIN, 0.0, 2 * FP8_SUB_MIN, 2.0**-7, -FP8_SUB_MIN]


def test_fp8_round_trip_of_representable_values_is_exact():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (256, 384), generator=g, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0  # drop the NaN encodings
    q = raw.view(Q.FP8_DTYPE)
    q[0::128, 0::128] = torch.tensor(448.0).to(Q.FP8_DTYPE)  # every block reaches 448
    s = torch.randint(110, 140, (2, 3), generator=g, dtype=torch.uint8)
    w = Q.dequantize_fp8_weight(q, s)
    q2, s2 = Q.quantize_fp8_weight(w)
    assert torch.equal(s2, s)
    assert torch.equal(q2.float(), q.float())  # -0.0 and +0.0 compare equal
    assert torch.equal(Q.dequantize_fp8_weight(q2, s2), w)


def test_fp8_weight_shapes_not_multiple_of_block():
    w = torch.randn(130, 200, dtype=torch.bfloat16)
    q, s = Q.quantize_fp8_weight(w)
    assert q.shape == (130, 200) and s.shape == (2, 2)
    deq = Q.qdq_fp8_weight(w)
    assert deq.dtype == torch.bfloat16 and deq.shape == w.shape
    err = (deq.float() - w.float()).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 above the subnormals.
    scale = Q.ue8m0_decode(s).repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :200]
    assert (err <= w.float().abs() * 2.0**-4 + scale * FP8_SUB_MIN).all()
    batched = Q.qdq_fp8_weight(torch.stack([w, 2 * w]))
    assert torch.equal(batched[0], deq) and torch.equal(batched[1], Q.qdq_fp8_weight(2 * w))


def test_fp4_codes_all_values_and_ties():
    values = torch.tensor(Q.FP4_VALUES + tuple(-v for v in Q.FP4_VALUES))
    codes = Q.fp4_encode(values)
    assert codes.tolist() == list(range(8)) + [0] + list(range(9, 16))  # -0.0 -> code 0
    assert torch.equal(Q.fp4_decode(codes), values.abs() * torch.sign(values + 0.0))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.75, -5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0]
    assert Q.fp4_decode(Q.fp4_encode(ties)).tolist() == expected


def test_fp4_packing_order_low_nibble_first():
    codes = torch.tensor([[1, 2, 9, 0, 15]], dtype=torch.uint8)
    packed = Q.pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x09, 0x0F]]
    assert torch.equal(Q.unpack_fp4(packed, 5), codes)


def test_fp4_weight_round_trip_exact_and_negative_nibbles():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 8, 96), generator=g, dtype=torch.uint8)
    codes[..., 0::32] = 7  # each group reaches 6 -> scale survives the round trip
    codes[codes == 8] = 0  # -0.0 is stored canonically as +0
    s = torch.randint(120, 134, (3, 8, 3), generator=g, dtype=torch.uint8)
    w = Q.dequantize_fp4_weight(Q.pack_fp4(codes), s)
    packed, s2 = Q.quantize_fp4_weight(w)
    assert torch.equal(s2, s)
    assert torch.equal(Q.unpack_fp4(packed), codes)
    assert torch.equal(Q.qdq_fp4_weight(w), w)


def test_fp4_weight_padding_and_zero_group():
    w = torch.randn(5, 45)
    w[:, :32] = 0
    packed, s = Q.quantize_fp4_weight(w)
    assert packed.shape == (5, 23) and s.shape == (5, 2)
    deq = Q.dequantize_fp4_weight(packed, s, k=45)
    assert deq.shape == w.shape and (deq[:, :32] == 0).all()
    rel = (deq - w).abs().max() / w.abs().max()
    assert rel < 0.25
    assert torch.equal(Q.qdq_fp4_weight(w), deq)


@pytest.mark.parametrize("rounding", ["ceil", "rne"])
def test_fp4_fast_qdq_matches_packed_path(rounding):
    w = torch.randn(4, 16, 96) * torch.logspace(-3, 3, 96)
    packed, s = Q.quantize_fp4_weight(w, rounding=rounding)
    assert torch.equal(Q.qdq_fp4_weight(w, rounding=rounding), Q.dequantize_fp4_weight(packed, s))


@pytest.mark.parametrize("rounding", ["ceil", "rne"])
def test_fp8_activation_blocks(rounding):
    x = torch.randn(2, 3, 300, dtype=torch.bfloat16)
    q, s = Q.quantize_fp8_act(x, rounding=rounding)
    assert q.shape == x.shape and s.shape == (2, 3, 3) and s.dtype == torch.float32
    assert torch.equal(s, Q.pow2_scale(s, 1.0))  # powers of two
    y = Q.qdq_fp8_act(x, rounding=rounding)
    assert y.dtype == x.dtype
    rel = ((y.float() - x.float()).norm() / x.float().norm()).item()
    # rne may round a block's scale down and saturate its largest values.
    assert 0 < rel < (0.05 if rounding == "ceil" else 0.15)


def test_rne_activation_scale_saturates():
    x = torch.zeros(1, 128)
    x[0, 0] = 448 * 1.4  # rne picks scale 1: the value saturates at 448
    x[0, 1] = 1.0
    assert Q.qdq_fp8_act(x, rounding="rne")[0, :2].tolist() == [448.0, 1.0]
    # ceil picks scale 2: 313.6 rounds to 320 on e4m3's grid of 32 in [256, 512).
    assert Q.qdq_fp8_act(x, rounding="ceil")[0, :2].tolist() == [640.0, 1.0]


def test_bad_rounding_is_rejected():
    with pytest.raises(ValueError):
        Q.qdq_fp8_act(torch.ones(4), rounding="floor")
