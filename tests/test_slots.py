import pytest
import torch
from click.testing import CliRunner

import dumpgen
from parity import slot_invariance
from parity.cli import cli
from parity.errors import ParityError
from parity.slots import bitwise_equal

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]   # unequal lengths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("slots")
    toy = dumpgen.Toy()

    def ulp(layer, key, seq, t):
        # Slot 1 only, prefill only (the 3-token run), one element, one ULP.
        if layer == 2 and key.endswith("mlp:output") and seq == 1 and t.shape[0] == 3:
            return dumpgen.one_ulp(t)
        return t

    def scaled(layer, key, seq, t):
        # Slot 2, from layer 1's attention on, every step: 5% off, a slot that
        # computes something else (the error carries into later layers).
        if layer == 1 and key.endswith("self_attn:output") and seq == 2:
            return (t.double() * 1.05).to(t.dtype)
        return t

    return {
        "batched": str(dumpgen.write_engine(root / "b", toy, PROMPTS, decode_steps=2)),
        "ulp": str(dumpgen.write_engine(root / "u", toy, PROMPTS, decode_steps=2, perturb=ulp)),
        "scaled": str(dumpgen.write_engine(root / "x", toy, PROMPTS, decode_steps=2, perturb=scaled)),
        "solos": [str(dumpgen.write_engine(root / f"s{i}", toy, [p], decode_steps=2)) for i, p in enumerate(PROMPTS)],
        "same": str(dumpgen.write_engine(root / "same", toy, [PROMPTS[0]] * 3, decode_steps=1)),
        "same_bad": str(dumpgen.write_engine(root / "same_bad", toy, [PROMPTS[0]] * 3, decode_steps=1,
                                             perturb=lambda L, k, s, t: dumpgen.one_ulp(t)
                                             if (L, s) == (1, 2) and k.endswith("self_attn:output") else t)),
    }


def test_invariant_batch_against_solos(runs):
    res = slot_invariance(runs["batched"], runs["solos"])
    assert res.invariant and res.exit_code == 0
    t = res.table
    assert set(t["slot"]) == {0, 1, 2}
    # Unequal lengths cut per sequence; prefill and both decode steps compared.
    pre = t[(t["phase"] == "prefill") & (t["key"] == "model.embed_tokens:output")]
    assert list(pre["tokens"]) == [5, 3, 7]
    assert set(zip(t["phase"], t["step"])) == {("prefill", 0), ("decode", 1), ("decode", 2)}
    assert (t["frac_equal"] == 1.0).all()


def test_one_ulp_is_not_bitwise_invariant(runs):
    res = slot_invariance(runs["ulp"], runs["solos"], mode="bitwise")
    assert not res.invariant and res.exit_code == 1 and res.status == "fail"
    bad = res.table[~res.table["invariant"]]
    assert set(bad["slot"]) == {1}
    first = res.first.iloc[0]
    assert (first["slot"], first["phase"], first["layer"], first["stage"]) == (1, "prefill", 2, "mlp:output")
    row = bad.iloc[0]
    assert 0.99 < row["frac_equal"] < 1.0 and row["max_abs"] > 0 and row["cos"] > 0.9999
    assert 0 < row["rel_l2"] < 1e-2
    # Other slots and every decode step stay invariant.
    assert res.table[(res.table["slot"] != 1)]["invariant"].all()
    assert res.message.startswith("slot 1 (seq 1) differs from its baseline: first at layer 2 mlp:output")


def test_one_ulp_is_within_rounding(runs):
    """The default rule for runs that promise nothing: a last-bit difference
    is not bitwise invariant, and it is within rounding."""
    res = slot_invariance(runs["ulp"], runs["solos"])
    assert res.judge.mode == "rounding" and "bf16" in res.judge.rule
    assert not res.invariant and res.status == "pass" and res.exit_code == 0 and res.first.empty
    differ = int((~res.table["invariant"]).sum())
    assert differ > 0 and res.message.startswith(f"not bitwise, within rounding: {differ} of {len(res.table)} ")


def test_a_slot_that_computes_something_else_fails_in_rounding_mode(runs):
    res = slot_invariance(runs["scaled"], runs["solos"])
    assert res.status == "fail" and res.exit_code == 1
    assert set(res.first["slot"]) == {2}
    assert set(zip(res.first["layer"], res.first["stage"])) == {(1, "self_attn:output")}
    assert set(res.first["phase"]) == {"prefill", "decode"}
    assert "computes something else (beyond rounding)" in res.message
    assert (res.table[res.table["slot"] != 2]["verdict"] == "pass").all()


def test_a_declared_promise_selects_bitwise(runs, tmp_path):
    import json
    import shutil

    dirs = []
    for name in ["ulp", *[f"s{i}" for i in range(3)]]:
        src = runs["ulp"] if name == "ulp" else runs["solos"][int(name[1:])]
        dst = tmp_path / name
        shutil.copytree(src, dst)
        run = json.loads((dst / "run.json").read_text())
        (dst / "run.json").write_text(json.dumps({**run, "batch_invariant": True}))
        dirs.append(str(dst))
    res = slot_invariance(dirs[0], dirs[1:])
    assert res.judge.mode == "bitwise" and res.exit_code == 1
    # one run that promises nothing: rounding
    assert slot_invariance(dirs[0], [dirs[1], dirs[2], runs["solos"][2]]).judge.mode == "rounding"


def test_noise_model_judges_the_rounding_mode(runs):
    from parity.compare.align import resolve_mapping
    from parity.noise import NoiseModel

    keys = {(r, p, 0) for r, p in slot_invariance(runs["scaled"], runs["solos"]).table[["key", "phase"]]
            .itertuples(index=False)}
    # The 5% slot passes an ensemble that saw errors that large, and fails
    # one that saw only rounding; the reason names the envelope either way.
    loose = NoiseModel(("m",), {k: 0.2 for k in keys}, flips={k: 0.5 for k in keys})
    res = slot_invariance(runs["scaled"], runs["solos"], noise=loose, mapping=resolve_mapping())
    # (a decision that flips as often as in the ensemble still warns, as in ref-vs-target)
    assert res.exit_code == 0 and "envelope" in res.table[~res.table["invariant"]].iloc[0]["reason"]
    assert "noise model, 1 members" in res.judge.rule
    tight = NoiseModel(("m",), {k: 1e-4 for k in keys})
    res = slot_invariance(runs["scaled"], runs["solos"], noise=tight)
    assert res.status == "fail" and "envelope" in res.first.iloc[0]["reason"]
    assert set(zip(res.first["layer"], res.first["stage"])) == {(1, "self_attn:output")}
    with pytest.raises(ParityError, match="--bitwise takes none"):
        slot_invariance(runs["ulp"], runs["solos"], noise=loose, mode="bitwise")


def test_same_prompt_mode(runs):
    res = slot_invariance(runs["same"], same_prompt=True)
    assert res.invariant and set(res.table["slot"]) == {1, 2}
    res = slot_invariance(runs["same_bad"], same_prompt=True, mode="bitwise")
    assert list(res.first["slot"]) == [2, 2]                 # prefill and decode step 1
    assert set(res.first["stage"]) == {"self_attn:output"}
    assert list(res.first["phase"]) == ["prefill", "decode"]


def test_same_prompt_needs_equal_lengths(runs):
    res = slot_invariance(runs["batched"], same_prompt=True)
    pre = res.table[res.table["phase"] == "prefill"]
    assert not pre["invariant"].any()
    assert pre["reason"].str.contains("copies of one prompt").all()


def test_solo_of_another_prompt_is_refused(runs, tmp_path):
    other = dumpgen.write_engine(tmp_path / "o", dumpgen.Toy(), [[42, 43]])
    with pytest.raises(ParityError, match="not one of the batched run's prompts"):
        slot_invariance(runs["batched"], [str(other)])


def test_bitwise_equal_semantics():
    a = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.bfloat16)
    assert bitwise_equal(a, a.clone())                       # NaN equals itself bitwise
    b = a.clone()
    b[0] = -0.0
    assert not bitwise_equal(a, b)                            # signed zero counts
    assert bitwise_equal(a[::2], a.clone()[::2])              # strided path
    assert not bitwise_equal(a, a.float())


def test_cli(runs, tmp_path):
    solos = sum([["--solo", s] for s in runs["solos"]], [])
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["ulp"], *solos, "--bitwise",
                                 "--plot", str(tmp_path / "p")])
    assert r.exit_code == 1, r.output
    assert "slot 1 (seq 1) prefill: first fails at layer 2 mlp:output" in r.output
    assert "rule: bitwise" in r.output
    assert (tmp_path / "p" / "slot_layer_heatmap.png").exists()
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["ulp"], *solos])
    assert r.exit_code == 0, r.output
    assert "result: pass: not bitwise, within rounding" in r.output and "rule: rounding" in r.output
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["scaled"], *solos, "--format", "json"])
    assert r.exit_code == 1
    import json

    out = json.loads(r.output)
    assert len(out["rows"]) == out["pairs"] > 0 and {"rel_l2", "verdict"} <= set(out["rows"][0])
    assert {f["slot"] for f in out["first"]} == {2} and out["result"].startswith("fail: slot 2 (seq 2)")
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["same"], "--same-prompt"])
    assert r.exit_code == 0
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["same"]])
    assert r.exit_code == 2 and "--same-prompt" in r.output
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["ulp"], *solos, "--noise", runs["batched"]])
    assert r.exit_code == 2 and "--noise-ref" in r.output
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", str(tmp_path / "missing"), "--same-prompt"])
    assert r.exit_code == 2 and "does not exist" in r.output
