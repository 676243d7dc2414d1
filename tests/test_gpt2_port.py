"""A model that is not DeepSeek-V4: transformers' GPT-2 against a port with
its own module names (tests/gpt2_port.py, mapped by tests/data/gpt2_port.yaml).
The clean port agrees; the port with exact gelu, the bug that fixed fp32
thresholds let pass as "warn", is placed at layer 0's activation."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from gpt2_port import MAPPING, GPT2Port
from parity import capture, compare_dumps, layer_bisect
from parity.cli import cli
from parity.config import CaptureConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))

    def dump(name, model):
        h = capture.install(model, CaptureConfig(dump_dir=str(root / name)))
        h.set_context(phase="prefill", step=0, seq_ids=[0, 1])
        with torch.no_grad():
            model(ids)
        h.set_run_info(token_ids=ids.tolist(), precision="fp32")
        h.close()
        return str(root / name)

    return {"ref": dump("ref", hf), "port": dump("port", GPT2Port.from_hf(hf)),
            "gelu": dump("gelu", GPT2Port.from_hf(hf, exact_gelu=True))}


def test_the_clean_port_agrees(runs):
    res = compare_dumps(runs["ref"], runs["port"], mapping=str(MAPPING))
    assert not res.failed and (res.table["verdict"] == "pass").all(), res.table[res.table["verdict"] != "pass"]
    assert not len(res.only_ref) and not len(res.only_target)
    assert {"transformer.h.2.mlp.act:output", "lm_head:output", "logits"} <= set(res.table["key"])
    b = layer_bisect(None, None, compare=res)
    assert b.key is None and b.exit_code == 0, b.message


def test_exact_gelu_is_placed_at_the_first_activation(runs):
    b = layer_bisect(runs["ref"], runs["gelu"], mapping=str(MAPPING))
    assert b.exit_code == 1 and (b.layer, b.stage) == (0, "mlp.act:output"), b.message
    assert "error enters here" in b.message


def test_the_cli_with_the_rules_file(runs):
    r = CliRunner().invoke(cli, ["layer-bisect", "--ref", runs["ref"], "--target", runs["gelu"], "--map", str(MAPPING)])
    assert r.exit_code == 1 and "error enters at layer 0, stage mlp.act:output" in r.output, r.output
    r = CliRunner().invoke(cli, ["ref-vs-target", "--ref", runs["ref"], "--target", runs["port"], "--map", str(MAPPING)])
    assert r.exit_code == 0, r.output


def test_one_rules_file_per_side(runs, tmp_path):
    """--map-ref / --map-target: each side's rules in a file of its own."""
    import yaml

    data = yaml.safe_load(MAPPING.read_text())
    for side in ("ref", "target"):
        (tmp_path / f"{side}.yaml").write_text(yaml.safe_dump({"rules": data[side] + data["rules"]}))
    r = CliRunner().invoke(cli, ["layer-bisect", "--ref", runs["ref"], "--target", runs["gelu"],
                                 "--map-ref", str(tmp_path / "ref.yaml"), "--map-target", str(tmp_path / "target.yaml")])
    assert r.exit_code == 1 and "error enters at layer 0, stage mlp.act:output" in r.output, r.output
    # the port's rules do not touch the reference: its keys stay its own
    from parity.compare.mapping import mapping_from_file

    m = mapping_from_file(MAPPING)
    assert m.canonical("blocks.0.ffn.gelu:output", "target") == "transformer.h.0.mlp.act:output"
    assert m.canonical("blocks.0.ffn.gelu:output", "ref") == "blocks.0.ffn.gelu:output"
    assert m.canonical("transformer.h.0.attn.attn_dropout:output", "ref") is None


def test_schema_previews_the_pairing(runs):
    from parity.inspect import schema_diff

    raw = schema_diff(runs["ref"], runs["port"], mapping=None, preset="identity")
    mapped = schema_diff(runs["ref"], runs["port"], mapping=str(MAPPING))
    assert (raw["status"] == "only in B").sum() > 10
    assert not mapped["status"].str.startswith("only in").any(), mapped
    r = CliRunner().invoke(cli, ["schema", runs["ref"], runs["port"], "--map", str(MAPPING)])
    assert r.exit_code in (0, 1) and "only in" not in r.output, r.output


def test_parity_map_proposes_the_port_mapping(runs, tmp_path):
    """From structure alone: every name of the port finds its transformers
    counterpart, and the proposal, used as --map with the reference's own
    tuple outputs settled, lets the clean port agree."""
    from parity.compare.propose import propose_mapping

    p = propose_mapping(runs["ref"], runs["port"])
    pairs = dict(p.pairs)
    assert pairs["blocks.{L}.ffn.gelu:output"] == "transformer.h.{L}.mlp.act:output"
    assert pairs["blocks.{L}.attn.out:output"] == "transformer.h.{L}.attn.c_proj:output"
    assert pairs["norm_f:output"] == "transformer.ln_f:output" and not p.only_target
    out = tmp_path / "proposed.yaml"
    r = CliRunner().invoke(cli, ["map", "--ref", runs["ref"], "--target", runs["port"], "--out", str(out)])
    # all but the position embedding, [S, D] here against transformers' [1, S, D] (two pieces)
    assert r.exit_code == 0 and "68 of 70 target record(s) meet" in r.output, r.output
    r = CliRunner().invoke(cli, ["map", "--ref", runs["ref"], "--target", runs["port"], "--out", str(out)])
    assert r.exit_code == 2 and "--force" in r.output
    # position embeddings: [1, S, D] in transformers, [S, D] in the port (a layout, not a name, differs)
    r = CliRunner().invoke(cli, ["ref-vs-target", "--ref", runs["ref"], "--target", runs["port"], "--map", str(out),
                                 "--filter", r"^(?!transformer\.wpe)"])
    assert r.exit_code == 0 and "fail: 0" in r.output and "missing_in_target" not in r.output, r.output


WEIGHT_RULES = r"""
ref:
  # GPT-2's Conv1D stores [in, out]; the port's nn.Linear [out, in]
  - {match: '\.(c_attn|c_proj|c_fc)\.weight:', transpose: true}
  - {match: '^lm_head\.', drop: true}          # tied to wte
  - {match: '\.attn\.bias:|\.masked_bias:', drop: true}   # causal-mask buffers, if any
target:
  - {match: '^tok\.', replace: 'transformer.wte.'}
  - {match: '^pos\.', replace: 'transformer.wpe.'}
  - {match: '^head\.', drop: true}
  - {match: '^blocks\.(\d+)\.norm1\.', replace: 'transformer.h.\1.ln_1.'}
  - {match: '^blocks\.(\d+)\.norm2\.', replace: 'transformer.h.\1.ln_2.'}
  - {match: '^blocks\.(\d+)\.attn\.qkv\.', replace: 'transformer.h.\1.attn.c_attn.'}
  - {match: '^blocks\.(\d+)\.attn\.out\.', replace: 'transformer.h.\1.attn.c_proj.'}
  - {match: '^blocks\.(\d+)\.ffn\.fc_in\.', replace: 'transformer.h.\1.mlp.c_fc.'}
  - {match: '^blocks\.(\d+)\.ffn\.fc_out\.', replace: 'transformer.h.\1.mlp.c_proj.'}
  - {match: '^norm_f\.', replace: 'transformer.ln_f.'}
"""


def test_weights_with_a_transpose_rule(tmp_path):
    """GPT-2's Conv1D weights are [in, out]: a transpose rule lets them meet
    the port's nn.Linear weights; without it the same weights fail."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from parity import capture
    from parity.compare.weights import compare_weights

    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    capture.dump_weights(hf, str(tmp_path / "ref"))
    capture.dump_weights(GPT2Port.from_hf(hf), str(tmp_path / "port"))
    rules = tmp_path / "weights.yaml"
    rules.write_text(WEIGHT_RULES)
    res = compare_weights(str(tmp_path / "ref"), str(tmp_path / "port"), mapping=str(rules))
    t = res.table
    assert len(t) == 2 * 12 + 4 and (t["verdict"] == "pass").all() and not res.only_target, t[t["verdict"] != "pass"]
    assert t[t["key"].str.contains("c_fc.weight")]["reason"].str.contains("transposed by the mapping").all()
    plain = tmp_path / "plain.yaml"
    plain.write_text(WEIGHT_RULES.replace("transpose: true", r"replace: '.\1.weight:'"))
    bad = compare_weights(str(tmp_path / "ref"), str(tmp_path / "port"), mapping=str(plain)).table
    assert (bad["verdict"] == "fail").sum() == 2 * 4, bad[["key", "verdict"]]
