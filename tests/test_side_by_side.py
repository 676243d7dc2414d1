"""runners.side_by_side on the committed tiny checkpoint: the dumps it
writes, the deepseek_v4 preset aligning them, and faults injected from
outside the engine showing up where they were put."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from runners.demo import BUILTIN_QUESTIONS

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "tiny-gsm8k"
# Two short questions of different lengths (a ragged batch), each past 32
# tokens: the CSA layers then hold at least index_topk (8) entries and every
# attention kind emits compressed entries.
PROMPTS = [f"Question: {q['question']}\nAnswer:" for q in BUILTIN_QUESTIONS[:2]]
STEPS = 2

pytestmark = [pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="tiny checkpoint not committed"),
              pytest.mark.usefixtures("one_torch_thread")]


def _cli(*args):
    from parity.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    from runners.side_by_side import run_side_by_side

    out = tmp_path_factory.mktemp("sbs") / "clean"
    return run_side_by_side(CKPT, PROMPTS, out, decode_steps=STEPS)


def test_writes_every_dump_and_the_index(clean):
    idx = json.loads((clean.out / "index.json").read_text())
    assert idx["dumps"]["ref"] == "ref" and idx["dumps"]["target"] == "target"
    assert idx["dumps"]["solo"] == ["solo-0", "solo-1"] and idx["dumps"]["floor"] is None
    for name in ("ref", "target", "batched", "solo-0", "solo-1"):
        assert (clean.out / name / "run.json").is_file(), name
    assert idx["precision"] == "fp32" and idx["fault"] is None and idx["decode_steps"] == STEPS
    assert [len(g) for g in idx["generated"]] == [STEPS + 1] * 2
    # Same ids on both sides, prompt + generated, as the compare checks.
    ref_run = json.loads((clean.ref / "run.json").read_text())
    tgt_run = json.loads((clean.target / "run.json").read_text())
    whole = [p["token_ids"] + g for p, g in zip(idx["prompts"], idx["generated"])]
    assert ref_run["token_ids"] == tgt_run["token_ids"] == whole
    assert ref_run["forced"] is True


def test_refuses_a_non_empty_out(clean):
    from parity.errors import ParityError
    from runners.side_by_side import run_side_by_side

    with pytest.raises(ParityError, match="not empty"):
        run_side_by_side(CKPT, PROMPTS, clean.out, decode_steps=STEPS)


def test_clean_engine_passes_ref_vs_target_with_the_preset(clean):
    r = _cli("ref-vs-target", "--ref", str(clean.ref), "--target", str(clean.target), "--preset", "deepseek_v4")
    assert r.exit_code == 0, r.output
    assert "fail: 0" in r.output and "only_in_reference: 0" in r.output


def test_preset_aligns_every_layer_and_stage(clean):
    from parity import compare_dumps

    res = compare_dumps(clean.ref, clean.target, preset="deepseek_v4")
    t = res.table
    assert not res.failed and len(res.only_ref) == 0
    assert sorted({x for x in t["layer"] if x is not None}) == list(range(6))
    stages = set(t["stage"])
    for s in ("output", "attn_hc:output.2", "self_attn:output", "self_attn.compressed_kv:tap",
              "self_attn.indexer.topk:tap", "mlp.topk_ids:tap", "mlp.experts:output", "mlp:output"):
        assert s in stages, s
    assert {"lm_head:output", "model.norm:output", "model.embed_tokens:output"} <= set(t["key"])
    # Prefill logits are compared at every prompt position, decode ones per step.
    assert set(t[t["key"] == "lm_head:output"]["phase"]) == {"prefill", "decode"}


def test_clean_engine_finds_no_divergence_in_layer_bisect(clean):
    r = _cli("layer-bisect", "--ref", str(clean.ref), "--target", str(clean.target), "--preset", "deepseek_v4")
    assert r.exit_code == 0, r.output
    assert "no divergence" in r.output


def test_clean_engine_slots_are_bitwise_as_the_engine_declares(clean):
    from parity import slot_invariance
    from runners.side_by_side import SLOT_FILTER

    res = slot_invariance(clean.batched, [str(p) for p in clean.solos], filter=SLOT_FILTER)
    assert len(res.table) and res.notes == []
    assert res.judge.mode == "bitwise" and res.invariant and res.status == "pass", res.message


def test_clean_engine_slots_are_bitwise_invariant(clean):
    from runners.side_by_side import SLOT_FILTER

    r = _cli("slot-invariance", "--dir", str(clean.batched), *sum((["--solo", str(p)] for p in clean.solos), []),
             "--filter", SLOT_FILTER)
    assert r.exit_code == 0, r.output


def _scale_weight(name, factor):
    def patch(engine):
        w = dict(engine.model.named_parameters())[name]
        with torch.no_grad():
            w.mul_(factor)
    return patch


def test_layer_bisect_names_the_layer_of_a_perturbed_weight(tmp_path):
    from parity import layer_bisect
    from runners.side_by_side import run_side_by_side

    patch = _scale_weight("model.layers.3.self_attn.o_b_proj.weight", 1.01)
    side = run_side_by_side(CKPT, PROMPTS[:1], tmp_path / "sbs", decode_steps=1, patch_engine=patch)
    assert json.loads((side.out / "index.json").read_text())["patched"] is True
    res = layer_bisect(side.ref, side.target, preset="deepseek_v4")
    assert res.layer == 3 and res.entries == [3]
    assert res.stage == "self_attn.o_b_proj:output"
    r = _cli("layer-bisect", "--ref", str(side.ref), "--target", str(side.target), "--preset", "deepseek_v4")
    assert r.exit_code == 1 and "error enters at layer 3" in r.output


def test_bad_input():
    from parity.errors import ParityError
    from runners.side_by_side import main, run_side_by_side

    with pytest.raises(ParityError, match="precision"):
        run_side_by_side(CKPT, PROMPTS, "/nonexistent/x", precision="fp16")
    assert main(["--ckpt", str(CKPT), "--gsm8k", "0", "--out", "/nonexistent/x"]) == 2
