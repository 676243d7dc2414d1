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

    return {
        "batched": str(dumpgen.write_engine(root / "b", toy, PROMPTS, decode_steps=2)),
        "ulp": str(dumpgen.write_engine(root / "u", toy, PROMPTS, decode_steps=2, perturb=ulp)),
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


def test_one_ulp_is_not_invariant(runs):
    res = slot_invariance(runs["ulp"], runs["solos"])
    assert not res.invariant and res.exit_code == 1
    bad = res.table[~res.table["invariant"]]
    assert set(bad["slot"]) == {1}
    first = res.first.iloc[0]
    assert (first["slot"], first["phase"], first["layer"], first["stage"]) == (1, "prefill", 2, "mlp:output")
    row = bad.iloc[0]
    assert 0.99 < row["frac_equal"] < 1.0 and row["max_abs"] > 0 and row["cos"] > 0.9999
    # Other slots and every decode step stay invariant.
    assert res.table[(res.table["slot"] != 1)]["invariant"].all()


def test_same_prompt_mode(runs):
    res = slot_invariance(runs["same"], same_prompt=True)
    assert res.invariant and set(res.table["slot"]) == {1, 2}
    res = slot_invariance(runs["same_bad"], same_prompt=True)
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
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["ulp"], *sum([["--solo", s] for s in runs["solos"]], []),
                                 "--plot", str(tmp_path / "p")])
    assert r.exit_code == 1, r.output
    assert "slot 1 (seq 1) prefill: first differs at layer 2 mlp:output" in r.output
    assert (tmp_path / "p" / "slot_layer_heatmap.png").exists()
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["same"], "--same-prompt"])
    assert r.exit_code == 0
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["same"]])
    assert r.exit_code == 2 and "--same-prompt" in r.output
    r = CliRunner().invoke(cli, ["slot-invariance", "--dir", str(tmp_path / "missing"), "--same-prompt"])
    assert r.exit_code == 2 and "does not exist" in r.output
