"""The bug zoo (runners/engine/faults.py): every fault, injected through
PARITY_ENGINE_FAULT, is found by the parity command meant for it, at the
place where it sits; the clean engine raises no alarm.

Layer faults: layer-bisect names the first layer the fault touches and the
sub-module where it is injected. Slot faults: slot-invariance names the
slots and the layer, while the same engine on one sequence agrees with the
reference. The precision fault: the noise floor (fp64 reference) names it.
Every run is the tiny committed checkpoint, a prompt or two, one or two
decode steps (docs/bug-zoo.md has the table these tests pin down).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from runners.demo import BUILTIN_QUESTIONS

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "tiny-gsm8k"
# Two questions of 43 and 42 tokens: longer than the sliding window (16),
# more CSA entries (ratio 4) than index_topk (8), one cache block each.
PROMPTS = [f"Question: {q['question']}\nAnswer:" for q in BUILTIN_QUESTIONS[:2]]
PRESET = "deepseek_v4"

pytestmark = [pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="tiny checkpoint not committed"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module", autouse=True)
def _no_fault_left_behind():
    # The active fault is module state set by the last Engine built; tests that
    # drive metadata or the cache without an Engine must not inherit one.
    yield
    from runners.engine import faults

    faults.load("")


def _side(tmp_path, name, prompts=PROMPTS[:1], *, fault=None, steps=1, **kw):
    from runners.side_by_side import run_side_by_side

    return run_side_by_side(CKPT, prompts, tmp_path / name, decode_steps=steps, fault=fault, **kw)


def _bisect(side, floor=False):
    from parity import layer_bisect

    return layer_bisect(side.ref, side.target, preset=PRESET, floor=side.floor if floor else None)


NOISE = 4  # members of a noise ensemble, where a test uses one


def layer_bisect_noise(side):
    from parity import layer_bisect

    return layer_bisect(side.ref, side.target, preset=PRESET, noise=side.noise)


def _slots(side, batched=None, solos=None):
    """The slot result, judged by the rule the engine's runs ask for (bitwise:
    the engine declares batch invariance), and its first failures as dicts."""
    from parity import slot_invariance
    from runners.side_by_side import SLOT_FILTER

    res = slot_invariance(batched or side.batched, [str(p) for p in (solos or side.solos)], filter=SLOT_FILTER)
    return res, res.first.to_dict(orient="records")


def _cli(*args):
    from parity.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ---------------------------------------------------------------- the zoo itself


def test_names_and_unknown_names():
    from parity.errors import ParityError
    from runners.engine import Engine, faults
    from runners.side_by_side import fault_precisions, known_faults

    assert len(faults.FAULTS) >= 11 and known_faults() == faults.names()
    assert set(faults.PRECISIONS) <= set(faults.FAULTS)
    assert fault_precisions("sinkhorn_bf16") == ("bf16", "fp8") and fault_precisions("skip_inverse_rope") is None
    with pytest.raises(ParityError, match="valid: .*skip_routed_scale"):
        faults.parse("no_such_fault")
    os.environ[faults.ENV] = "no_such_fault"
    try:
        with pytest.raises(ParityError, match="unknown engine fault 'no_such_fault'.*window_ring_collision"):
            Engine(CKPT)
    finally:
        del os.environ[faults.ENV]
    assert faults.load("") == frozenset() and not any(faults.active(n) for n in faults.names())
    # Every fault is one marked code path in the engine.
    sources = "".join(p.read_text() for p in (ROOT / "runners" / "engine").rglob("*.py"))
    for name in faults.names():
        assert f"# FAULT {name}:" in sources and f'faults.active("{name}")' in sources, name
    # `parity demo --help` lists them.
    out = _cli("demo", "--help").output
    assert all(n in out for n in faults.names())


def test_precision_fault_is_inert_in_fp32():
    from runners.engine import faults
    from runners.engine.ops import torch_ops

    g = torch.Generator().manual_seed(0)
    streams = torch.randn(5, 4, 32, generator=g)
    fn, base, scale = torch.randn(24, 128, generator=g), torch.randn(24, generator=g), torch.rand(3, generator=g)
    try:
        outs = {}
        for fault in ("", "sinkhorn_bf16"):
            faults.load(fault)
            outs[fault] = [torch_ops.hc_sinkhorn(s, fn, base, scale, 20, 1e-6, 1e-6)[2]
                           for s in (streams, streams.bfloat16())]
    finally:
        faults.load("")
    assert torch.equal(outs[""][0], outs["sinkhorn_bf16"][0])
    assert outs["sinkhorn_bf16"][1].dtype == torch.float32
    assert not torch.equal(outs[""][1], outs["sinkhorn_bf16"][1])


# ---------------------------------------------------------------- the clean engine


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _side(tmp_path_factory.mktemp("zoo"), "clean", PROMPTS, steps=2)


def _assert_clean(side, floor=False):
    b = _bisect(side)
    assert b.key is None and not b.compare.failed, b.message
    if floor:
        fb = _bisect(side, floor=True)
        assert fb.key is None and not fb.compare.failed, fb.message
    res, _ = _slots(side)
    # the engine declares batch invariance: held to the bit
    assert len(res.table) and res.judge.mode == "bitwise" and res.status == "pass", res.message


def test_clean_engine_raises_no_alarm(clean):
    _assert_clean(clean)
    r = _cli("layer-bisect", "--ref", str(clean.ref), "--target", str(clean.target), "--preset", PRESET)
    assert r.exit_code == 0 and "no divergence" in r.output


def _random_prompts(seed, lengths):
    rng = random.Random(seed)
    return [[rng.randrange(3, 4096) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("prompts, slots", [
    # Three other questions, the batch cycling them into four slots (one prompt twice).
    ([f"Question: {q['question']}\nAnswer:" for q in BUILTIN_QUESTIONS[2:5]], 4),
    # Random token ids: shorter than the window, two cache blocks (> 64 tokens), ragged.
    (_random_prompts(1, [9, 37, 70]), None),
    (_random_prompts(2, [17, 64, 5, 41]), None),
], ids=["questions-2-4-in-4-slots", "random-seed1", "random-seed2"])
def test_clean_engine_no_false_alarm(tmp_path, prompts, slots):
    _assert_clean(_side(tmp_path, "clean", prompts, steps=2, slots=slots))


# ---------------------------------------------------------------- layer faults

# fault, precision, first layer it touches, the stage layer-bisect must name
LAYER_FAULTS = [
    # the first score-routed MoE layer; hash layers 0-1 are untouched
    ("skip_routed_scale", "fp32", 2, r"mlp\.gate:output\.1"),
    # the router's ids and the weights gathered by them
    ("hash_routed_by_score", "fp32", 0, r"mlp\.gate:output\.[12]"),
    ("fp8_unscaled_o_a", "fp8", 0, r"self_attn\.o_a_proj:output"),
    # the first FP8 matmul of the network quantizes its input first. Its 6 %
    # error there (exactly 0 in the clean run) sits below the fixed fp8
    # thresholds, which the clean engine needs (0.19 from quantization steps
    # crossed by rounding, and routing flips): found, but at layer 2.
    pytest.param("act_scale_round_nearest", "fp8", 0, r"self_attn\.q_a_proj:output", marks=pytest.mark.xfail(
        strict=True, reason="fixed fp8 thresholds place a 6% error at layer 0 two layers late; needs a "
                            "per-record noise envelope")),
    # no module wraps the rotation: the projection that reads it is the first record off
    ("skip_inverse_rope", "fp32", 0, r"self_attn\.o_a_proj:output"),
    # comb (output.1) of a hyper-connection; layer 0's attn_hc sees four equal
    # streams, whose comb an extra round barely moves, so it may be ffn_hc
    # the mix tap is the Sinkhorn's own output (pre | post | comb), recorded before the module's outputs
    ("sinkhorn_off_by_one", "fp32", 0, r"(attn|ffn)_hc(\.mix:tap|:output\.1)"),
    # the first CSA layer: the indexer's choice flips, the attention reading it fails
    ("indexer_frontier_off_by_one", "fp32", 1, r"self_attn\..*"),
]


@pytest.mark.parametrize("fault, precision, layer, stage", LAYER_FAULTS,
                         ids=[(f.values if hasattr(f, "values") else f)[0] for f in LAYER_FAULTS])
def test_layer_bisect_finds_the_fault(tmp_path, fault, precision, layer, stage):
    side = _side(tmp_path, fault, fault=fault, precision=precision)
    assert side.index["fault"] == fault
    b = _bisect(side)
    assert b.layer == layer and b.entries[0] == layer, b.message
    assert re.fullmatch(stage, b.stage), b.message
    if fault == "indexer_frontier_off_by_one":
        d = b.compare.decisions.table
        first = d[d["frac_tokens_differ"] > 0].iloc[0]
        assert (first["layer"], first["decision"]) == (1, "self_attn.indexer.topk:tap")
        assert "decision flipped upstream" in b.message
    if fault == "skip_routed_scale":
        r = _cli("layer-bisect", "--ref", str(side.ref), "--target", str(side.target), "--preset", PRESET)
        assert r.exit_code == 1 and f"error enters at layer {layer}, stage mlp.gate:output.1" in r.output


# ---------------------------------------------------------------- the precision fault


@pytest.fixture(scope="module")
def clean_bf16(tmp_path_factory):
    return _side(tmp_path_factory.mktemp("zoo"), "clean-bf16", PROMPTS, steps=2, precision="bf16", floor=True,
                 noise=NOISE)


def test_clean_bf16_slots_are_bitwise_invariant(clean_bf16):
    from parity import slot_invariance
    from runners.side_by_side import SLOT_FILTER

    res = slot_invariance(clean_bf16.batched, [str(p) for p in clean_bf16.solos], filter=SLOT_FILTER)
    assert len(res.table) and res.invariant, res.first


@pytest.mark.xfail(strict=True, reason="an indexer near-tie flips for 2.4% of tokens at layer 3 and carries a bf16 "
                                       "rounding difference to 3e-2 at layer 5: neither fixed thresholds nor the "
                                       "fp64 floor can size a flip; needs a per-record noise envelope")
def test_clean_bf16_passes_fixed_and_noise_floor(clean_bf16):
    _assert_clean(clean_bf16, floor=True)


def test_clean_bf16_passes_against_a_noise_model(clean_bf16):
    # the ensemble flips indexer near-ties too, and carries them as far
    b = layer_bisect_noise(clean_bf16)
    assert b.key is None and not b.compare.failed, b.message
    assert "noise, 4 members" in b.compare.table["reason"].iat[0]


def test_noise_model_places_the_fp8_activation_scale_fault(tmp_path):
    side = _side(tmp_path, "act-noise", fault="act_scale_round_nearest", precision="fp8", noise=NOISE)
    b = layer_bisect_noise(side)
    assert (b.layer, b.stage) == (0, "self_attn.q_a_proj:output"), b.message
    clean = _side(tmp_path, "fp8-noise", precision="fp8", noise=NOISE)
    cb = layer_bisect_noise(clean)
    assert cb.key is None and not cb.compare.failed, cb.message


def test_noise_floor_finds_the_precision_fault(tmp_path):
    side = _side(tmp_path, "sinkhorn_bf16", PROMPTS, fault="sinkhorn_bf16", steps=2, precision="bf16", floor=True)
    b = _bisect(side, floor=True)
    # attn_hc.mix is the Sinkhorn's output (pre | post | comb): where the bf16 rounding happens
    assert (b.layer, b.stage) == (0, "attn_hc.mix:tap"), b.message
    row = b.stages[b.stages["stage"] == "attn_hc.mix:tap"].iloc[0]
    assert row["meaning"] == "error enters here"
    t = b.compare.table
    worst = t[t["key"] == "model.layers.0.attn_hc.mix:tap"]
    # fp32 arithmetic on the reference's side, bf16 rounding on the engine's
    assert worst["err_ref_floor"].max() < 1e-6 < 1e-3 < worst["err_target_floor"].max()
    r = _cli("layer-bisect", "--ref", str(side.ref), "--target", str(side.target), "--preset", PRESET,
             "--floor", str(side.floor))
    assert r.exit_code == 1 and "error enters at layer 0, stage attn_hc.mix:tap" in r.output


# ---------------------------------------------------------------- slot faults


def _first(first):
    return {(f["slot"], f["layer"], f["stage"], f["phase"]) for f in first}


def _single_sequence_agrees(tmp_path, fault):
    """The engine on one sequence (a fresh slot) agrees with the reference."""
    one = _side(tmp_path, f"{fault or 'clean'}-one", fault=fault)
    b = _bisect(one)
    assert b.key is None and not b.compare.failed, b.message
    return one


def test_window_ring_collision_is_a_slot_fault(tmp_path):
    fault = "window_ring_collision"
    _single_sequence_agrees(tmp_path, fault)
    side = _side(tmp_path, fault, PROMPTS, fault=fault, steps=2)
    res, v = _slots(side)
    assert res.status == "fail", res.message
    # Both prompts' prefills are longer than the window: each slot's ring is
    # written over by the other's, which the first decode step reads.
    assert {x["slot"] for x in v} == {0, 1}
    assert {(f[1], f[3]) for f in _first(v)} == {(0, "decode")}
    assert all(f[2].startswith("self_attn") for f in _first(v))
    assert not res.first.empty and (res.first["phase"] == "prefill").sum() == 0


def test_block_table_double_offset_is_a_slot_fault(tmp_path):
    fault = "block_table_double_offset"
    _single_sequence_agrees(tmp_path, fault)
    side = _side(tmp_path, fault, PROMPTS, fault=fault, steps=2)
    res, v = _slots(side)
    assert res.status == "fail", res.message
    # Sequence 0 reads its own blocks; sequence 1 another's, from its prefill
    # on, in the first layer with compressed entries.
    assert {x["slot"] for x in v} == {1}
    f = v[0]
    assert (f["slot"], f["layer"], f["phase"]) == (1, 1, "prefill") and f["stage"].startswith("self_attn")
    assert set(res.table[res.table["slot"] == 0]["invariant"]) == {True}


def _after_a_previous_request(dump, prompt, tenant, fault, new_tokens):
    """``prompt`` through an engine of one slot that first served ``tenant``
    (uncaptured) in that same slot; captured into ``dump``."""
    from parity import capture
    from parity.config import CaptureConfig
    from runners.engine import Engine

    engine = Engine(CKPT, max_num_seqs=1, max_model_len=128, fault=fault, capture=None)
    engine.generate([tenant], max_new_tokens=2, ignore_eos=True)
    cfg = CaptureConfig.from_env().replace(dump_dir=str(dump))
    engine.capture = capture.install(engine.model, cfg, run_info=engine.run_info)
    engine.generate([prompt], max_new_tokens=new_tokens, ignore_eos=True)
    engine.capture.set_run_info(token_ids=[prompt], fault=fault)
    engine.capture.close()


@pytest.mark.parametrize("fault", [None, "compressor_state_leak"], ids=["clean", "compressor_state_leak"])
def test_slot_reuse(tmp_path, fault):
    one = _single_sequence_agrees(tmp_path, fault)
    prompt, tenant = one.prompt_ids[0], one.prompt_ids[0][::-1]
    reused = tmp_path / "reused"
    _after_a_previous_request(reused, prompt, tenant, fault, new_tokens=one.index["decode_steps"] + 1)
    res, v = _slots(one, batched=reused)
    if fault is None:
        assert res.invariant, res.first
        return
    assert res.status == "fail", res.message
    # The first CSA layer's first window pools the previous request's block.
    f = v[0]
    assert (f["slot"], f["layer"], f["stage"], f["phase"]) == (0, 1, "self_attn.compressed_kv:tap", "prefill")
    assert res.first.iloc[0]["layer"] == 1
    # side_by_side's batched run sits in slots that served other requests first: it sees the leak too.
    res, v = _slots(one)
    assert res.status == "fail" and (v[0]["layer"], v[0]["phase"]) == (1, "prefill"), res.message
