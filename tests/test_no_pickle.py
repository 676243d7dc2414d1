import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parity_never_unpickles():
    pattern = re.compile(r"torch\.load\b|pickle\.loads?\b|import pickle|cPickle|weights_only\s*=\s*False")
    offenders = [f"{p.relative_to(ROOT)}:{i + 1}" for p in (ROOT / "parity").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert offenders == []


def test_parity_imports_neither_runners_nor_reference_models():
    pattern = re.compile(r"^\s*(from|import)\s+(runners|reference_models)\b")
    offenders = [f"{p.relative_to(ROOT)}:{i + 1}" for p in (ROOT / "parity").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert offenders == []
