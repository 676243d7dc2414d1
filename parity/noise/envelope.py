"""Per-record noise envelopes from an ensemble of perturbed reference runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from parity.errors import ParityError

Key = tuple  # (canonical key, phase, step, seq, rank), as a compare row names a pair


def _pooled(key: Key) -> tuple:
    # One envelope per record and phase, over its steps and sequences: a
    # near-tie can flip at any token, and the ensemble's flips fall on other
    # tokens than the target's, so a per-token envelope would miss them.
    return (key[0], key[1], key[4])


@dataclass(frozen=True)
class NoiseModel:
    """For every record of the reference and phase (prefill, decode): the
    largest rel_l2, median per-token error and share of tokens with a
    different decision that any member of the ensemble showed against the
    reference, at any step and in any sequence."""

    members: tuple[str, ...]
    rel_l2: dict = field(default_factory=dict)   # Key -> float
    flips: dict = field(default_factory=dict)    # Key -> float, decision records
    token: dict = field(default_factory=dict)    # Key -> float: median over tokens of the per-token error

    def __len__(self) -> int:
        return len(self.members)

    def envelope(self, key: Key) -> float | None:
        return self.rel_l2.get(_pooled(key))

    def flip_envelope(self, key: Key) -> float | None:
        return self.flips.get(_pooled(key))

    def token_envelope(self, key: Key) -> float | None:
        return self.token.get(_pooled(key))


def _number(v) -> float | None:
    # table cells: None, NaN (pandas' gap) or a number
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def noise_model(ref, members, *, mapping=None, preset: str | None = None, filter=None,
                check_tokens: bool = True) -> NoiseModel:
    """Read each member dump against ``ref`` (as ref-vs-target would, with the
    same mapping) into a NoiseModel. Members must be runs of the reference on
    the same tokens."""
    from parity.compare.align import as_dump, resolve_mapping
    from parity.compare.api import compare_dumps, row_key

    members = [str(m) for m in members]
    if not members:
        raise ParityError("a noise model needs at least one ensemble member")
    ref = as_dump(ref)
    if mapping is None or isinstance(mapping, str):
        mapping = resolve_mapping(mapping, preset, dumps=(ref,))
    # members are runs of the reference: its side's rules apply to both
    mapping = mapping.ref_on_both_sides()
    rel, flips, token = {}, {}, {}
    for m in members:
        res = compare_dumps(ref, m, mapping=mapping, filter=filter, decisions=False, check_tokens=check_tokens,
                            token_errors=True)
        t = res.table
        if len(res.only_ref):
            raise ParityError(f"noise member {m}: {len(res.only_ref)} records of the reference are missing; "
                              "a member must repeat the reference run")
        for i in range(len(t)):
            r = t.iloc[i]
            k = _pooled(row_key(r))
            rel_l2, tm, eq = _number(r["rel_l2"]), _number(r.get("token_median")), _number(r["frac_equal"])
            if rel_l2 is not None:
                rel[k] = max(rel.get(k, 0.0), rel_l2)
                if tm is not None:
                    token[k] = max(token.get(k, 0.0), tm)
            elif eq is not None:
                flips[k] = max(flips.get(k, 0.0), 1.0 - eq)
    return NoiseModel(tuple(members), rel, flips, token)
