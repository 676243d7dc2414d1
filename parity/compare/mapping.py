"""Canonical keys: where records of two implementations meet.

A record key is ``"{module}:{stage}"``. A mapping is an ordered list of
regex rules; each rule that matches the running key rewrites it with
``re.sub`` (Python replacement syntax: ``\\1``, ``\\g<name>``). A rule with
``stop: true`` ends the list when it matches; one with ``drop: true``
excludes the record (``canonical`` returns None).

YAML::

    rules:
      - {match: '^model\\.layers\\.(\\d+)\\.self_attn', replace: 'L\\1.attn'}
      - {match: ':tap$', drop: true}

TOML::

    [[rules]]
    match = '^model\\.layers\\.(\\d+)\\.self_attn'
    replace = 'L\\1.attn'

Named presets live in ``parity/compare/presets/<name>.yaml``, or come from
installed packages through the ``parity.presets`` entry point group.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from parity.errors import ParityError

PRESET_DIR = Path(__file__).parent / "presets"
_RULE_KEYS = {"match", "replace", "stop", "drop", "transpose"}
_GROUP_REF = re.compile(r"\\(\d+)|\\g<([^>]*)>")
_LAYER = re.compile(r"(?:^|[.:])(?:layers\.(\d+)|L(\d+))(?=[.:]|$)")


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    replace: str | None = None      # None: match only (useful with stop)
    stop: bool = False
    drop: bool = False
    transpose: bool = False         # a weight stored [in, out] on this side (e.g. GPT-2's Conv1D)


SIDES = ("ref", "target")


class Mapping:
    """Ordered rules that rewrite record keys to canonical keys. ``sides``
    holds rules for one side only ("ref", "target"), applied before the
    shared ``rules``: names only one implementation uses are settled there."""

    def __init__(self, rules: Iterable[Rule] = (), name: str = "identity", sides: dict | None = None):
        self.rules = list(rules)
        self.name = name
        self.sides = {k: list(v) for k, v in (sides or {}).items() if v}

    def __repr__(self) -> str:
        extra = "".join(f", {len(v)} {k} rules" for k, v in self.sides.items())
        return f"Mapping({self.name!r}, {len(self.rules)} rules{extra})"

    def with_side(self, side: str, rules: Iterable[Rule], name: str | None = None) -> "Mapping":
        """A copy with ``rules`` added for ``side`` (after that side's own)."""
        sides = dict(self.sides)
        sides[side] = sides.get(side, []) + list(rules)
        return Mapping(self.rules, name or self.name, sides)

    def ref_on_both_sides(self) -> "Mapping":
        """For two runs of the reference (a noise ensemble's members)."""
        ref = self.sides.get("ref", [])
        return Mapping(self.rules, self.name, {"ref": ref, "target": ref})

    def canonical(self, key: str, side: str | None = None) -> str | None:
        """The canonical key of a record key of ``side`` (None: shared rules
        only), or None when a rule drops it."""
        s = key
        for r in (self.sides.get(side, []) if side else []) + self.rules:
            if not r.pattern.search(s):
                continue
            if r.drop:
                return None
            if r.replace is not None:
                s = r.pattern.sub(r.replace, s)
            if r.stop:
                break
        return s

    def transposed(self, key: str, side: str | None = None) -> bool:
        """Whether a matching ``transpose`` rule says this side stores the
        weight under ``key`` with its last two dims swapped."""
        for r in (self.sides.get(side, []) if side else []) + self.rules:
            if r.transpose and r.pattern.search(key):
                return True
        return False

    def map_keys(self, keys: Iterable[str], side: str | None = None) -> dict[str, str]:
        """{canonical: original} for the keys that are not dropped. Two keys
        of one dump meeting on one canonical key would pair the wrong
        tensors, so that raises."""
        out: dict[str, str] = {}
        for k in keys:
            c = self.canonical(k, side)
            if c is None:
                continue
            if c in out and out[c] != k:
                raise ParityError(f"mapping {self.name}: {out[c]!r} and {k!r} both map to {c!r}")
            out[c] = k
        return out


def canonical_layer(key: str) -> int | None:
    """Layer index of a key: ``...layers.N...`` or a ``LN`` component."""
    m = _LAYER.search(key)
    if m is None:
        return None
    return int(m.group(1) if m.group(1) is not None else m.group(2))


def _check_template(where: str, pattern: re.Pattern, replace: str):
    for num, name in _GROUP_REF.findall(replace):
        if num and int(num) > pattern.groups:
            raise ParityError(f"{where}: replace refers to group {num}, the regex has {pattern.groups}")
        if name and not (name.isdigit() and int(name) <= pattern.groups) and name not in pattern.groupindex:
            raise ParityError(f"{where}: replace refers to unknown group <{name}>")


def _rule(raw, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ParityError(f"{where}: a rule is a table with 'match' and 'replace', got {raw!r}")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ParityError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: {sorted(_RULE_KEYS)})")
    if not isinstance(raw.get("match"), str):
        raise ParityError(f"{where}: 'match' (a regex string) is required")
    try:
        pattern = re.compile(raw["match"])
    except re.error as e:
        raise ParityError(f"{where}: invalid regex {raw['match']!r}: {e}") from None
    replace = raw.get("replace")
    if replace is not None:
        if not isinstance(replace, str):
            raise ParityError(f"{where}: 'replace' must be a string, got {replace!r}")
        _check_template(where, pattern, replace)
    for flag in ("stop", "drop", "transpose"):
        if not isinstance(raw.get(flag, False), bool):
            raise ParityError(f"{where}: '{flag}' must be true or false")
    if raw.get("drop") and replace is not None:
        raise ParityError(f"{where}: a rule either drops or replaces, not both")
    return Rule(pattern, replace, bool(raw.get("stop", False)), bool(raw.get("drop", False)),
                bool(raw.get("transpose", False)))


def _read(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ParityError(f"{path}: invalid TOML: {e}") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ParityError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParityError(f"{path}: expected a table with 'rules' (both sides), 'ref' and/or 'target' lists")
    unknown = set(data) - {"rules", *SIDES}
    if unknown:
        raise ParityError(f"{path}: unknown section(s) {sorted(unknown)} (allowed: rules, ref, target)")
    for k in ("rules", *SIDES):
        if not isinstance(data.get(k, []), list):
            raise ParityError(f"{path}: '{k}' must be a list of rules")
    return data


def mapping_from_file(path: str | os.PathLike) -> Mapping:
    path = Path(path)
    if not path.is_file():
        raise ParityError(f"mapping file not found: {path}")
    data = _read(path)
    rules = [_rule(r, f"{path}: rule {i}") for i, r in enumerate(data.get("rules") or [], 1)]
    sides = {k: [_rule(r, f"{path}: {k} rule {i}") for i, r in enumerate(data.get(k) or [], 1)] for k in SIDES}
    return Mapping(rules, name=str(path), sides=sides)


def side_rules(path: str | os.PathLike, side: str) -> list[Rule]:
    """Every rule of a rules file, for one side (``--map-ref`` / ``--map-target``):
    its shared rules and its section for that side."""
    m = mapping_from_file(path)
    return m.sides.get(side, []) + m.rules


# Presets installed packages declare: name -> a path (or str) to a rules
# file, e.g. an engine's mapping onto its reference.
PRESETS_GROUP = "parity.presets"


def _declared() -> dict[str, object]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PRESETS_GROUP)}


def presets() -> list[str]:
    """Every preset name: parity's own and those installed packages declare."""
    return sorted({p.stem for p in PRESET_DIR.glob("*.yaml")} | set(_declared()))


def _preset_file(name: str) -> Path | None:
    own = PRESET_DIR / f"{name}.yaml"
    if own.is_file():
        return own
    ep = _declared().get(name)
    if ep is None:
        return None
    try:
        return Path(ep.load())
    except Exception as exc:  # noqa: BLE001 - the declaring package is broken, not the user's input
        raise ParityError(f"mapping preset {name!r} ({ep.value}) could not load: {type(exc).__name__}: {exc}") \
            from None


def load_mapping(path_or_preset: str | os.PathLike | None) -> Mapping:
    """A rules file (.yaml, .yml or .toml) or the name of a preset; None is
    the identity mapping."""
    if path_or_preset is None:
        return Mapping()
    arg = str(path_or_preset)
    looks_like_path = isinstance(path_or_preset, os.PathLike) or os.sep in arg or arg.endswith(
        (".yaml", ".yml", ".toml"))
    if looks_like_path or os.path.exists(arg):
        return mapping_from_file(arg)
    preset = _preset_file(arg)
    if preset is None or not preset.is_file():
        raise ParityError(f"unknown mapping preset {arg!r} (available: {', '.join(presets())}; "
                          "or give a path to a .yaml/.toml rules file)")
    m = mapping_from_file(preset)
    m.name = arg
    return m
