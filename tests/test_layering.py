"""parity/ is engine-agnostic: it names neither this repository's engine
(`runners`) nor its reference (`reference_models`) in any form: no import,
no importlib string, no path, no word in a comment. They plug in through
declared entry points (pyproject.toml)."""

import re
from pathlib import Path

PARITY = Path(__file__).resolve().parents[1] / "parity"


def test_parity_names_neither_runners_nor_reference_models():
    hits = []
    for f in sorted(PARITY.rglob("*")):
        if f.is_file() and f.suffix in {".py", ".yaml", ".yml", ".toml", ".json", ".md", ".txt"}:
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"runners|reference_models", line):
                    hits.append(f"{f.relative_to(PARITY.parent)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_engine_plugs_in_through_entry_points():
    from importlib.metadata import entry_points

    assert {"demo"} <= {e.name for e in entry_points(group="parity.commands")}
    assert {"deepseek_v4"} <= {e.name for e in entry_points(group="parity.presets")}
    assert {"engine", "reference"} <= {e.name for e in entry_points(group="parity.gate_sources")}
