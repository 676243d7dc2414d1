"""``parity map``: propose the mapping of a target's record names onto a
reference's, from structure alone.

Both runs' records of one layer (and those outside the layers) are laid out
in execution order; an alignment that keeps that order pairs records whose
last dimension and kind (float or integer) agree, preferring pairs whose
names look alike. Every pair whose names differ becomes a rule of the
target's section, written once for all layers; records left without a
partner are dropped by rules marked as such, for the user to check. The result is
an editable rules file (docs/compare.md), checked by counting how many
target records it pairs.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from parity.errors import ParityError

_LAYER = re.compile(r"(?<![^.])(layers|layer|h|blocks|block)\.(\d+)(?=\.|:)")


@dataclass(frozen=True)
class Slot:
    template: str       # the key with its layer index as {L}
    layer_word: str | None
    last_dim: int | None
    floating: bool

    def fits(self, other: "Slot") -> bool:
        return self.last_dim == other.last_dim and self.floating == other.floating


@dataclass
class Proposal:
    pairs: list[tuple[str, str]]                  # (target template, reference template)
    only_target: list[str]
    only_ref: list[str]
    layer_words: tuple[str | None, str | None]    # (target, reference)
    notes: list[str] = field(default_factory=list)

    def rules(self) -> list[dict]:
        out = []
        for t, r in self.pairs:
            if t != r:
                out.append({"match": _pattern(t), "replace": r.replace("{L}", r"\1")})
        return out

    def yaml(self, ref_name: str, target_name: str) -> str:
        import yaml

        lines = [f"# Proposed by `parity map` from the structure of {target_name} (target) and {ref_name}",
                 "# (reference): records paired in execution order by last dimension and kind, names",
                 "# compared only to break ties. Check every rule, the drops above all.",
                 "target:"]
        flow = lambda r: f"  - {yaml.safe_dump(r, default_flow_style=True, width=1000).strip()}"
        rules = [flow(r) for r in self.rules()]
        if self.only_target:
            rules += ["  # no reference record of this shape in this place: dropped; map it if it has a partner"]
            rules += [flow({"match": _pattern(t), "drop": True}) for t in self.only_target]
        lines += rules or ["  []"]
        lines.append("ref:")
        if self.only_ref:
            lines += ["  # no target record of this shape in this place: dropped, so that a compare does not",
                      "  # count them missing; remove a drop if the target should have that record"]
            lines += [flow({"match": _pattern(r), "drop": True}) for r in self.only_ref]
        else:
            lines.append("  []")
        lines.append("rules: []")
        return "\n".join(lines) + "\n"


def _pattern(template: str) -> str:
    return "^" + r"(\d+)".join(re.escape(p) for p in template.split("{L}")) + "$"


def _slots(dump) -> tuple[list[Slot], str | None]:
    """The records of the dump's first forward (rank 0, first call), those of
    its first layer and those outside any layer, in execution order."""
    recs = [r for r in dump.records() if r.kind == "tensor" and r.stage != "weight"]
    if not recs:
        raise ParityError(f"{dump.given}: no tensor records to propose a mapping from")
    first = min(recs, key=lambda r: r.seq)
    recs = [r for r in recs if (r.phase, r.step, r.rank) == (first.phase, first.step, first.rank) and r.call == 0]
    recs.sort(key=lambda r: r.seq)
    layers = sorted({int(m.group(2)) for r in recs for m in [_LAYER.search(r.key)] if m})
    words = {m.group(1) for r in recs for m in [_LAYER.search(r.key)] if m}
    word = sorted(words)[0] if words else None
    out, seen = [], set()
    for r in recs:
        m = _LAYER.search(r.key)
        if m and layers and int(m.group(2)) != layers[0]:
            continue
        template = r.key[:m.start(2)] + "{L}" + r.key[m.end(2):] if m else r.key
        if template in seen:
            continue
        seen.add(template)
        floating = not r.dtype.startswith(("int", "uint", "bool"))
        out.append(Slot(template, m.group(1) if m else None, r.shape[-1] if r.shape else None, floating))
    return out, word


def _leaf(template: str) -> str:
    module, _, stage = template.partition(":")
    return module.rsplit(".", 1)[-1] + ":" + stage


def _align(a: list[Slot], b: list[Slot]) -> list[tuple[int, int]]:
    """Order-keeping pairs of a (target) and b (reference) slots that fit,
    maximising their number, then the likeness of their names."""
    n, m = len(a), len(b)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best = max(score[i + 1][j], score[i][j + 1])
            if a[i].fits(b[j]) and (a[i].layer_word is None) == (b[j].layer_word is None):
                like = difflib.SequenceMatcher(None, _leaf(a[i].template), _leaf(b[j].template)).ratio()
                best = max(best, 1.0 + 0.5 * like + score[i + 1][j + 1])
            score[i][j] = best
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if a[i].fits(b[j]) and (a[i].layer_word is None) == (b[j].layer_word is None):
            like = difflib.SequenceMatcher(None, _leaf(a[i].template), _leaf(b[j].template)).ratio()
            if abs(score[i][j] - (1.0 + 0.5 * like + score[i + 1][j + 1])) < 1e-12:
                pairs.append((i, j))
                i, j = i + 1, j + 1
                continue
        if score[i + 1][j] >= score[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def propose_mapping(ref, target) -> Proposal:
    """A Proposal for ``target``'s keys onto ``ref``'s (dump dirs or Dumps)."""
    from parity.compare.align import as_dump

    rd, td = as_dump(ref), as_dump(target)
    (rs, rword), (ts, tword) = _slots(rd), _slots(td)
    pairs = _align(ts, rs)
    used_t, used_r = {i for i, _ in pairs}, {j for _, j in pairs}
    return Proposal([(ts[i].template, rs[j].template) for i, j in pairs],
                    [s.template for k, s in enumerate(ts) if k not in used_t],
                    [s.template for k, s in enumerate(rs) if k not in used_r], (tword, rword))


def check_proposal(ref, target, text: str) -> tuple[int, int]:
    """(target records paired, target records) under the proposed rules."""
    import tempfile
    from pathlib import Path

    from parity.compare.align import align, as_dump, cut_dump
    from parity.compare.mapping import mapping_from_file

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "proposal.yaml"
        p.write_text(text, encoding="utf-8")
        m = mapping_from_file(p)
    rd, td = as_dump(ref), as_dump(target)
    al = align(cut_dump(rd, m, side="ref"), cut_dump(td, m, side="target"))
    return len(al.pairs), len(al.pairs) + len(al.only_target)
