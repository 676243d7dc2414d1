"""Answer extraction and scoring, as lm-eval's ``gsm8k`` task does them.

Two filters read a number out of a generation:

- ``strict-match``: the first ``#### N`` (the format of the fewshot answers);
- ``flexible-extract``: the last number-looking token anywhere.

Both fall back to ``[invalid]``. The extracted string and the reference
answer then go through the ``exact_match`` normalisation (drop commas,
dollar signs, everything up to ``#### ``, one trailing period; lowercase;
punctuation is kept) and are compared as strings, so ``18.0`` is not ``18``.
"""

from __future__ import annotations

import re
from typing import Iterable

FALLBACK = "[invalid]"

# (pattern, group_select): group_select picks which findall() hit to keep.
FILTERS: dict[str, tuple[str, int]] = {
    "strict-match": (r"#### (\-?[0-9\.\,]+)", 0),
    "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),
}
# Short names used as record columns (answer_strict, correct_flexible, ...).
SHORT = {"strict-match": "strict", "flexible-extract": "flexible"}

# exact_match kwargs of the task: applied in this order, to both sides.
REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
IGNORE_CASE = True
IGNORE_PUNCTUATION = False

_COMPILED = {name: re.compile(pat) for name, (pat, _) in FILTERS.items()}
_IGNORE = tuple(re.compile(p) for p in REGEXES_TO_IGNORE)


def extract(text: str, filter_name: str) -> str:
    """The answer ``filter_name`` reads from one generation."""
    if filter_name not in FILTERS:
        raise KeyError(f"unknown filter {filter_name!r}; choose one of {', '.join(FILTERS)}")
    if not isinstance(text, str):
        text = ""
    hits = _COMPILED[filter_name].findall(text)
    if not hits:
        return FALLBACK
    hit = hits[FILTERS[filter_name][1]]
    if isinstance(hit, tuple):
        # An alternation yields one slot per group; the group that matched is
        # the non-empty one.
        nonempty = [h for h in hit if h]
        if not nonempty:
            return FALLBACK
        hit = nonempty[0]
    return hit.strip()


def extract_all(text: str) -> dict[str, str]:
    return {name: extract(text, name) for name in FILTERS}


def normalize(s: str) -> str:
    for rx in _IGNORE:
        s = rx.sub("", s)
    if IGNORE_CASE:
        s = s.lower()
    # lm-eval compares numpy unicode arrays, which drop trailing NULs.
    return s.rstrip("\x00")


def target_answer(answer: str) -> str:
    """The reference answer as exact_match sees it (``"... #### 1,234"`` -> ``"1234"``)."""
    return normalize(answer)


def is_correct(extracted: str, answer: str) -> bool:
    """exact_match of one extracted answer against the full reference answer."""
    return normalize(extracted) == normalize(answer)


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """Cut a generation at its stop sequences, each in turn, as lm-eval's
    post-processing does, so a server or engine that returns text past a
    stop sequence scores like one that stopped."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def score(generation: str, answer: str) -> dict:
    """Extracted answers and correctness for both filters, as record fields."""
    out = {}
    for name in FILTERS:
        got = extract(generation, name)
        out[f"answer_{SHORT[name]}"] = got
        out[f"correct_{SHORT[name]}"] = is_correct(got, answer)
    return out
