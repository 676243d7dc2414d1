import pytest

from parity.compare.mapping import Mapping, canonical_layer, load_mapping, presets
from parity.errors import ParityError

ENGINE_RULES = r"""
rules:
  - match: ':tap$'
    drop: true
  - match: '^model\.layers\.(\d+)\.self_attn'
    replace: 'L\1.attn'
  - match: '^model\.layers\.(?P<n>\d+)\.mlp'
    replace: 'L\g<n>.ffn'
    stop: true
  - match: 'L(\d+)\.'
    replace: 'layer\1.'
"""


def _write(tmp_path, text, name="rules.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_rules_apply_in_order_with_stop_and_drop(tmp_path):
    m = load_mapping(_write(tmp_path, ENGINE_RULES))
    assert m.canonical("model.layers.3.self_attn:out") == "layer3.attn:out"   # rules 2 then 4
    assert m.canonical("model.layers.3.mlp:out") == "L3.ffn:out"              # stop after rule 3
    assert m.canonical("model.layers.3.mlp.topk_ids:tap") is None             # dropped
    assert m.canonical("model.norm:out") == "model.norm:out"                 # nothing matched
    assert len(m.rules) == 4 and m.name.endswith("rules.yaml")


def test_every_occurrence_is_rewritten(tmp_path):
    m = load_mapping(_write(tmp_path, "rules:\n  - {match: 'a', replace: 'b'}\n"))
    assert m.canonical("a.a:a") == "b.b:b"


def test_toml_rules(tmp_path):
    p = _write(tmp_path, r"""
[[rules]]
match = '^model\.layers\.(\d+)\.'
replace = 'L\1.'

[[rules]]
match = 'hc_head'
drop = true
""", "rules.toml")
    m = load_mapping(str(p))
    assert m.canonical("model.layers.10.ffn_hc:out") == "L10.ffn_hc:out"
    assert m.canonical("model.hc_head:out") is None


def test_identity_preset():
    assert "identity" in presets()
    m = load_mapping("identity")
    assert m.name == "identity" and m.rules == []
    assert m.canonical("model.layers.0.self_attn:out") == "model.layers.0.self_attn:out"
    assert load_mapping(None).canonical("x:y") == "x:y"


def test_map_keys_reports_collisions(tmp_path):
    m = load_mapping(_write(tmp_path, "rules:\n  - {match: '\\.(q|k)_proj', replace: '.proj'}\n"))
    assert m.map_keys(["a.q_proj:out", "b:out"]) == {"a.proj:out": "a.q_proj:out", "b:out": "b:out"}
    with pytest.raises(ParityError, match="both map to 'a.proj:out'"):
        m.map_keys(["a.q_proj:out", "a.k_proj:out"])


@pytest.mark.parametrize("rules, message", [
    ("  - {match: 'layers\\.(\\d+', replace: 'L'}", r"rule 2: invalid regex"),
    ("  - {match: '(a)', replace: '\\2'}", r"rule 2: replace refers to group 2"),
    ("  - {match: '(a)', replace: '\\g<n>'}", r"rule 2: replace refers to unknown group <n>"),
    ("  - {match: 'a', replace: 'b', drop: true}", r"rule 2: a rule either drops or replaces"),
    ("  - {mtch: 'a', replace: 'b'}", r"rule 2: unknown field\(s\) \['mtch'\]"),
    ("  - {replace: 'b'}", r"rule 2: 'match' \(a regex string\) is required"),
    ("  - {match: 'a', stop: 'yes'}", r"rule 2: 'stop' must be true or false"),
    ("  - just a string", r"rule 2: a rule is a table"),
])
def test_bad_rules_name_file_and_rule_number(tmp_path, rules, message):
    p = _write(tmp_path, "rules:\n  - {match: 'ok', replace: 'fine'}\n" + rules + "\n")
    with pytest.raises(ParityError, match=message) as e:
        load_mapping(p)
    assert str(p) in str(e.value)


def test_missing_file_unknown_preset_and_bad_syntax(tmp_path):
    with pytest.raises(ParityError, match="mapping file not found: .*nope.yaml"):
        load_mapping(tmp_path / "nope.yaml")
    with pytest.raises(ParityError, match="unknown mapping preset 'nope' \\(available: .*identity"):
        load_mapping("nope")
    with pytest.raises(ParityError, match="invalid YAML"):
        load_mapping(_write(tmp_path, "rules: [\n"))
    with pytest.raises(ParityError, match="invalid TOML"):
        load_mapping(_write(tmp_path, "[[rules]\n", "r.toml"))
    with pytest.raises(ParityError, match="'rules' must be a list of rules|expected a table"):
        load_mapping(_write(tmp_path, "rules: {match: a}\n"))
    assert load_mapping(_write(tmp_path, "")).rules == []


def test_canonical_layer():
    assert canonical_layer("model.layers.3.self_attn:out") == 3
    assert canonical_layer("model.layers.42.mlp.topk_ids:tap") == 42
    assert canonical_layer("L7.attn:out") == 7
    assert canonical_layer("model.layers.5:out") == 5
    assert canonical_layer("model.norm:out") is None
    assert canonical_layer("model.extra_layers.3:out") is None
    assert canonical_layer("lm_head:out") is None


def test_mapping_constructed_in_code():
    import re

    from parity.compare.mapping import Rule
    m = Mapping([Rule(re.compile("x"), stop=True), Rule(re.compile("x"), "y")], name="code")
    assert m.canonical("x") == "x" and repr(m) == "Mapping('code', 2 rules)"


def test_sections_per_side_and_unknown_sections(tmp_path):
    m = load_mapping(_write(tmp_path, "ref:\n  - {match: '^a:', replace: 'x:'}\ntarget:\n  - {match: '^b:', replace: 'x:'}\n"
                                      "rules:\n  - {match: 'drop', drop: true}\n"))
    assert m.canonical("a:output", "ref") == "x:output" and m.canonical("b:output", "target") == "x:output"
    assert m.canonical("a:output", "target") == "a:output" and m.canonical("drop:output", "ref") is None
    with pytest.raises(ParityError, match="unknown section"):
        load_mapping(_write(tmp_path, "refs:\n  - {match: a}\n"))


def test_a_run_declares_its_preset(tmp_path):
    from types import SimpleNamespace

    from parity.compare.align import declared_preset, resolve_mapping

    a, b = SimpleNamespace(run={"mapping_preset": "identity"}), SimpleNamespace(run={})
    assert declared_preset([a, b]) == "identity" and resolve_mapping(dumps=[a, b]).name == "identity"
    assert declared_preset([b]) is None
    with pytest.raises(ParityError, match="different mapping presets"):
        declared_preset([a, SimpleNamespace(run={"mapping_preset": "deepseek_v4"})])
